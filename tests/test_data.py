"""Data sources, preprocessing parity with serving, seeded order and resumable position."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from surgery.data import EpochBatchSampler, load_data
from surgery.errors import DataError
from surgery.heads import HeadInfo
from surgery.inputs import InputSpec
from surgery.model import build_model
from surgery.placement import SingleDevice
from surgery.preprocess import images_to_batch
from surgery.schema import Recipe

CPU = SingleDevice(torch.device("cpu"))


def image_recipe(data: dict, out_features: int = 10, labels: list[str] | None = None) -> Recipe:
    head = {
        "name": "cls",
        "layers": [{"linear": {"out_features": out_features}}],
        "loss": "cross_entropy",
        "metrics": ["accuracy"],
    }
    if labels:
        head["labels"] = labels
    return Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "input": {"size": [16, 16]},
            "surgery": [{"input_channels": 1}],
            "heads": [head],
            "data": data,
        }
    )


@pytest.fixture(scope="module")
def digits_model():
    return build_model(image_recipe({"source": "digits"}))


def test_digits_batches_match_serving_preprocessing(digits_model) -> None:
    recipe = image_recipe({"source": "digits", "batch_size": 32})
    data = load_data(recipe, digits_model, CPU)
    assert (data.num_train, data.num_val) == (1438, 359)
    assert data.class_names["cls"] == [str(i) for i in range(10)]
    inputs, targets = next(iter(data.val))
    assert inputs[0].shape == (32, 1, 16, 16) and inputs[0].dtype == torch.float32
    assert targets["cls"].dtype == torch.long and targets["cls"].shape == (32,)
    # the same PIL images through the serving path give the same tensors
    images = data.val.dataset.examples.inputs[:32]
    torch.testing.assert_close(inputs[0], images_to_batch(images, digits_model.input_spec), rtol=0, atol=0)


def test_digits_split_is_seeded_by_split_seed(digits_model) -> None:
    a = load_data(image_recipe({"source": "digits", "split_seed": 1}), digits_model, CPU)
    b = load_data(image_recipe({"source": "digits", "split_seed": 1}), digits_model, CPU)
    c = load_data(image_recipe({"source": "digits", "split_seed": 2}), digits_model, CPU)
    assert torch.equal(a.val.dataset.examples.targets["cls"], b.val.dataset.examples.targets["cls"])
    assert not torch.equal(a.val.dataset.examples.targets["cls"], c.val.dataset.examples.targets["cls"])


def test_class_count_mismatch_with_head_is_an_error() -> None:
    recipe = image_recipe({"source": "digits"}, out_features=7)
    with pytest.raises(DataError, match="head 'cls' has 7 outputs, but the digits data has 10 classes"):
        load_data(recipe, build_model(recipe), CPU)


def test_sampler_order_depends_on_seed_and_epoch_and_skips_batches() -> None:
    sampler = EpochBatchSampler(10, 3, shuffle=True, drop_last=False, seed=5)
    first = list(sampler)
    assert [len(b) for b in first] == [3, 3, 4]  # a lone last sample joins the batch before it (BatchNorm)
    assert sorted(i for b in first for _, i in b) == list(range(10))
    assert [len(b) for b in EpochBatchSampler(11, 3, shuffle=True, drop_last=False, seed=5)] == [3, 3, 3, 2]
    assert list(sampler) == first  # a pure function of (seed, epoch)
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for b in second for _, i in b] != [i for b in first for _, i in b]
    sampler.set_epoch(1, skip=2)
    assert len(sampler) == 1 and list(sampler) == second[2:]
    # two ranks of a distributed run split every epoch between them
    ranks = [EpochBatchSampler(10, 5, shuffle=True, drop_last=False, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(i for s in ranks for b in s for _, i in b) == list(range(10))


def test_augmentations_are_a_function_of_seed_epoch_and_index(digits_model) -> None:
    recipe = image_recipe(
        {"source": "digits", "augment": [{"rotate": {"degrees": 30}}, {"gaussian_noise": {"std": 0.5}}]}
    )
    data = load_data(recipe, digits_model, CPU)
    dataset = data.train.dataset
    torch.manual_seed(0)
    a = dataset[(0, 7)][0][0]
    torch.manual_seed(123)  # the global RNG neither matters nor is consumed
    state = torch.get_rng_state()
    b = dataset[(0, 7)][0][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.equal(a, dataset[(1, 7)][0][0])
    assert not torch.equal(a, dataset[7][0][0])  # plain index: no augmentation (validation)


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12) -> Path:
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            Image.new("RGB", (size, size), (40 * i, 10 * j, 200)).save(root / name / f"{j}.png")
    return root


def test_image_folder_with_val_folder_and_labels(tmp_path: Path) -> None:
    train = make_image_folder(tmp_path / "train", {"cat": 4, "dog": 3})
    val = make_image_folder(tmp_path / "val", {"cat": 1, "dog": 2})
    recipe = image_recipe(
        {"source": "image_folder", "train": str(train), "val": str(val), "batch_size": 4}, out_features=2
    )
    data = load_data(recipe, build_model(recipe), CPU)
    assert (data.num_train, data.num_val) == (7, 3)
    assert data.class_names["cls"] == ["cat", "dog"]
    _, targets = next(iter(data.val))
    assert targets["cls"].tolist() == [0, 1, 1]


def test_image_folder_seeded_split_and_head_label_order(tmp_path: Path) -> None:
    train = make_image_folder(tmp_path / "train", {"a": 5, "b": 5})
    recipe = image_recipe(
        {"source": "image_folder", "train": str(train), "val_split": 0.2}, out_features=2, labels=["b", "a"]
    )
    data = load_data(recipe, build_model(recipe), CPU)
    assert (data.num_train, data.num_val) == (8, 2)
    assert data.class_names["cls"] == ["b", "a"]  # the head's label order wins
    # folder "a" is class 1 of the head
    examples = data.train.dataset.examples
    assert all(
        int(t) == (1 if Path(p).parent.name == "a" else 0)
        for p, t in zip(examples.inputs, examples.targets["cls"], strict=True)
    )


def test_image_folder_errors(tmp_path: Path) -> None:
    train = make_image_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    recipe = image_recipe({"source": "image_folder", "train": str(train)}, out_features=2)
    model = build_model(recipe)
    with pytest.raises(DataError, match=r"head 'cls' has 2 outputs, but .* has 3 classes"):
        load_data(recipe, model, CPU)
    (train / "c" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    recipe3 = image_recipe({"source": "image_folder", "train": str(train)}, out_features=3)
    with pytest.raises(DataError, match=r"unreadable image .*c/1\.png"):
        load_data(recipe3, build_model(recipe3), CPU)
    missing = image_recipe({"source": "image_folder", "train": str(tmp_path / "nope")}, out_features=2)
    with pytest.raises(DataError, match="does not exist"):
        load_data(missing, model, CPU)


def vector_model(features: int = 3, out: int = 2, task: str = "multiclass") -> SimpleNamespace:
    spec = InputSpec(kind="vector", features=features)
    return SimpleNamespace(
        input_spec=spec,
        tokenizer=None,
        head_info={"cls": HeadInfo(task, out, (out,))},
        example_inputs=lambda n=2: (torch.zeros(n, features),),
    )


def table_recipe(source: str, train: Path, **data) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": [{"name": "cls", "layers": [{"linear": {"out_features": 2}}], "loss": "cross_entropy"}],
            "data": {"source": source, "train": str(train), **data},
        }
    )


def test_csv_feature_columns_and_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("x,y,z,label\n" + "".join(f"{i},{i * 2},{-i},{'yes' if i % 2 else 'no'}\n" for i in range(10)))
    recipe = table_recipe("csv", path, feature_columns=["x", "y", "z"], batch_size=4, val_split=0.3)
    data = load_data(recipe, vector_model(), CPU)
    assert (data.num_train, data.num_val) == (7, 3)
    assert data.class_names["cls"] == ["no", "yes"]
    inputs, targets = next(iter(data.val))
    assert inputs[0].dtype == torch.float32 and inputs[0].shape == (3, 3)
    assert targets["cls"].tolist() == [int(x) % 2 for x in inputs[0][:, 0].tolist()]


def test_jsonl_label_column_absent_names_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"x": i, "y": i, "z": i, "target": i % 2}) + "\n" for i in range(6)))
    recipe = table_recipe("jsonl", path, feature_columns=["x", "y", "z"])
    with pytest.raises(DataError, match=r"column 'label' not found in .*d\.jsonl; columns are: x, y, z, target"):
        load_data(recipe, vector_model(), CPU)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_data(table_recipe("jsonl", bad, feature_columns=["x"]), vector_model(1), CPU)


def test_csv_text_column_is_tokenised_like_serving(tmp_path: Path, tiny_bert: Path) -> None:
    from surgery.preprocess import texts_to_batch

    path = tmp_path / "t.csv"
    rows = ["a good movie,1", "a very bad movie,0", "good,1", "bad bad,0"]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "transformers", "name": str(tiny_bert), "pretrained": True},
            "heads": [
                {
                    "name": "cls",
                    "input": "tokens",
                    "pool": "cls",
                    "layers": [{"linear": {"out_features": 2}}],
                    "loss": "cross_entropy",
                }
            ],
            "data": {"source": "csv", "train": str(path), "val": str(path), "text_column": "text", "batch_size": 4},
        }
    )
    model = build_model(recipe)
    data = load_data(recipe, model, CPU)
    (ids, mask), targets = next(iter(data.val))
    expected = texts_to_batch([r.split(",")[0] for r in rows], model.tokenizer, model.input_spec)
    assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])
    assert targets["cls"].tolist() == [1, 0, 1, 0]
    model.eval()
    assert model(ids, mask)["cls"].shape == (4, 2)


def test_synthetic_follows_model_input_and_heads(digits_model) -> None:
    recipe = image_recipe({"source": "synthetic", "synthetic": {"num_samples": 20, "num_classes": 3}, "batch_size": 8})
    data = load_data(recipe, digits_model, CPU)
    assert (data.num_train, data.num_val) == (20, 5)
    inputs, targets = next(iter(data.train))
    assert inputs[0].shape == (8, 1, 16, 16)
    assert int(targets["cls"].max()) < 3


def _with_bad_files(tmp_path: Path) -> Path:
    train = make_image_folder(tmp_path / "train", {"a": 4, "b": 4})
    (train / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # garbage
    good = (train / "b" / "0.png").read_bytes()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(train / "b" / "3.png")
    (train / "b" / "3.png").write_bytes((train / "b" / "3.png").read_bytes()[:-40])  # truncated
    assert good  # the others stay readable
    return train


def test_on_bad_file_error_names_the_file_and_the_setting(tmp_path: Path) -> None:
    recipe = image_recipe({"source": "image_folder", "train": str(_with_bad_files(tmp_path))}, out_features=2)
    with pytest.raises(DataError, match=r"unreadable image .*a/1\.png: .*set `data.on_bad_file: skip`"):
        load_data(recipe, build_model(recipe), CPU)


def test_on_bad_file_skip_leaves_unreadable_images_out_and_lists_them(tmp_path: Path) -> None:
    train = _with_bad_files(tmp_path)
    data_cfg = {"source": "image_folder", "train": str(train), "on_bad_file": "skip", "val_split": 0.25}
    recipe = image_recipe(data_cfg, out_features=2)
    data = load_data(recipe, build_model(recipe), CPU)
    assert sorted(Path(f).relative_to(train).as_posix() for f, _ in data.skipped) == ["a/1.png", "b/3.png"]
    assert data.num_train + data.num_val == 6
    for _ in data.train:  # every remaining file decodes
        pass


def test_skipped_files_reach_the_run_summary_and_metrics_jsonl(tmp_path: Path, capsys) -> None:
    from surgery.train import fit

    train = _with_bad_files(tmp_path)
    data_cfg = {
        "source": "image_folder",
        "train": str(train),
        "on_bad_file": "skip",
        "batch_size": 4,
        "val_split": 0.34,
    }
    recipe = image_recipe(data_cfg, out_features=2).model_copy(deep=True)
    recipe.train.epochs = 1
    recipe.monitor.progress = "plain"
    recipe.monitor.tensorboard = False
    fit(recipe, tmp_path / "run")
    out = capsys.readouterr()
    summary = (out.out + out.err).split("run summary")[-1]
    assert "skipped files" in summary and "2: 1.png, 3.png" in summary
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [line for line in lines if "skipped" in line]
    assert record["data/skipped_files"] == 2
    assert sorted(Path(item["file"]).name for item in record["skipped"]) == ["1.png", "3.png"]
    assert all(item["why"] for item in record["skipped"])


def test_normalisation_values_are_one_for_every_channel_or_one_per_channel() -> None:
    from surgery.preprocess import normalise

    pixels = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    spec = InputSpec(kind="image", channels=3, size=(2, 2), mean=(0.5,), std=(0.5,))
    assert torch.equal(normalise(pixels, spec), torch.ones(3, 2, 2))
    wrong = InputSpec(kind="image", channels=3, size=(2, 2), mean=(0.5, 0.1), std=(0.5,))
    with pytest.raises(DataError, match="2 normalisation values for 3 channels; give 1 or 3"):
        normalise(pixels, wrong)  # never silently the first value for every channel


def test_images_checked_once_are_not_opened_again_until_they_change(tmp_path: Path, monkeypatch) -> None:
    """A rebuild on the same images skips the per-file check (remembered by size, mtime and inode
    in the cache folder); a file rewritten or replaced since is checked again, and a bad one is
    still caught."""
    import surgery.data_images as data_images
    from surgery.data import verify_images

    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    train = make_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    files = sorted(train.rglob("*.png"))
    opened: list[str] = []
    real_open = data_images.Image.open
    monkeypatch.setattr(data_images.Image, "open", lambda p, *a: opened.append(str(p)) or real_open(p, *a))
    assert verify_images(files) == [] and len(opened) == 6
    opened.clear()
    assert verify_images(files) == [] and opened == []  # remembered
    assert verify_images(files, skip=True) == [] and len(opened) == 12  # `skip` needs a full decode: checked again
    opened.clear()
    assert verify_images(files) == [] and opened == []  # the decode check covers `error` too
    files[0].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # replaced in place: new size and mtime
    with pytest.raises(DataError, match=r"unreadable image .*a/0\.png"):
        verify_images(files)
    assert opened == [str(files[0])]
    # a copy that keeps size and mtime (`cp -p`, `rsync -a`) renamed over a checked file: a new inode
    good = files[1].read_bytes()
    copy = files[1].with_suffix(".tmp")
    copy.write_bytes(good[:40] + bytes(b ^ 0xFF for b in good[40:50]) + good[50:])  # same size, bad CRC
    stat = files[1].stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    copy.replace(files[1])
    opened.clear()
    with pytest.raises(DataError, match=r"unreadable image .*a/1\.png"):
        verify_images(files[1:])
    assert opened == [str(files[1])]
    files[1].write_bytes(good)
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(files[2]))  # a cache that cannot be a folder is only slower
    opened.clear()
    assert verify_images(files[1:]) == [] and len(opened) == 5


def test_image_folder_lists_files_in_path_order_through_nested_folders(tmp_path: Path) -> None:
    train = make_image_folder(tmp_path / "train", {"a": 2, "b": 1})
    (train / "a" / "z").mkdir()
    (train / "a-x").mkdir()  # '-' sorts before '/' as a string; by path parts "a" still comes first
    for name in ("a/z/0.png", "a/0-1.png", "a-x/0.png", "a/.hidden.png", "a/notes.txt"):
        Image.new("RGB", (4, 4)).save(train / name, format="PNG")
    from surgery.data_images import _image_files

    classes, files = _image_files(train, "data.train")
    assert classes == ["a", "a-x", "b"]
    assert [Path(p).relative_to(train).as_posix() for p, _ in files] == [
        "a/0-1.png", "a/0.png", "a/1.png", "a/z/0.png", "a-x/0.png", "b/0.png",
    ]  # fmt: skip
    assert [Path(p).relative_to(train).as_posix() for p, _ in files] == [
        p.relative_to(train).as_posix() for p in sorted(Path(path) for path, _ in files)
    ]  # pathlib's order, which the seeded splits of earlier runs were drawn from
