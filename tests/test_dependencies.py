"""Dependencies point one way (DESIGN.md, "Seams"): the command line → commands → compiler →
language → leaves. Checked on the source, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"surgery.errors", "surgery.files", "surgery.inputs", "surgery.versions"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (relative imports resolved)."""
    return _imports_of(path.read_text(), ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]))


def _imports_of(text: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _modules(folder: str) -> dict[str, set[str]]:
    return {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): _imports(p) for p in sorted((ROOT / folder).glob("*.py"))
    }


def _offenders(modules: dict[str, set[str]], forbidden: str, allowed: set[str] = frozenset()) -> list[str]:
    return [
        f"{module} imports {name}"
        for module, names in modules.items()
        if module not in allowed
        for name in sorted(names)
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def test_nothing_in_surgery_imports_serving() -> None:
    assert _offenders(_modules("surgery"), "serve") == []


def test_only_the_command_line_imports_the_doctor_report() -> None:
    assert _offenders(_modules("surgery"), "surgery.doctor", {"surgery.doctor"}) == []
    assert _offenders(_modules("serve"), "surgery.doctor") == []
    assert "surgery.doctor" in _imports(ROOT / "cli.py")


def test_serving_imports_no_training_code() -> None:
    serve = _modules("serve")
    for training in ("surgery.train", "surgery.data", "surgery.checkpoint", "surgery.optim", "surgery.tune"):
        assert _offenders(serve, training) == []


def test_leaves_import_only_leaves() -> None:
    modules = _modules("surgery")
    for leaf in LEAVES & set(modules):
        inner = {name for name in modules[leaf] if name.startswith("surgery.") and name != "surgery.__version__"}
        assert {name.rsplit(".", 1)[0] if name not in modules else name for name in inner} <= LEAVES, leaf


def test_the_checker_sees_imports_inside_functions() -> None:
    text = "def f():\n    from serve.ingress import doctor_lines\n    from . import doctor\n"
    imported = _imports_of(text, "surgery")
    assert "serve.ingress" in imported and "surgery.doctor" in imported
