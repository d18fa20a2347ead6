"""Tables users have: images listed in a CSV, multi-label and regression targets, Parquet, feature
columns with the tabular backbone, bad rows, hostile files, stratified limits, and the checks
`validate` makes before any data is read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from surgery.data import examples_for, limit_examples, load_data
from surgery.data_examples import Examples
from surgery.errors import DataError, RecipeError
from surgery.heads import HeadInfo
from surgery.inputs import InputSpec
from surgery.placement import SingleDevice
from surgery.recipe import load_recipe
from surgery.schema import Recipe

CPU = SingleDevice(torch.device("cpu"))


def image_model(**heads: tuple[str, int]) -> SimpleNamespace:
    return SimpleNamespace(
        input_spec=InputSpec(kind="image", channels=3, size=(8, 8)),
        tokenizer=None,
        head_info={name: HeadInfo(task, out, (out,)) for name, (task, out) in heads.items()},
    )


def vector_model(features: int, **heads: tuple[str, int]) -> SimpleNamespace:
    return SimpleNamespace(
        input_spec=InputSpec(kind="vector", features=features),
        tokenizer=None,
        head_info={name: HeadInfo(task, out, (out,)) for name, (task, out) in heads.items()},
    )


def recipe_for(data: dict, heads: list[dict], backbone: dict | None = None) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "backbone": backbone or {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": [{"layers": [{"linear": {"out_features": 2}}], "loss": "cross_entropy", **h} for h in heads],
            "data": data,
        }
    )


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20 % 255, 0, 0)).save(folder / f"{i}.png")
        names.append(f"{folder.name}/{i}.png")
    return names


def test_kaggle_csv_of_image_paths_with_bom_and_counts(tmp_path: Path, capsys) -> None:
    names = write_images(tmp_path / "images", 6)
    table = tmp_path / "train.csv"
    rows = "".join(f"{n},{'cat' if i % 2 else 'dog'}\n" for i, n in enumerate(names))
    table.write_bytes(b"\xef\xbb\xbf" + f"image_id,label\n{rows}".encode())
    recipe = recipe_for(
        {"source": "csv", "train": str(table), "image_column": "image_id", "val_split": 0.34}, [{"name": "cls"}]
    )
    data = load_data(recipe, image_model(cls=("multiclass", 2)), CPU)
    assert (data.num_train, data.num_val) == (4, 2) and data.class_names["cls"] == ["cat", "dog"]
    inputs, targets = next(iter(data.val))
    assert inputs[0].shape == (2, 3, 8, 8) and targets["cls"].dtype == torch.long
    assert "data csv train: 4 samples (cls: cat 2, dog 2)" in capsys.readouterr().err


def test_multilabel_from_json_lists_and_a_separator(tmp_path: Path) -> None:
    names = write_images(tmp_path / "img", 4)
    labels = ['["a","b"]', "[]", '["c"]', '["a","c"]']
    (tmp_path / "t.jsonl").write_text(
        "".join(json.dumps({"path": n, "tags": json.loads(t)}) + "\n" for n, t in zip(names, labels, strict=True))
    )
    head = {"name": "tags", "loss": "bce_with_logits", "target": "tags", "layers": [{"linear": {"out_features": 3}}]}
    recipe = recipe_for(
        {
            "source": "jsonl",
            "train": str(tmp_path / "t.jsonl"),
            "val": str(tmp_path / "t.jsonl"),
            "image_column": "path",
        },
        [head],
    )
    model = image_model(tags=("multilabel", 3))
    val = examples_for(recipe, model)
    assert val.class_names["tags"] == ["a", "b", "c"]
    assert val.targets["tags"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 1]]
    csv = tmp_path / "t.csv"
    csv.write_text("path,tags\n" + "".join(f"{n},{'a|c' if i % 2 else 'b'}\n" for i, n in enumerate(names)))
    sep = recipe.model_copy(
        update={
            "data": recipe.data.model_copy(
                update={"source": "csv", "train": str(csv), "val": str(csv), "label_separator": "|"}
            )
        }
    )
    assert examples_for(sep, model).targets["tags"][:2].tolist() == [[0, 1, 0], [1, 0, 1]]
    nosep = sep.model_copy(update={"data": sep.data.model_copy(update={"label_separator": None})})
    with pytest.raises(
        DataError, match=r"t\.csv:2:tags: a multi-label cell needs a JSON list or `data.label_separator`"
    ):
        examples_for(nosep, model)


def test_image_regression_one_and_several_columns(tmp_path: Path) -> None:
    names = write_images(tmp_path / "img", 4)
    (tmp_path / "t.csv").write_text("path,age,x,y\n" + "".join(f"{n},{20 + i},{i},{-i}\n" for i, n in enumerate(names)))
    data = {"source": "csv", "train": str(tmp_path / "t.csv"), "val": str(tmp_path / "t.csv"), "image_column": "path"}
    age = {"name": "age", "loss": "mse", "target": "age", "layers": [{"linear": {"out_features": 1}}]}
    xy = {"name": "xy", "loss": "mse", "target": ["x", "y"], "layers": [{"linear": {"out_features": 2}}]}
    val = examples_for(recipe_for(data, [age, xy]), image_model(age=("regression", 1), xy=("regression", 2)))
    assert val.targets["age"].tolist() == [20.0, 21.0, 22.0, 23.0]
    assert val.targets["xy"].tolist() == [[0, 0], [1, -1], [2, -2], [3, -3]]


def test_parquet_features_and_several_heads(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 10
    pq.write_table(
        pa.table(
            {
                "a": [float(i) for i in range(n)],
                "b": list(range(n)),
                "kind": ["x", "y"] * 5,
                "score": [i / 10 for i in range(n)],
            }
        ),
        tmp_path / "t.parquet",
    )
    data = {"source": "parquet", "train": str(tmp_path / "t.parquet"), "feature_columns": ["a", "b"], "val_split": 0.2}
    heads = [
        {"name": "kind", "target": "kind"},
        {"name": "score", "target": "score", "loss": "mse", "layers": [{"linear": {"out_features": 1}}]},
    ]
    loaded = load_data(recipe_for(data, heads), vector_model(2, kind=("multiclass", 2), score=("regression", 1)), CPU)
    (x,), targets = next(iter(loaded.val))
    assert x.shape == (2, 2) and set(targets) == {"kind", "score"} and targets["score"].dtype == torch.float32


def test_missing_cell_is_an_error_with_file_row_column_or_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n1,2,x\n3,,y\n5,6,\n7,8,y\n9,1,x\n2,2,y\n")
    data = {"source": "csv", "train": str(path), "feature_columns": ["a", "b"], "val_split": 0.25}
    model = vector_model(2, cls=("multiclass", 2))
    with pytest.raises(
        DataError, match=r"t\.csv:3:b: empty cell \(2 bad rows in data\.train .*\); set `data\.on_bad_row: skip`"
    ):
        load_data(recipe_for(data, [{"name": "cls"}]), model, CPU)
    loaded = load_data(recipe_for({**data, "on_bad_row": "skip"}, [{"name": "cls"}]), model, CPU)
    assert loaded.num_train + loaded.num_val == 4
    assert [why for _, why in loaded.skipped] == ["empty cell", "empty cell"]
    (tmp_path / "n.csv").write_text("a,b,label\n1,2,x\n3,abc,y\n")
    with pytest.raises(DataError, match=r"n\.csv:3:b: 'abc' is not a number"):
        load_data(recipe_for({**data, "train": str(tmp_path / "n.csv")}, [{"name": "cls"}]), model, CPU)


def test_empty_text_cell_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('text,label\ngood,1\n"",0\n')
    model = SimpleNamespace(
        input_spec=InputSpec(kind="text"), tokenizer=None, head_info={"cls": HeadInfo("multiclass", 2, (2,))}
    )
    with pytest.raises(DataError, match=r"t\.csv:3:text: empty cell"):
        load_data(
            recipe_for({"source": "csv", "train": str(path), "text_column": "text"}, [{"name": "cls"}]), model, CPU
        )


# --------------------------------------------------------------------------- hostile tables


def features_recipe(path: Path, **data: object) -> Recipe:
    return recipe_for({"source": "csv", "train": str(path), "feature_columns": ["a"], **data}, [{"name": "cls"}])


def load_features(path: Path, **data: object):
    return load_data(features_recipe(path, **data), vector_model(1, cls=("multiclass", 2)), CPU)


def test_wrong_delimiter_is_named(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a;label\n1;x\n2;y\n")
    with pytest.raises(
        DataError, match=r"columns are: a;label \(the header looks delimited by ';': set `data.delimiter: ';'`\)"
    ):
        load_features(tmp_path / "t.csv")
    assert load_features(tmp_path / "t.csv", delimiter=";", val_split=0.5).num_train == 1


def test_tsv_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_text("a\tlabel\n1\tx\n2\ty\n")
    assert load_features(tmp_path / "t.tsv", val_split=0.5).num_val == 1


def test_ragged_rows_are_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,label\n1,x\n2,y,extra\n3,y\n")
    with pytest.raises(DataError, match=r"t\.csv:3: 3 fields, the header has 2"):
        load_features(tmp_path / "t.csv")


def test_a_line_longer_than_the_limit_is_a_bad_row_without_reading_it_whole(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,label\n1,x\n" + "9" * 5000 + ",y\n2,y\n3,x\n")
    with pytest.raises(DataError, match=r"t\.csv:3: line longer than data.max_row_bytes \(100\)"):
        load_features(tmp_path / "t.csv", max_row_bytes=100)
    assert load_features(tmp_path / "t.csv", max_row_bytes=100, on_bad_row="skip", val_split=0.34).num_train == 2


def test_binary_junk_and_parquet_given_to_csv(tmp_path: Path) -> None:
    (tmp_path / "junk.csv").write_bytes(b"a,label\n\x00\x01\x02\xff\xfe")
    with pytest.raises(DataError, match=r"junk\.csv holds binary data"):
        load_features(tmp_path / "junk.csv")
    (tmp_path / "latin.csv").write_bytes(b"a,label\n1,caf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.csv:\d+: not UTF-8 text"):
        load_features(tmp_path / "latin.csv")
    (tmp_path / "p.csv").write_bytes(b"PAR1\x00\x00")
    with pytest.raises(DataError, match=r"p\.csv is a Parquet file; use `data.source: parquet`"):
        load_features(tmp_path / "p.csv")


def test_parquet_whose_schema_lies(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": ["1", "two"], "label": ["x", "y"]}), path)  # numbers, it says, as strings
    recipe = recipe_for({"source": "parquet", "train": str(path), "feature_columns": ["a"]}, [{"name": "cls"}])
    with pytest.raises(DataError, match=r"t\.parquet:2:a: 'two' is not a number"):
        load_data(recipe, vector_model(1, cls=("multiclass", 2)), CPU)
    data = path.read_bytes()
    path.write_bytes(data[:-12] + b"\xff" * 8 + data[-4:])  # a footer that does not describe the file
    with pytest.raises(DataError, match=r"t\.parquet is not a readable Parquet file"):
        load_data(recipe, vector_model(1, cls=("multiclass", 2)), CPU)


def test_image_paths_leaving_the_root_are_refused_and_symlinks_followed(tmp_path: Path) -> None:
    write_images(tmp_path / "root" / "img", 3)
    write_images(tmp_path / "outside", 1)
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "root" / "img" / "0.png")
    (tmp_path / "root" / "dangling.png").symlink_to(tmp_path / "root" / "nope.png")
    table = tmp_path / "t.csv"
    table.write_text("path,label\nimg/0.png,a\nimg/1.png,b\nlink.png,a\nimg/2.png,b\n")
    data = {
        "source": "csv",
        "train": str(table),
        "val": str(table),
        "image_column": "path",
        "image_root": str(tmp_path / "root"),
    }
    model = image_model(cls=("multiclass", 2))
    assert len(examples_for(recipe_for(data, [{"name": "cls"}]), model)) == 4
    for bad, why in (
        ("../outside/0.png", "leaves the image root"),
        ("/etc/passwd", "leaves the image root"),
        ("dangling.png", "does not exist"),
    ):
        table.write_text(f"path,label\nimg/0.png,a\n{bad},b\n")
        with pytest.raises(DataError, match=rf"t\.csv:3:path: .*{why}"):
            examples_for(recipe_for(data, [{"name": "cls"}]), model)


# --------------------------------------------------------------------------- limits, checks before work


def test_limit_is_stratified_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(20)  # class-sorted, 20 of each
    examples = Examples("tensor", (torch.zeros(200, 1),), {"cls": labels})
    subset = limit_examples(examples, 8, seed=0)
    assert len(set(subset.targets["cls"].tolist())) == 8
    assert torch.equal(subset.targets["cls"], limit_examples(examples, 8, seed=0).targets["cls"])
    skewed = Examples("tensor", (torch.zeros(100, 1),), {"cls": torch.tensor([0] * 80 + [1] * 20)})
    assert limit_examples(skewed, 10, seed=3).targets["cls"].tolist().count(1) == 2


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "name: r\nbackbone: {source: timm, name: test_resnet, pretrained: false}\n"


def test_validate_refuses_what_build_would(tmp_path: Path) -> None:
    multilabel = BASE + (
        "heads: [{name: tags, layers: [{linear: {out_features: 3}}], loss: bce_with_logits}]\n"
        "data: {source: image_folder, train: x}\n"
    )
    with pytest.raises(RecipeError, match=r"heads\[0\]\.loss: a multi-label head \(3 outputs\) needs a label list"):
        load_recipe(write_recipe(tmp_path, multilabel))
    table = (
        BASE
        + "heads: [{name: c, layers: [{linear: {out_features: 2}}], loss: cross_entropy}]\ndata: {source: csv, train: t.csv, text_column: t}\n"
    )
    with pytest.raises(RecipeError, match=r"data\.text_column: the timm backbone takes images: set data\.image_column"):
        load_recipe(write_recipe(tmp_path, table))
    tabular = (
        "name: r\nbackbone: {source: tabular, name: mlp, kwargs: {features: 3}}\n"
        "heads: [{name: c, layers: [{linear: {out_features: 2}}], loss: cross_entropy}]\n"
        "data: {source: csv, train: t.csv, feature_columns: [a, b]}\n"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, tabular))
    assert "backbone.kwargs.features: set to 2" in str(
        err.value
    ) and "backbone.pretrained: the tabular backbone" in str(err.value)


def test_plan_data_reports_samples_per_split_and_class() -> None:
    from surgery.plan import plan_command

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "tabular-features.yaml"
    text = plan_command(recipe, [], depth=1, as_json=False, data=True)
    assert "data csv train: 47 samples (species: setosa 17, versicolor 15, virginica 15)" in text
    assert "1 rows/files left out (first: " in text and "tabular.csv:9:petal_length: empty cell" in text


# --------------------------------------------------------------------------- Hugging Face datasets


def test_hf_save_to_disk_folder_with_images_and_class_labels(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    write_images(tmp_path / "img", 6)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})

    def split(rows: range) -> object:
        return datasets.Dataset.from_dict(
            {"image": [str(tmp_path / "img" / f"{i}.png") for i in rows], "label": [i % 2 for i in rows]}, features
        )

    datasets.DatasetDict({"train": split(range(4)), "test": split(range(4, 6))}).save_to_disk(str(tmp_path / "ds"))
    data = {"source": "hf", "train": str(tmp_path / "ds"), "image_column": "image", "hf": {"val_split": "test"}}
    model = image_model(cls=("multiclass", 2))
    loaded = load_data(recipe_for(data, [{"name": "cls"}]), model, CPU)
    assert (loaded.num_train, loaded.num_val) == (4, 2) and loaded.class_names["cls"] == ["no", "yes"]
    inputs, targets = next(iter(loaded.val))
    assert inputs[0].shape == (2, 3, 8, 8) and targets["cls"].tolist() == [0, 1]
    test = examples_for(recipe_for(data, [{"name": "cls"}]), model, tmp_path / "ds", split="test")
    assert len(test) == 2
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are: train, test"):
        load_data(recipe_for({**data, "hf": {"val_split": "validation"}}, [{"name": "cls"}]), model, CPU)


def test_hf_hub_id_offline_without_cache_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = {"source": "hf", "hf": {"name": "nobody/no-such-dataset-here"}, "image_column": "image"}
    with pytest.raises(
        DataError,
        match=r"^hf dataset 'nobody/no-such-dataset-here' cannot be loaded .*offline it must be in the datasets cache",
    ):
        load_data(recipe_for(data, [{"name": "cls"}]), image_model(cls=("multiclass", 2)), CPU)


def test_hf_splits_are_chosen_by_name(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")

    def split(n: int, label: str) -> object:
        return datasets.Dataset.from_dict({"a": [float(i) for i in range(n)], "b": [1.0] * n, "y": [label] * n})

    datasets.DatasetDict({"fit": split(5, "a"), "check": split(3, "b"), "train": split(1, "c")}).save_to_disk(
        str(tmp_path / "ds")
    )
    data = {"source": "hf", "train": str(tmp_path / "ds"), "feature_columns": ["a", "b"], "label_column": "y"}
    model = vector_model(2, cls=("multiclass", 2))
    named = recipe_for({**data, "hf": {"train_split": "fit", "val_split": "check"}}, [{"name": "cls"}])
    loaded = load_data(named, model, CPU)
    assert (loaded.num_train, loaded.num_val) == (5, 3)
    with pytest.raises(DataError, match=r"has no split 'nope'; its splits are: fit, check, train"):
        load_data(recipe_for({**data, "hf": {"train_split": "nope"}}, [{"name": "cls"}]), model, CPU)


def test_hf_hub_config_and_revision_reach_load_dataset_and_need_a_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    asked: list[tuple] = []

    def load_dataset(name: str, config: str | None = None, *, revision: str | None = None) -> object:
        asked.append((name, config, revision))  # the hub itself cannot be reached here
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = {"name": "org/set", "config": "small", "revision": "v2"}
    with pytest.raises(DataError, match=r"hf dataset 'org/set' cannot be loaded"):
        load_data(recipe_for({"source": "hf", "hf": hub, "image_column": "i"}, [{"name": "c"}]), image_model(), CPU)
    assert asked == [("org/set", "small", "v2")]
    for key in ("config", "revision"):
        with pytest.raises(ValueError, match=rf"hf\.{key}.*applies to a hub dataset"):
            check = recipe_for({"source": "hf", "train": "ds", "hf": {key: "x"}, "image_column": "i"}, [{"name": "c"}])
            _raise_problems(check)
    with pytest.raises(ValueError, match=r"hf\.name.*keep one of them"):
        _raise_problems(
            recipe_for({"source": "hf", "train": "ds", "hf": {"name": "a/b"}, "image_column": "i"}, [{"name": "c"}])
        )


def _raise_problems(recipe: Recipe) -> None:
    from surgery.schema import cross_check

    problems = cross_check(recipe)
    if problems:
        raise ValueError("; ".join(f"{'.'.join(map(str, p.path))}: {p.message}" for p in problems))
