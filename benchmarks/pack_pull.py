"""What sharing costs: `pack` and `pull` of a resnet50 run folder (its lock beside a 94 MB bundle,
as `surgery build` leaves it) and of the bare bundle, against plain `tarfile` writing and
extracting the same files (no hashes, no checks), and resolving a recipe from an HTTP library
(cold, then cached) against reading a local file.

    python benchmarks/pack_pull.py [--model resnet50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import tarfile
import tempfile
import textwrap
import threading
import time
from pathlib import Path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pack-bench-"))
    os.environ["SURGERY_CONFIG_DIR"] = str(tmp / "config")
    os.environ["SURGERY_CACHE_DIR"] = str(tmp / "cache")
    try:
        run(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path, args: argparse.Namespace) -> None:
    from surgery.bundle import load_bundle
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe, load_recipe_text
    from surgery.runs import write_lock
    from surgery.share import pack, pull

    text = f"""
    name: bench
    backbone: {{source: timm, name: {args.model}, pretrained: false}}
    heads: [{{name: label, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy}}]
    export: {{formats: [safetensors]}}
    """
    recipe = load_recipe_text(textwrap.dedent(text), base_dir=tmp)
    run_dir = tmp / "runs" / "bench" / "run"  # a run folder as `surgery build` leaves it: lock + bundle
    run_dir.mkdir(parents=True)
    write_lock(recipe, run_dir)
    bundle = export_bundle(build_model(recipe, load_weights=False).eval(), recipe, run_dir / "bundle")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle: timm {args.model}, {size / 2**20:.0f} MiB; best of {args.repeat}")

    def plain_pack() -> None:
        with tarfile.open(tmp / "plain.tar", "w") as tar:
            tar.add(run_dir / "recipe.lock.yaml", arcname="recipe.yaml")
            tar.add(bundle, arcname="bundle")

    def plain_pull() -> None:
        shutil.rmtree(tmp / "plain-out", ignore_errors=True)
        with tarfile.open(tmp / "plain.tar") as tar:
            tar.extractall(tmp / "plain-out", filter="data")

    def our_pull(archive: Path) -> None:
        shutil.rmtree(tmp / "out", ignore_errors=True)
        pull(str(archive), tmp / "out")

    pack(run_dir, tmp / "run.tar")  # once, untimed: what a pulled run folder gives back loads
    our_pull(tmp / "run.tar")
    load_bundle(tmp / "out" / "bundle")

    rows = [
        ("pack (run folder)", best(lambda: pack(run_dir, tmp / "run.tar"), args.repeat), best(plain_pack, args.repeat)),
        ("pull (run folder)", best(lambda: our_pull(tmp / "run.tar"), args.repeat), best(plain_pull, args.repeat)),
        ("pack (bare bundle)", best(lambda: pack(bundle, tmp / "m.tar"), args.repeat), best(plain_pack, args.repeat)),
        ("pull (bare bundle)", best(lambda: our_pull(tmp / "m.tar"), args.repeat), best(plain_pull, args.repeat)),
    ]

    library = tmp / "www"
    library.mkdir()
    (library / "base.yaml").write_text(textwrap.dedent(text))
    (tmp / "local.yaml").write_text(textwrap.dedent(text))
    from surgery.library import add_source, build_index

    build_index(library)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(library))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        add_source(f"http://127.0.0.1:{server.server_address[1]}/", allow_unsigned=True)
        local = best(lambda: load_recipe(tmp / "local.yaml"), args.repeat)
        start = time.perf_counter()
        load_recipe("bench")
        cold = time.perf_counter() - start
        cached = best(lambda: load_recipe("bench"), args.repeat)
    finally:
        server.shutdown()
    rows += [("resolve `bench` from HTTP, cold", cold, local), ("resolve `bench` from HTTP, cached", cached, local)]
    print(f"{'what':36} {'surgery':>9} {'baseline':>9} {'ratio':>6}")
    for name, ours, base in rows:
        print(f"{name:36} {ours:8.3f}s {base:8.3f}s {ours / base:5.2f}x")
    print("baselines: tarfile write / extractall(filter='data') of the same bundle; load_recipe of a local file")


if __name__ == "__main__":
    main()
