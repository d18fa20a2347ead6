"""The instant commands: `--help`, `--version`, `validate`, `schema`, `show`; exit codes, messages,
no tracebacks, and no torch/timm/transformers/ray imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from surgery.recipe import RECIPES_DIR, load_recipe, load_recipe_text

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "torchvision", "timm", "transformers", "ray"}
SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))
GOOD = "name: tiny\nbackbone: {source: timm, name: test_resnet, pretrained: false}\nheads:\n  - {name: cls, layers: [{linear: {out_features: 3}}], loss: cross_entropy}\n"


def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """Run `surgery ARGS` in-process through `cli.main` (the console script's entry point)."""
    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out, err = capsys.readouterr()
    return done.value.code, out, err


PROBE = """
import sys
import cli
sys.argv = ["surgery", *sys.argv[1:]]
code = None
try:
    cli.main()
except SystemExit as done:
    code = done.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "torchvision", "timm", "transformers", "ray"})
print(f"@@code={code} heavy={heavy}", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["validate", *map(str, SHIPPED)],
        ["schema"],
        ["show", SHIPPED[0].stem],
        ["validate", "missing.yaml"],
    ],
    ids=["help", "version", "validate", "schema", "show", "validate-error"],
)
def test_instant_commands_import_no_heavy_module(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    probe = done.stderr.strip().splitlines()[-1]
    expected_code = 2 if args[-1] == "missing.yaml" else 0
    assert probe == f"@@code={expected_code} heavy=[]", done.stderr
    assert "Traceback" not in done.stderr


def test_console_script_version() -> None:
    script = Path(sys.executable).parent / "surgery"
    script = script if script.exists() else Path(shutil.which("surgery") or "surgery")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == "surgery 0.1.0"


def test_validate_ok_lines(capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    paths = [str(p.relative_to(ROOT)) for p in SHIPPED]
    code, out, err = run(capsys, monkeypatch, "validate", *paths)
    assert code == 0, err
    assert out.splitlines() == [f"OK {p} ({load_recipe(p).name})" for p in paths]
    assert err == ""


def test_validate_reports_every_error_of_every_file(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(
        GOOD.replace("out_features: 3", "out_features: ten") + "train: {optimizer: {name: adamm}}\n"
    )
    (tmp_path / "worse.yaml").write_text("- not a mapping\n")
    code, out, err = run(capsys, monkeypatch, "validate", "good.yaml", "bad.yaml", "worse.yaml")
    assert code == 2
    assert out == "OK good.yaml (tiny)\n"
    assert err.splitlines() == [
        "bad.yaml:4:50 heads[0].layers[0].linear.out_features: expected an integer, got 'ten'",
        "bad.yaml:5:27 train.optimizer.name: unknown optimizer 'adamm' (did you mean 'adam', 'adamw'?)",
        "worse.yaml:1:1: the top level of a recipe must be a mapping of keys (name, backbone, heads, ...), got a list",
    ]


def test_validate_with_set(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.yaml").write_text(GOOD)
    assert run(capsys, monkeypatch, "validate", "good.yaml", "--set", "train.epochs=3")[0] == 0
    code, _, err = run(
        capsys, monkeypatch, "validate", "good.yaml", "--set", "train.epochs=zero", "-s", "heads[2].name=x"
    )
    assert code == 2
    assert err == "--set heads[2].name=x: heads has 1 item; index 2 is out of range\n"
    code, _, err = run(capsys, monkeypatch, "validate", "good.yaml", "--set", "train.epochs=zero")
    assert (code, err) == (2, "--set train.epochs=zero: expected an integer, got 'zero'\n")


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff\xfe\x00", b"name: !!python/object/apply:os.system [ls]\n", b"a: [\n", b"{{{{", b"&a [*a]", b"\t- x"],
    ids=["empty", "binary", "python-tag", "syntax", "braces", "recursive", "tab"],
)
def test_no_traceback_for_bad_input(capsys, monkeypatch, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    for command in ("validate", "show"):
        code, out, err = run(capsys, monkeypatch, command, str(path))
        assert out == ""
        assert code == 2
        assert "Traceback" not in err and "internal error" not in err
        assert err.startswith((str(path), "error: " + str(path)))


def test_no_traceback_for_missing_file_folder_and_usage(capsys, monkeypatch, tmp_path: Path) -> None:
    code, _, err = run(capsys, monkeypatch, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert err.startswith(f"{tmp_path / 'nope.yaml'}: no such recipe file")
    code, _, err = run(capsys, monkeypatch, "show", str(tmp_path))
    assert (code, err) == (2, f"error: {tmp_path}: is a folder, not a recipe file\n")
    code, _, err = run(capsys, monkeypatch, "validate")
    assert code == 2
    assert "Missing argument" in err
    code, _, err = run(capsys, monkeypatch, "frobnicate")
    assert code == 2
    assert "No such command" in err


def test_version_and_help(capsys, monkeypatch) -> None:
    assert run(capsys, monkeypatch, "--version")[:2] == (0, "surgery 0.1.0\n")
    code, out, _ = run(capsys, monkeypatch, "--help")
    assert code == 0
    for command in ("validate", "schema", "show", "plan", "build", "export", "serve", "predict", "doctor"):
        assert command in out


def test_help_says_what_the_commands_do(capsys, monkeypatch) -> None:
    _, serve_help, _ = run(capsys, monkeypatch, "serve", "--help")
    assert "/healthz, /v2/health/*" in " ".join(serve_help.split())  # every route the token leaves open
    _, pull_help, _ = run(capsys, monkeypatch, "pull", "--help")
    assert "the archive's name without .tar/.tar.gz" in " ".join(pull_help.split())


def test_show_prints_the_resolved_recipe(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(GOOD)
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\n")
    code, out, err = run(capsys, monkeypatch, "show", "child.yaml", "--set", "train.optimizer.lr=3e-4")
    assert code == 0, err
    shown = load_recipe_text(out)
    assert shown == load_recipe("child.yaml", ["train.optimizer.lr=3e-4"])
    assert shown.name == "child"
    assert "extends" not in out
    assert "lr: 0.0003" in out


def test_show_shipped_recipe_by_name(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, monkeypatch, "show", SHIPPED[0].stem)
    assert code == 0
    assert load_recipe_text(out) == load_recipe(SHIPPED[0])


def test_schema_is_json(capsys, monkeypatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "surgery recipe"
    assert set(schema["required"]) == {"name", "backbone", "heads"}
