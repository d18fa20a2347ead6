"""Hugging Face datasets stay memory-mapped: a split is checked a chunk at a time and its rows are
read when a batch asks, so the memory a dataset costs does not grow with its text or features;
and the samples, targets, skipped rows and errors are those of the same table read as Parquet."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from surgery.data import ExampleDataset, load_examples
from surgery.data_hf import ArrowRows
from surgery.errors import DataError
from surgery.heads import HeadInfo
from surgery.inputs import InputSpec
from surgery.schema import Recipe

datasets = pytest.importorskip("datasets")

FEATURES = [f"f{k}" for k in range(8)]


def model_for(kind: str, **heads: tuple[str, int]) -> SimpleNamespace:
    spec = InputSpec(kind="text", max_length=8) if kind == "text" else InputSpec(kind="vector", features=len(FEATURES))
    return SimpleNamespace(
        input_spec=spec, tokenizer=None, head_info={name: HeadInfo(t, n, (n,)) for name, (t, n) in heads.items()}
    )


def recipe_for(data: dict, heads: list[dict]) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": [{"layers": [{"linear": {"out_features": 2}}], "loss": "cross_entropy", **h} for h in heads],
            "data": data,
        }
    )


def text_of(i: int, words: int = 4) -> str:
    return f"row {i} " + "lorem ipsum dolor sit amet " * words


def test_a_big_hf_dataset_costs_no_python_object_per_row(tmp_path: Path) -> None:
    import numpy as np

    n = 50_000
    columns = {"text": [text_of(i, 48) for i in range(n)], "label": [("pos", "neg", "mid")[i % 3] for i in range(n)]}
    columns |= {c: np.arange(n, dtype=np.float64) * (k + 1) for k, c in enumerate(FEATURES)}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ds"))
    text_bytes = sum(len(t) for t in columns["text"])  # 66 MB of text; the features are 3.2 MB of float64
    del columns

    for kind, data in (("text", {"text_column": "text"}), ("vector", {"feature_columns": FEATURES})):
        recipe = recipe_for({"source": "hf", "train": str(tmp_path / "ds"), **data}, [{"name": "cls"}])
        model = model_for(kind, cls=("multiclass", 3))
        tracemalloc.start()
        try:
            train, val = load_examples(recipe, model)
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Python objects held: row numbers (8 bytes a row), not the text (66 MB) nor 400k floats (13 MB as
        # lists); at the peak, one chunk of rows (`surgery.data_hf._CHUNK`) besides
        assert held < 4 * 8 * n and peak < text_bytes / 5, (kind, held, peak)
        rows = train.inputs if kind == "text" else train.inputs[0]
        assert isinstance(rows, ArrowRows) and (len(train), len(val)) == (40_000, 10_000)
        # a DataLoader worker gets the row numbers and the files' paths, not the data
        assert len(pickle.dumps(rows)) < rows.rows.nbytes + 100_000
        source = int(rows.rows[12_345])
        sample, targets = ExampleDataset(train, model.input_spec)[12_345]
        if kind == "text":
            assert sample == text_of(source, 48)
        else:
            assert sample[0].tolist() == [float(source * (k + 1)) for k in range(len(FEATURES))]
        assert train.class_names["cls"][int(targets["cls"])] == ("pos", "neg", "mid")[source % 3]


def _write_both(tmp_path: Path, rows: dict[str, list]) -> tuple[Path, Path]:
    import pyarrow.parquet as pq

    table = datasets.Dataset.from_dict(rows)
    table.save_to_disk(str(tmp_path / "ds"))
    pq.write_table(table.data.table, tmp_path / "t.parquet")
    return tmp_path / "ds", tmp_path / "t.parquet"


@pytest.mark.parametrize("kind", ["text", "vector"])
def test_hf_reads_the_samples_a_parquet_table_of_the_same_rows_reads(tmp_path: Path, kind: str) -> None:
    n = 60
    rows: dict[str, list] = {"text": [text_of(i) if i % 13 else "  " for i in range(n)]}
    rows |= {c: [None if (i, k) == (7, 2) else float(i * 3 + k) for i in range(n)] for k, c in enumerate(FEATURES)}
    rows |= {"y": [str(i % 4) for i in range(n)], "tag": [("a", "b")[i % 2] for i in range(n)]}
    rows |= {"score": [i / 7 for i in range(n)]}
    ds, parquet = _write_both(tmp_path, rows)
    heads = [{"name": "digit", "target": "y"}, {"name": "tag", "target": "tag"}, {"name": "score", "target": "score"}]
    model = model_for(kind, digit=("multiclass", 4), tag=("multiclass", 2), score=("regression", 1))
    data = {"text_column": "text"} if kind == "text" else {"feature_columns": FEATURES}
    data |= {"on_bad_row": "skip", "limit_train": 30}
    hf = load_examples(recipe_for({"source": "hf", "train": str(ds), **data}, heads), model)
    table = load_examples(recipe_for({"source": "parquet", "train": str(parquet), **data}, heads), model)
    for got, want in zip(hf, table, strict=True):
        assert len(got) == len(want) and got.class_names == want.class_names
        assert [row for row, _ in got.skipped] == [w.replace(str(parquet), f"{ds}[train]") for w, _ in want.skipped]
        for name, target in want.targets.items():
            assert torch.equal(got.targets[name], target), name
        hf_set, table_set = ExampleDataset(got, model.input_spec), ExampleDataset(want, model.input_spec)
        keys = list(range(len(want)))
        batch = hf_set.__getitems__(keys)  # the batched read the DataLoader makes
        for key, (sample, targets) in zip(keys, batch, strict=True):
            expected, expected_targets = table_set[key]
            single, _ = hf_set[key]
            if kind == "text":
                assert sample == expected == single
            else:
                assert torch.equal(sample[0], expected[0]) and torch.equal(single[0], expected[0])
            assert all(torch.equal(targets[k], expected_targets[k]) for k in targets)


def test_a_bad_row_past_the_first_chunk_names_its_row(tmp_path: Path) -> None:
    n = 12_000
    rows = {"text": [text_of(i) if i != 10_000 else " " for i in range(n)], "y": [("a", "b")[i % 2] for i in range(n)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    data = {"source": "hf", "train": str(tmp_path / "ds"), "text_column": "text", "label_column": "y"}
    recipe = recipe_for(data, [{"name": "cls"}])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'ds'}\[train\]:10001:text: empty cell; set"):
        load_examples(recipe, model_for("text", cls=("multiclass", 2)))
