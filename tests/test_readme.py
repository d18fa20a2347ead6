"""The README runs. Its ```bash blocks are read from README.md and the user flows run exactly as
written, one shell command a line, in a workspace of their own: a copy of `recipes/` and
`examples/`, the recipe "Writing a recipe" shows saved as `my.yaml` (as the README says), and HOME
(so keys, library sources and caches) inside it. Each flow runs on what the blocks before it made:
build → export → serve → predict; tune → `.tuned.yaml` → build; recipes new → validate → plan →
build; ddp, torchrun and the pipeline on a CPU; keys new → pack --sign → trust → pull → serve.

One substitution is made, and only for the tests: port 8000 becomes a free port (the machine may
be serving something there). A `surgery serve` without `--detach` serves until Ctrl-C, so it runs
in the background until it says it is serving, the block's next commands run against it (the
README says "in another terminal"), and then it gets its Ctrl-C.

A block that no flow runs must be marked in the README, on the line before it, with
`<!-- illustrative: why -->` (it needs a GPU, the network, a server that outlives the test, or it
is a synopsis of options), and listed in `ILLUSTRATIVE` here; `test_every_block_is_run_or_marked`
fails on any block that is neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent

SHOW = "surgery show my.yaml --set train.optimizer.lr=1e-4 --set heads[0].layers[1].linear.out_features=5"
# flow → the blocks it runs, in README order, each named by its first command (comment dropped)
FLOWS: dict[str, list[str]] = {
    "checking": ["surgery validate recipes/*.yaml my.yaml", SHOW],
    "training": ["surgery build my.yaml"],
    "placement": ["surgery build quickstart-ddp"],
    "export": ["surgery build quickstart"],
    "fixed_batch": ["surgery build quickstart --run-id fixed-batch --set export.dynamic_batch=false"],
    "serving": ["surgery serve runs/quickstart/latest --port 8000"],
    "offline": ["surgery evaluate runs/quickstart/latest"],
    "tuning": ["surgery tune quickstart-tune --search-id demo --set tune.num_samples=4 --set train.epochs=2"],
    "library": ["surgery recipes new mine --from quickstart"],
    "sharing": ["surgery keys new alice"],
}

# the blocks no test runs, by first command; the README says why before each
ILLUSTRATIVE = [
    "bash .ci/setup && .venv/bin/surgery build quickstart && .venv/bin/surgery serve runs/quickstart/latest --detach "
    "&& .venv/bin/surgery predict http://127.0.0.1:8000/v1/models/quickstart examples/digit-3.png",
    "ray start --head --port 6390",
    "surgery serve BUNDLE_OR_RUN [more bundles...] [--port 8000] [--replicas N] [--max-batch-size 16] "
    "[--batch-wait-ms 2] [--token-file token.txt] [--detach] [--ingress auto|haproxy|proxy] [--config-out FILE] "
    "[--runtime auto|torch|onnxruntime|onnxruntime-int8]",
    "surgery evaluate runs/quickstart/latest --data data/ --split test",
    "surgery tune quickstart-tune",
    "surgery recipes list [--tag text]",
    '.venv/bin/python -m pytest -q -m "not slow"',
]

_MARK = re.compile(r"^<!--\s*illustrative:\s*(.+?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """A ```bash block of the README: where it starts, its commands, and the reason it is marked
    illustrative (None when it is not)."""

    line: int
    commands: tuple[str, ...]
    illustrative: str | None

    @property
    def name(self) -> str:
        return _without_comment(self.commands[0]) if self.commands else ""


def _without_comment(command: str) -> str:
    """A command without its trailing `# comment` (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return " ".join(command[:i].split())
    return " ".join(command.split())


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (text if text is not None else README.read_text()).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        before = next((lines[j].strip() for j in range(start - 2, -1, -1) if lines[j].strip()), "")
        mark = _MARK.match(before)
        blocks.append(Block(start, tuple(_commands(body)), mark.group(1) if mark else None))
        i += 1
    return blocks


def _commands(body: list[str]) -> list[str]:
    """Shell commands of a block: continuation lines joined, comment-only lines dropped."""
    commands, pending = [], ""
    for line in body:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _block(name: str) -> Block:
    found = [b for b in readme_blocks() if b.name == name]
    assert len(found) == 1, f"README has {len(found)} bash blocks starting `{name}`"
    return found[0]


# --------------------------------------------------------------------------- every block accounted for


def test_every_block_is_run_or_marked() -> None:
    blocks = readme_blocks()
    run = {name for names in FLOWS.values() for name in names}
    problems = []
    for block in blocks:
        if block.name in run and block.illustrative:
            problems.append(f"README.md:{block.line} `{block.name}` runs in a test but is marked illustrative")
        elif block.name not in run and not block.illustrative:
            problems.append(
                f"README.md:{block.line} `{block.name}` is neither run by a flow here nor marked "
                "`<!-- illustrative: why -->` in the README"
            )
        elif block.name not in run and block.name not in ILLUSTRATIVE:
            problems.append(f"README.md:{block.line} `{block.name}` is marked illustrative but not listed here")
    names = [b.name for b in blocks]
    problems += [f"flow block `{n}` is not in the README" for n in run if n not in names]
    problems += [f"illustrative block `{n}` is not in the README" for n in ILLUSTRATIVE if n not in names]
    assert not problems, "\n".join(problems)


def test_the_check_finds_an_unmarked_block() -> None:
    text = "x\n<!-- illustrative: a GPU -->\n```bash\nsurgery a  # one\n```\n\n```bash\n# c\nsurgery b \\\n  --x\n```\n"
    a, b = readme_blocks(text)
    assert (a.name, a.illustrative) == ("surgery a", "a GPU")
    assert (b.name, b.illustrative, len(b.commands)) == ("surgery b --x", None, 1)


# --------------------------------------------------------------------------- what the README says


def test_the_shipped_recipes_table_lists_every_shipped_recipe() -> None:
    text = README.read_text()
    section = text[text.index("Shipped recipes (inside the package") :]
    table = section[: section.index("\n\n", section.index("| name |"))]
    listed = set(re.findall(r"^\| `([\w-]+)` \|", table, flags=re.M))
    assert listed == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert "not shipped yet" not in text


def test_num_workers_auto_is_described_as_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from surgery.data import auto_num_workers
    from surgery.schema import Data

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert auto_num_workers("auto", torch.device("cpu")) == 0  # however many cores
    described = Data.model_fields["num_workers"].description
    assert "0 when training on a CPU" in described and "cores" not in described.split("CUDA")[0]
    assert "no loader processes on a CPU" in " ".join(README.read_text().split())


# --------------------------------------------------------------------------- the flows


@dataclass
class Workspace:
    folder: Path
    env: dict[str, str]
    port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "recipes", folder / "recipes")
    shutil.copytree(ROOT / "examples", folder / "examples")
    text = README.read_text()
    written = text[text.index("## Writing a recipe") :]
    (folder / "my.yaml").write_text(written.split("```yaml\n", 1)[1].split("```", 1)[0])  # "Save it as my.yaml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SURGERY_", "XDG_CONFIG", "XDG_CACHE"))}
    env.update(
        HOME=str(folder / "home"),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    (folder / "home").mkdir()
    return Workspace(folder, env, _free_port())


@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str


class Serving:
    """A `surgery serve` running in the background until Ctrl-C; what it prints goes to files (a
    pipe nobody reads while the block goes on would fill up and stall it)."""

    def __init__(self, command: str, ws: Workspace) -> None:
        self.command = command
        self.out, self.err = ws.folder / "serve.out", ws.folder / "serve.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=ws.folder,
                env=ws.env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + 600
        while "press Ctrl-C to stop" not in self.out.read_text():  # once every model is deployed
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"`{command}` did not serve:\n{self.out.read_text()}\n{self.err.read_text()[-3000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)  # Ctrl-C
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


def run_block(name: str, ws: Workspace, *, check: bool = True) -> list[Ran]:
    """Run a README block's commands in order, as written (port 8000 made the free port); a
    blocking `surgery serve` serves in the background until the block's last command has run.
    `check`: stop at the first failing command and fail the test."""
    ran: list[Ran] = []
    servers: list[Serving] = []
    try:
        for written in _block(name).commands:
            command = written.replace("8000", str(ws.port))
            bare = _without_comment(command)
            if re.match(r"surgery serve\b", bare) and not re.search(r"--detach|--config-out", bare):
                servers.append(Serving(command, ws))
                continue
            done = subprocess.run(
                ["bash", "-c", command], cwd=ws.folder, env=ws.env, capture_output=True, text=True, timeout=1200
            )
            ran.append(Ran(written, done.returncode, done.stdout, done.stderr))
            if check and done.returncode != 0:
                raise AssertionError(f"`{written}` exited {done.returncode}:\n{done.stderr[-3000:]}")
            if done.returncode != 0:
                break
    finally:
        for server in servers:
            server.stop()
    return ran


def _by(ran: list[Ran], start: str) -> Ran:
    return next(r for r in ran if r.command.startswith(start))


def test_checking_recipes_and_overrides(ws: Workspace) -> None:
    ran = run_block("surgery validate recipes/*.yaml my.yaml", ws)
    assert "OK my.yaml (digits-resnet)" in ran[0].stdout and "OK recipes/quickstart.yaml (quickstart)" in ran[0].stdout
    assert "name: digits-resnet" in ran[1].stdout
    assert "properties" in json.loads((ws.folder / "recipe.schema.json").read_text())
    assert ran[3].stdout.startswith("surgery ")
    shown = run_block(SHOW, ws)
    assert "lr: 0.0001" in shown[0].stdout and "out_features: 5" in shown[0].stdout
    assert "- f1_macro" in shown[1].stdout and "max_steps" not in shown[1].stdout  # null: not set
    assert "train.optimizer.lr:" in shown[2].stdout and "loguniform:" in shown[2].stdout


@pytest.mark.slow
def test_training_a_recipe(ws: Workspace) -> None:
    from surgery.checkpoint import find_last

    ran = run_block("surgery build my.yaml", ws)
    run = (ws.folder / "runs" / "digits-resnet" / "latest").resolve()
    assert f"run: runs/digits-resnet/{run.name}" in ran[0].stdout
    assert all(f"run: runs/digits-resnet/{run.name}" in r.stdout or str(run) in r.stdout for r in ran[1:])
    assert find_last(run).name and (run / "bundle" / "manifest.json").is_file()
    assert len([p for p in run.parent.iterdir() if not p.is_symlink()]) == 1  # both resumes continued that run


@pytest.mark.slow
def test_ddp_torchrun_and_the_pipeline_on_a_cpu(ws: Workspace) -> None:
    run_block("surgery build quickstart-ddp", ws)
    for name in ("quickstart-ddp", "quickstart-pipeline"):
        runs = [p for p in (ws.folder / "runs" / name).iterdir() if not p.is_symlink()]
        assert all((run / "bundle" / "model.safetensors").is_file() for run in runs)
    assert len([p for p in (ws.folder / "runs" / "quickstart-ddp").iterdir() if not p.is_symlink()]) == 2


def _built_quickstart(ws: Workspace) -> None:
    """What the README's export block leaves (run here when a flow runs on its own, `-k`)."""
    if not (ws.folder / "runs" / "quickstart" / "latest" / "bundle").is_dir():
        run_block("surgery build quickstart", ws)


@pytest.mark.slow
def test_build_and_export_every_format(ws: Workspace) -> None:
    run_block("surgery build quickstart", ws)
    bundle = ws.folder / "runs" / "quickstart" / "latest" / "bundle"
    assert {"model.safetensors", "model.onnx", "model.ts", "model.pt2"} <= {p.name for p in bundle.iterdir()}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["metrics"]["val/digit/accuracy"] >= 0.97


@pytest.mark.slow
def test_export_for_one_batch_size(ws: Workspace) -> None:
    (ran,) = run_block(
        "surgery build quickstart --run-id fixed-batch --set export.dynamic_batch=false", ws, check=False
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    bundle = ws.folder / "runs" / "quickstart" / "fixed-batch" / "bundle"
    assert (bundle / "model.onnx").is_file()


@pytest.mark.slow
def test_serve_and_predict(ws: Workspace) -> None:
    _built_quickstart(ws)
    ran = run_block("surgery serve runs/quickstart/latest --port 8000", ws)
    predicted = _by(ran, "surgery predict")
    assert re.search(r"^  digit: 3 \d", predicted.stdout, flags=re.M), predicted.stdout  # top-1 is a 3
    config = (ws.folder / "serve.yaml").read_text()
    assert "applications:" in config


@pytest.mark.slow
def test_evaluate_and_predict_offline(ws: Workspace) -> None:
    _built_quickstart(ws)
    ran = run_block("surgery evaluate runs/quickstart/latest", ws)
    evaluated = _by(ran, "surgery evaluate")
    assert "digit (multiclass): accuracy" in evaluated.stdout, evaluated.stdout
    assert list((ws.folder / "runs" / "quickstart" / "latest" / "evaluations").glob("val-*/evaluation.json"))
    rows = (ws.folder / "preds.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["input", "digit_label_1"] and len(rows) == 2  # examples/ holds one image
    assert re.search(r"digit-3\.png\s+3\s", _by(ran, "surgery predict runs/quickstart/latest examples/digit").stdout)


@pytest.mark.slow
def test_tune_then_build_the_tuned_recipe(ws: Workspace) -> None:
    ran = run_block("surgery tune quickstart-tune --search-id demo --set tune.num_samples=4 --set train.epochs=2", ws)
    search = ws.folder / "runs" / "quickstart-tune" / "tune-demo"
    assert len((search / "results.jsonl").read_text().splitlines()) == 4
    assert (search / "best" / "bundle" / "manifest.json").is_file()
    assert "run: runs/quickstart-tune/" in ran[-1].stdout


@pytest.mark.slow
def test_a_recipe_from_the_library_validates_plans_and_builds(ws: Workspace) -> None:
    ran = run_block("surgery recipes new mine --from quickstart", ws)
    assert (ws.folder / "mine.yaml").read_text().count("extends: quickstart") == 1
    assert _by(ran, "surgery validate").stdout.strip() == "OK mine.yaml (mine)"
    assert "parameters: 373,370 total" in _by(ran, "surgery plan").stdout
    assert (ws.folder / "runs" / "mine" / "latest" / "bundle" / "manifest.json").is_file()


@pytest.mark.slow
def test_keys_pack_sign_trust_pull_serve(ws: Workspace) -> None:
    _built_quickstart(ws)
    ran = run_block("surgery keys new alice", ws, check=False)
    failed = next((r for r in ran if r.returncode != 0), None)
    assert failed is None, f"`{failed.command}` exited {failed.returncode}:\n{failed.stderr[-3000:]}"
    pulled = _by(ran, "surgery pull").stdout
    assert re.search(rf"pulled {re.escape(str(ws.folder / 'quickstart'))} \(signed by [0-9a-f]+ alice\)", pulled), (
        pulled
    )
