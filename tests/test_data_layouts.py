"""Each shipped data layout (tagged `data-layout`) builds from its tiny data, evaluates on it,
predicts offline, and serves a prediction equal to the offline one; a build that fails on its data
leaves no run folder."""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from surgery.errors import DataError
from surgery.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
LAYOUTS = [
    "tiles-csv-images",
    "tiles-multilabel",
    "tiles-regression",
    "reviews-parquet-text",
    "tabular-features",
    "tiles-hf-dataset",
]
TINY = ["train.epochs=1", "train.max_steps=2", "export.formats=[safetensors]", "monitor.tensorboard=false"]


def test_every_layout_recipe_is_tagged_and_names_its_columns() -> None:
    for name in LAYOUTS:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        assert "data-layout" in recipe.tags, name
        text = (RECIPES / f"{name}.yaml").read_text()
        assert "# Reads " in text, name  # `surgery recipes show` prints which columns it reads


@pytest.fixture(scope="module")
def deploy(serve_http):
    """Serve one bundle on the shared Ray Serve at /<name>; the app is deleted when the block ends."""
    from ray import serve

    from serve.app import build_app

    @contextlib.contextmanager
    def deployed(bundle: Path, name: str) -> Iterator[str]:
        common = {"num_cpus": 0.5, "threads": 1, "solo_threads": 1, "replicas": 1, "time_solo_threads": False}
        serve.run(build_app({"bundles": [str(bundle)], **common}), name=name, route_prefix=f"/{name}")
        try:
            yield f"{serve_http}/{name}"
        finally:
            serve.delete(name)

    return deployed


def _cli(*args: str) -> str:
    """`surgery ARGS` through the Typer app, in this process (the command functions a user's
    `surgery` runs); a failure shows its output."""
    from typer.testing import CliRunner

    from cli import app

    done = CliRunner().invoke(app, [str(a) for a in args])
    assert done.exit_code == 0, f"surgery {' '.join(map(str, args))}: {done.output}\n{done.exception!r}"
    return done.output


# What each layout predicts offline, from its own data: the table it trained on (its input column
# found from the bundled recipe), or for the Hugging Face folder the tiles' image files.
PREDICT_INPUTS = {
    "tiles-csv-images": "tiles/labels.csv",
    "tiles-multilabel": "tiles/tags.csv",
    "tiles-regression": "tiles/brightness.csv",
    "reviews-parquet-text": "reviews.parquet",
    "tabular-features": "tabular.csv",
    "tiles-hf-dataset": "tiles/images",
}
EVALUATE_DATA = {
    "tiles-csv-images": "tiles/labels.csv",
    "tiles-multilabel": "tiles/tags.csv",
    "tiles-regression": "tiles/brightness.csv",
    "reviews-parquet-text": "reviews.parquet",
    "tabular-features": "tabular.csv",
    "tiles-hf-dataset": "tiles-hf",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_builds_evaluates_predicts_and_serves_the_same_prediction(name: str, tmp_path: Path, deploy) -> None:
    """The user's path for each layout: `surgery build`, `surgery evaluate RUN --data <its data>`,
    `surgery predict BUNDLE <its data> --out preds.jsonl`, then the bundle served and the same
    inputs POSTed to /v1 and /v2: the served prediction equals the offline one."""
    data = RECIPES / "data"
    formats = ["--set", "export.formats=[safetensors,onnx]"] if name == "tabular-features" else []
    sets = [arg for value in TINY for arg in ("--set", value)]
    _cli("build", RECIPES / f"{name}.yaml", "--runs", tmp_path / "runs", *sets, *formats)
    run = (tmp_path / "runs" / name / "latest").resolve()
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    heads = manifest["heads"]
    if name == "tiles-multilabel":
        assert heads[0]["task"] == "multilabel" and heads[0]["labels"] == ["blue", "dot", "green", "red", "striped"]
    if name == "tabular-features":
        _assert_normalisation_and_onnx_came_with_the_weights(run / "bundle")

    printed = _cli("evaluate", run, "--data", data / EVALUATE_DATA[name])
    (report,) = (run / "evaluations").glob("*/evaluation.json")
    evaluation = json.loads(report.read_text())
    assert f"evaluation: {report.parent}" in printed and evaluation["samples"] > 0
    assert set(evaluation["heads"]) == {h["name"] for h in heads}
    for head in heads:
        metrics = evaluation["heads"][head["name"]]["metrics"]
        assert metrics and all(math.isfinite(v) for v in metrics.values()), (head["name"], metrics)

    preds = tmp_path / "preds.jsonl"
    _cli("predict", run / "bundle", data / PREDICT_INPUTS[name], "--out", preds, "--top-k", "3")
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    good = [row for row in rows if not row["error"]]
    assert len(good) >= 20 and all(row["input"] for row in good)
    if name == "tabular-features":  # the table's missing cell (file line 9) is its row's error, the rest predicted
        assert [row["error"] for row in rows if row["error"]] == ["row 8: empty petal_length"]
    items = _served_inputs(name, good, data / PREDICT_INPUTS[name])

    with deploy(run / "bundle", name) as url:
        v1 = httpx.post(f"{url}/v1/models/{name}:predict", timeout=120, **items["v1"])
        assert v1.status_code == 200, v1.text
        v2 = httpx.post(f"{url}/v2/models/{name}/infer", timeout=120, json={"inputs": [items["v2"]]})
        assert v2.status_code == 200, v2.text
    predictions = v1.json()["predictions"]
    assert len(predictions) == len(good)
    v2_outputs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in v2.json()["outputs"]}
    for head in heads:
        served = np.asarray([p[head["name"]]["output"] for p in predictions], np.float32)
        np.testing.assert_allclose(v2_outputs[head["name"]].reshape(served.shape), served, rtol=1e-4, atol=1e-5)
        for offline, prediction in zip(good, predictions, strict=True):
            _assert_same_prediction(head, offline, prediction[head["name"]])


def _assert_normalisation_and_onnx_came_with_the_weights(bundle: Path) -> None:
    """The normalisation fitted on the training split is in the weights, and model.onnx agrees."""
    import onnxruntime as ort
    import torch

    from surgery.bundle import load_bundle

    model = load_bundle(bundle).model.eval()
    assert not torch.equal(model.backbone.mean, torch.zeros(4)) and float(model.backbone.std.min()) > 0
    rows = torch.tensor([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.5, 2.0]])
    with torch.inference_mode():
        out = model(rows)["species"].numpy()
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: rows.numpy()})[0]
    np.testing.assert_allclose(onnx_out, out, rtol=1e-4, atol=1e-5)


def _served_inputs(name: str, rows: list[dict], source: Path) -> dict:
    """The inputs offline predict read (its rows, in order) as a /v1 request and a /v2 tensor."""
    if name == "reviews-parquet-text":
        import pyarrow.parquet as pq

        texts = pq.read_table(source, columns=["review"]).column("review").to_pylist()
        texts = [texts[int(row["input"].rsplit(":", 1)[1]) - 1] for row in rows]
        return {
            "v1": {"json": {"inputs": texts}},
            "v2": {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts},
        }
    if name == "tabular-features":
        import csv

        with source.open() as handle:
            table = list(csv.DictReader(handle))
        columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        features = [[float(table[int(row["input"].rsplit(":", 1)[1]) - 1][c]) for c in columns] for row in rows]
        flat = [v for vector in features for v in vector]
        return {
            "v1": {"json": {"inputs": features}},
            "v2": {"name": "features", "datatype": "FP32", "shape": [len(features), 4], "data": flat},
        }
    folder = source.parent if source.is_file() else Path()
    images = [(folder / row["input"]).read_bytes() for row in rows]
    return {
        "v1": {"files": [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]},
        "v2": {
            "name": "image",
            "datatype": "BYTES",
            "shape": [len(images)],
            "data": [base64.b64encode(image).decode() for image in images],
        },
    }


def _assert_same_prediction(head: dict, offline: dict, served: dict) -> None:
    """One input's head: the same ranked labels and probabilities (classification, multilabel's
    labels over 0.5 too) or the same values (regression), within 1e-4."""
    name = head["name"]
    if head["task"] in ("multiclass", "binary", "multilabel"):
        ranked = served["top_k"]
        assert ranked, (name, served)
        for rank, entry in enumerate(ranked[:3], 1):
            assert offline[f"{name}_label_{rank}"] == entry["label"], (name, rank, offline, served)
            assert offline[f"{name}_prob_{rank}"] == pytest.approx(entry["probability"], abs=1e-4)
        if head["task"] == "multilabel":
            assert offline[f"{name}_labels"] == "|".join(served["labels"])
        return
    values = served["output"]
    if len(values) == 1:
        assert offline[name] == pytest.approx(values[0], abs=1e-4)
    else:
        assert [offline[f"{name}_{i}"] for i in range(1, len(values) + 1)] == pytest.approx(values, abs=1e-4)


def test_a_data_error_before_the_first_step_leaves_no_run_folder(tmp_path: Path) -> None:
    from surgery.build import build_command

    table = tmp_path / "t.csv"
    table.write_text("a,b,c,d,species\n1,2,3,4,x\n1,2,,4,y\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (RECIPES / "tabular-features.yaml")
        .read_text()
        .replace("data/tabular.csv", str(table))
        .replace("[sepal_length, sepal_width, petal_length, petal_width]", "[a, b, c, d]")
        .replace("on_bad_row: skip", "on_bad_row: error")
    )
    runs = tmp_path / "runs"
    (runs / "tabular-features" / "old").mkdir(parents=True)
    (runs / "tabular-features" / "latest").symlink_to("old")
    with pytest.raises(DataError, match=r"t\.csv:3:c: empty cell"):
        build_command(recipe, ["monitor.tensorboard=false"], runs_root=runs)
    assert sorted(p.name for p in (runs / "tabular-features").iterdir()) == ["latest", "old"]
    assert (runs / "tabular-features" / "latest").resolve().name == "old"
