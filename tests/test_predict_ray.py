"""`surgery predict --engine ray`: the same rows as the local engine, from Ray Data's actor pool,
on a local Ray and on a two-node cluster (`ray.cluster_utils.Cluster`, this machine only)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import surgery_cli
from PIL import Image

pytestmark = pytest.mark.slow

TINY = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - {name: cls, layers: [{linear: {out_features: 3}}], loss: cross_entropy, labels: [bird, cat, dog]}
  - {name: age, layers: [{linear: {out_features: 1}}], loss: mse}
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path]:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    root = tmp_path_factory.mktemp("ray-predict")
    recipe = load_recipe_text(TINY)
    bundle = export_bundle(build_model(recipe, load_weights=False), recipe, root / "bundle", formats=["safetensors"])
    images = root / "images"
    images.mkdir()
    for i in range(9):
        Image.new("RGB", (20 + i, 24), (25 * i, 80, 160)).save(images / f"{i}.png")
    (images / "5.png").write_bytes(b"broken")
    return bundle, images


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _same(a: list[dict], b: list[dict]) -> None:
    assert [r["input"] for r in a] == [r["input"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["cls_label_1"] == y["cls_label_1"] and bool(x["error"]) == bool(y["error"])
        if not x["error"]:
            assert float(x["cls_prob_1"]) == pytest.approx(float(y["cls_prob_1"]), abs=1e-5)
            assert float(x["age"]) == pytest.approx(float(y["age"]), abs=1e-5)


def test_ray_data_on_a_local_ray_gives_the_local_rows(ray_session, job, tmp_path):
    from surgery.predict import PredictSettings, predict_command

    bundle, images = job
    settings = PredictSettings(top_k=2, batch_size=4, workers=0)
    local = predict_command(bundle, [str(images)], out=tmp_path / "local.csv", settings=settings, engine="local")
    on_ray = predict_command(
        bundle, [str(images)], out=tmp_path / "ray.jsonl", settings=settings, engine="ray", concurrency=2
    )
    assert "predicted 9 inputs" in local and "on ray, 1 unreadable" in on_ray
    import json

    ray_rows = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    ray_rows = [{k: "" if v is None else str(v) for k, v in r.items()} for r in ray_rows]
    _same(_rows(tmp_path / "local.csv"), ray_rows)
    assert ray_session.is_initialized()  # a Ray it did not start is left running


def test_ray_data_on_two_nodes(job, tmp_path):
    """Two nodes of one CPU each: the pool's two actors (one CPU each) must use both."""
    from ray.cluster_utils import Cluster

    bundle, images = job
    # the nodes take the machine's own address: a driver told 127.0.0.1 would look for them there
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "two.csv"
        done = surgery_cli(
            "predict", str(bundle), str(images / "*.png"), "--out", str(out), "--concurrency", "2", "--batch-size", "3",
            env={"RAY_ADDRESS": cluster.address},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "on ray" in done.stdout
    finally:
        cluster.shutdown()
    local = tmp_path / "local.csv"
    done = surgery_cli("predict", str(bundle), str(images / "*.png"), "--out", str(local), "--engine", "local")
    assert done.returncode == 0, done.stderr[-2000:]
    _same(_rows(local), _rows(out))
