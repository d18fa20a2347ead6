"""Offline `surgery predict BUNDLE INPUTS...`: files, folders, globs and tables in; one row per
input out (CSV, JSONL, Parquet or a table), top-k per head, unreadable inputs in their own row."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import surgery_cli, write_digit_folder
from PIL import Image

import cli

TINY = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - {name: cls, layers: [{linear: {out_features: 3}}], loss: cross_entropy, labels: [bird, cat, dog]}
  - {name: score, layers: [{linear: {out_features: 1}}], loss: bce_with_logits}
  - {name: age, layers: [{linear: {out_features: 1}}], loss: mse}
"""


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(TINY)
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    return export_bundle(build_model(recipe, load_weights=False), recipe, out, formats=["safetensors"])


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (30 + i, 20), (60 * i, 10, 200)).save(folder / f"{i}.png")
    Image.new("L", (12, 12), 90).save(folder / "more" / "grey.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def run(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out, err = capsys.readouterr()
    return done.value.code, out, err


def _read(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_folder_to_a_file(tiny_bundle, images, tmp_path, capsys, monkeypatch, suffix):
    out = tmp_path / f"preds{suffix}"
    code, said, err = run(
        capsys, monkeypatch, "predict", str(tiny_bundle), str(images), "--out", str(out), "--top-k", "2"
    )
    assert code == 0, err
    assert "predicted 6 inputs" in said and "1 unreadable" in said and str(out) in said
    rows = _read(out)
    assert [Path(r["input"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png", "broken.png", "grey.jpg"]
    good, broken = rows[0], rows[4]
    assert good["cls_label_1"] in ("bird", "cat", "dog") and good["cls_label_2"] != good["cls_label_1"]
    assert "cls_label_3" not in good  # --top-k 2
    assert float(good["cls_prob_1"]) >= float(good["cls_prob_2"])
    assert {good["score_label_1"], good["score_label_2"]} == {"0", "1"}  # a binary head as two classes
    if suffix != ".csv":
        assert isinstance(good["age"], float)  # a regression value is a number
        assert good["error"] is None
    assert "not a readable image" in broken["error"] and broken["cls_label_1"] in ("", None)


def test_files_globs_and_a_table_to_the_terminal(tiny_bundle, images, tmp_path, capsys, monkeypatch):
    table = tmp_path / "list.csv"
    table.write_text(
        "\ufeffimage,note\nimages/0.png,a\nimages/gone.png,b\n,c\n"
    )  # a BOM, a missing file, an empty cell
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys, monkeypatch, "predict", str(tiny_bundle), "images/1.png", "images/*.png", str(table), "--top-k", "1"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["input", "cls_label_1", "cls_prob_1", "score_label_1", "score_prob_1", "age", "error"]
    assert len(lines) == 1 + 1 + 5 + 3
    assert "no such file" in out and "row 3: empty image" in out
    assert "predicted 9 inputs" in err


def test_same_rows_as_the_model_directly(tiny_bundle, images):
    """The offline rows are the bundle's model on the bundle's preprocessing, batch or not."""
    import torch

    from surgery.bundle import load_bundle
    from surgery.predict import PredictSettings, predicted_batches
    from surgery.predict_inputs import expand_inputs
    from surgery.preprocess import images_to_batch
    from surgery.runner import open_runner

    runner = open_runner(tiny_bundle)
    entries = expand_inputs([str(images / "0.png"), str(images / "1.png")], runner.spec)
    rows = [r for batch in predicted_batches(runner, entries, PredictSettings(batch_size=1, workers=0)) for r in batch]
    loaded = load_bundle(tiny_bundle)
    with torch.inference_mode():
        pil = [Image.open(images / f"{i}.png") for i in range(2)]
        outputs = loaded.model(images_to_batch(pil, loaded.input_spec))
    probs = outputs["cls"].softmax(-1)
    for i, row in enumerate(rows):
        assert row["cls_prob_1"] == pytest.approx(float(probs[i].max()), abs=1e-5)
        assert row["age"] == pytest.approx(float(outputs["age"][i, 0]), abs=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        {"channels": 3, "size": (20, 24), "crop_pct": 0.875},
        {"channels": 1, "size": (16, 16), "mean": (0.5,), "std": (0.25,), "interpolation": "bicubic"},
        {"channels": 4, "size": (9, 7), "mean": (0.1,), "std": (0.3,)},
    ],
)
def test_a_batch_is_normalised_once_to_the_same_numbers(spec):
    """Offline predict normalises whole batches of uint8 pixels; the tensor is exactly the one the
    per-image eval transform (serving's, evaluation's) gives."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from surgery.inputs import InputSpec
    from surgery.predict_batch import model_inputs, row_transform
    from surgery.preprocess import image_eval_transform

    spec = InputSpec(kind="image", **spec)
    rng = np.random.default_rng(1)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (31, 17, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (12, 40), dtype=np.uint8), "L"),
        Image.fromarray(rng.integers(0, 65536, (10, 10), dtype=np.uint16)),  # 16-bit greyscale
    ]
    (batched,) = model_inputs(SimpleNamespace(spec=spec), [row_transform(spec)(p) for p in pictures])
    single = torch.stack([image_eval_transform(spec)(p) for p in pictures])
    assert batched.dtype == single.dtype == torch.float32 and torch.equal(batched, single)


def test_refusals(tiny_bundle, tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, monkeypatch, "predict", str(tiny_bundle), "x.png", "--out", str(tmp_path / "p.xlsx"))
    assert code == 2 and "write .csv, .jsonl or .parquet" in err
    code, _, err = run(capsys, monkeypatch, "predict", str(tiny_bundle), str(tmp_path / "*.png"))
    assert code == 2 and "matches no files" in err
    table = tmp_path / "t.csv"
    table.write_text("name\na.png\n")
    code, _, err = run(capsys, monkeypatch, "predict", str(tiny_bundle), str(table))
    assert code == 2 and "no image column" in err and "--column" in err
    code, _, err = run(capsys, monkeypatch, "predict", str(tmp_path / "nothing"), "x.png")
    assert code == 2 and "no such bundle" in err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")  # what `save_to_disk` writes beside its Arrow files
    code, _, err = run(capsys, monkeypatch, "predict", str(tiny_bundle), str(tmp_path / "hf"))
    assert code == 2 and "Hugging Face `datasets` folder" in err and "surgery evaluate RUN --data" in err


def test_a_url_is_sent_to_the_server(free_port, capsys, monkeypatch, tmp_path):
    code, _, err = run(capsys, monkeypatch, "predict", f"http://127.0.0.1:{free_port()}", "hello")
    assert code == 2 and "cannot reach" in err  # the HTTP client, not the offline path


@pytest.mark.slow
def test_build_evaluate_predict(quickstart_run, tmp_path):
    """The user's path: build, then predict on a folder, a glob and a CSV, to each format."""
    data = write_digit_folder(tmp_path / "digits", count=20)
    (data / "3" / "junk.png").write_text("not an image")
    table = tmp_path / "list.csv"
    table.write_text("path\n" + "".join(f"{p.relative_to(tmp_path)}\n" for p in sorted(data.rglob("*.png"))[:5]))
    bundle = quickstart_run / "bundle"
    for out, args in (
        ("p.csv", [str(data)]),
        ("p.jsonl", [str(data / "*" / "*.png")]),
        ("p.parquet", [str(table)]),
    ):
        done = surgery_cli("predict", str(bundle), *args, "--out", str(tmp_path / out), "--top-k", "3")
        assert done.returncode == 0, done.stderr[-2000:]
        rows = _read(tmp_path / out)
        assert len(rows) == (21 if out != "p.parquet" else 5)
        ok = [r for r in rows if not r["error"]]
        assert all(r["digit_label_1"] in [str(i) for i in range(10)] for r in ok)
        assert all(float(r["digit_prob_1"]) >= float(r["digit_prob_3"]) for r in ok)
        if out != "p.parquet":
            (bad,) = [r for r in rows if r["error"]]
            assert bad["input"].endswith("junk.png") and "not a readable image" in bad["error"]


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(TINY)
    out = tmp_path_factory.mktemp("tiny-onnx") / "bundle"
    return export_bundle(build_model(recipe, load_weights=False), recipe, out, formats=["safetensors", "onnx"])


def test_offline_prediction_runs_on_the_runtime_serving_would_choose(onnx_bundle, tiny_bundle, images, tmp_path):
    """`--runtime` (default: the recipe's serve.runtime, else auto) picks the runtime as a serving
    replica does; ONNX Runtime's rows agree with eager torch's within the export tolerance."""
    from surgery.errors import SurgeryError
    from surgery.predict import PredictSettings, predict_command
    from surgery.runner import open_runner

    auto = open_runner(onnx_bundle)
    assert auto.choice.requested == "auto" and auto.choice.runtime in ("torch", "onnxruntime")
    assert set(auto.choice.timing_ms) == {"torch", "onnxruntime"}  # both timed, the faster kept
    rows = {}
    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / f"{runtime}.jsonl"
        settings = PredictSettings(workers=0, runtime=runtime)
        predict_command(onnx_bundle, [str(images)], out=out, settings=settings, engine="local")
        rows[runtime] = _read(out)
    assert open_runner(onnx_bundle, "onnxruntime").choice.runtime == "onnxruntime"
    assert [r["error"] for r in rows["torch"]] == [r["error"] for r in rows["onnxruntime"]]
    readable = [(t, o) for t, o in zip(rows["torch"], rows["onnxruntime"], strict=True) if not t["error"]]
    assert readable
    for by_torch, by_ort in readable:
        assert by_torch["cls_label_1"] == by_ort["cls_label_1"]
        assert float(by_torch["age"]) == pytest.approx(float(by_ort["age"]), abs=1e-4)
    with pytest.raises(SurgeryError, match=r"model\.onnx"):  # a bundle without it cannot run there
        open_runner(tiny_bundle, "onnxruntime")
    with pytest.raises(SurgeryError, match=r"--runtime tensorrt: choose one of auto, torch"):
        open_runner(tiny_bundle, "tensorrt")


def test_a_table_is_read_as_training_reads_tables(tiny_bundle, images, tmp_path):
    """The same bounded reader as `data.source: csv`: a ragged row is that row's error, in order."""
    from surgery.predict import PredictSettings, predict_command

    table = tmp_path / "list.csv"
    table.write_text(f"path,note\n{images / '0.png'},a\n{images / '1.png'},b,extra\n{images / '0.png'},c\n")
    out = tmp_path / "p.jsonl"
    predict_command(tiny_bundle, [str(table)], out=out, settings=PredictSettings(workers=0), engine="local")
    rows = _read(out)
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert "3 fields, the header has 2" in rows[1]["error"]


def test_a_table_s_image_column_defaults_to_the_one_the_model_was_trained_from(tmp_path):
    """A Kaggle-style `image_id` column (the recipe's `data.image_column`) is found without
    --column, and wins over a usual name (`path`) that the same table also has."""
    from surgery.inputs import InputSpec
    from surgery.predict_inputs import expand_inputs
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(TINY + "data: {source: csv, train: t.csv, image_column: image_id}\n")
    table = tmp_path / "labels.csv"
    table.write_text("path,image_id,label\nother.png,images/000.png,red\n")
    (entry,) = expand_inputs([str(table)], InputSpec(kind="image", size=(32, 32)), recipe=recipe)
    assert entry.name == "images/000.png" and entry.item == tmp_path / "images" / "000.png"


def test_a_feature_row_with_a_missing_cell_names_that_cell_only(tmp_path):
    from surgery.inputs import InputSpec
    from surgery.predict_inputs import expand_inputs

    table = tmp_path / "f.csv"
    table.write_text("a,b,c\n1,2,3\n4,,6\n")
    rows = expand_inputs([str(table)], InputSpec(kind="vector", features=3), column="a,b,c")
    assert [(r.item, r.error) for r in rows] == [([1.0, 2.0, 3.0], None), (None, "row 2: empty b")]
