"""`surgery evaluate`: metrics, per-class scores and confusion matrices of a bundle on data, in
`evaluations/<name>-<time>/`, without changing the run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import surgery_cli, write_digit_folder
from PIL import Image

TINY = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - {name: cls, layers: [{linear: {out_features: 3}}], loss: cross_entropy, labels: [bird, cat, dog]}
"""


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "evaluations" not in p.relative_to(folder).parts
    }


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(TINY)
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    return export_bundle(build_model(recipe, load_weights=False), recipe, out, formats=["safetensors"])


def _images(folder: Path, classes: dict[str, int]) -> Path:
    for label, count in classes.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(folder / label / f"{i}.png")
    return folder


def test_a_bundle_on_a_folder(tiny_bundle, tmp_path):
    from surgery.evaluate import evaluate_command

    data = _images(tmp_path / "test", {"cat": 3, "dog": 2})  # a subset of the bundle's classes
    printed = evaluate_command(tiny_bundle, data=data, split=None, out=tmp_path / "out", batch_size=2)
    (folder,) = (tmp_path / "out" / "evaluations").iterdir()
    assert folder.name.startswith("test-") and f"evaluation: {folder}" in printed
    report = json.loads((folder / "evaluation.json").read_text())
    head = report["heads"]["cls"]
    assert report["samples"] == 5 and set(head["metrics"]) == {"accuracy", "f1_macro"}
    assert head["classes"] == ["bird", "cat", "dog"]
    assert [head["per_class"][c]["support"] for c in head["classes"]] == [0, 3, 2]
    assert sum(map(sum, head["confusion_matrix"])) == 5
    assert Image.open(folder / "confusion_cls.png").format == "PNG"
    assert "confusion (rows: true, columns: predicted)" in printed and "precision" in printed


def test_refusals_are_one_line(tiny_bundle, tmp_path):
    from surgery.errors import SurgeryError
    from surgery.evaluate import evaluate_command

    unknown = _images(tmp_path / "unknown", {"cat": 1, "zebra": 1})
    with pytest.raises(SurgeryError, match="zebra") as err:
        evaluate_command(tiny_bundle, data=unknown, split=None, out=tmp_path, batch_size=2)
    assert "\n" not in str(err.value)
    table = tmp_path / "t.csv"
    table.write_text("text,label\nhello,cat\n")
    with pytest.raises(SurgeryError, match="takes images"):
        evaluate_command(tiny_bundle, data=table, split=None, out=tmp_path, batch_size=2)
    with pytest.raises(SurgeryError, match="sub-folder 'test'"):
        evaluate_command(tiny_bundle, data=unknown, split="test", out=tmp_path, batch_size=2)
    with pytest.raises(SurgeryError, match="no `data:` section"):
        evaluate_command(tiny_bundle, data=None, split=None, out=tmp_path, batch_size=2)
    assert not (tmp_path / "evaluations").exists() or not any((tmp_path / "evaluations").iterdir())


@pytest.mark.slow
def test_build_then_evaluate_a_run_leaves_the_run_as_it_was(quickstart_run, tmp_path):
    data = write_digit_folder(tmp_path / "digits" / "test")
    run = quickstart_run.resolve()
    before = _hashes(run)
    done = surgery_cli("evaluate", str(quickstart_run), "--data", str(tmp_path / "digits"), "--split", "test")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "digit (multiclass): accuracy" in done.stdout and "confusion" in done.stdout
    folder = Path(done.stdout.strip().splitlines()[-1].removeprefix("evaluation: "))
    assert folder.parent == run / "evaluations" and folder.name.startswith("digits-test-")
    report = json.loads((folder / "evaluation.json").read_text())
    assert report["samples"] == len(list(data.rglob("*.png")))
    assert len(report["heads"]["digit"]["per_class"]) == 10
    assert (folder / "confusion_digit.png").is_file()
    # without --data: the recipe's validation split
    done = surgery_cli("evaluate", str(quickstart_run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quickstart on recipe data (digits), val: 359 samples" in done.stdout
    assert _hashes(run) == before  # lock, checkpoints, bundle, metrics untouched
    wrong = tmp_path / "wrong" / "zebra"
    wrong.mkdir(parents=True)
    Image.new("L", (8, 8)).save(wrong / "z.png")
    done = surgery_cli("evaluate", str(quickstart_run), "--data", str(wrong.parent))
    assert done.returncode == 2 and "zebra" in done.stderr and len(done.stderr.strip().splitlines()) == 1
