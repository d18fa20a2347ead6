"""Each shipped data layout (tagged `data-layout`) builds from its tiny data, and its bundle loads
and predicts through serving's decoding; a build that fails on its data leaves no run folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

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


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_builds_and_its_bundle_predicts(name: str, tmp_path: Path) -> None:
    from serve.decode import RowPreparer
    from surgery.build import build_command
    from surgery.bundle import load_bundle
    from surgery.preprocess import image_eval_transform, texts_to_batch

    if name == "tiles-hf-dataset" and importlib.util.find_spec("datasets") is None:
        pytest.skip("the hf extra (datasets) is not installed")
    formats = ["export.formats=[safetensors,onnx]"] if name == "tabular-features" else []
    run = build_command(RECIPES / f"{name}.yaml", [*TINY, *formats], runs_root=tmp_path / "runs")
    loaded = load_bundle(run / "bundle")
    model, spec = loaded.model.eval(), loaded.input_spec
    if spec.kind == "text":
        inputs = texts_to_batch(["works perfectly", "the worst"], loaded.tokenizer, spec)
    else:
        transform = image_eval_transform(spec) if spec.kind == "image" else None
        if spec.kind == "image":
            png = next((RECIPES / "data" / "tiles" / "images").glob("*.png")).read_bytes()
            rows = RowPreparer(spec, transform)([png, png])
        else:
            rows = RowPreparer(spec)([[5.0, 3.4, 1.5, 0.2], [6.6, 3.0, 5.5, 2.0]])  # /v1 `inputs`, /v2 `features`
        inputs = (torch.stack(rows),)
    with torch.inference_mode():
        out = model(*inputs)
    head = loaded.manifest["heads"][0]
    assert out[head["name"]].shape[0] == 2 and torch.isfinite(out[head["name"]]).all()
    if name == "tabular-features":  # the normalisation fitted on the training split came with the weights
        assert not torch.equal(model.backbone.mean, torch.zeros(4)) and float(model.backbone.std.min()) > 0
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime as ort

            session = ort.InferenceSession(str(run / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
            onnx_out = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy().astype(np.float32)})[0]
            np.testing.assert_allclose(onnx_out, out[head["name"]].numpy(), rtol=1e-4, atol=1e-5)
    if name == "tiles-multilabel":
        assert head["task"] == "multilabel" and head["labels"] == ["blue", "dot", "green", "red", "striped"]


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
