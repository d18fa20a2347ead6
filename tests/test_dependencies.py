"""Dependencies point one way (DESIGN.md, "Seams"): the command line → commands → compiler →
language → leaves. Checked on the source, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"surgery.errors", "surgery.files", "surgery.inputs", "surgery.versions", "surgery.places", "surgery.report"}


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
    """Every module under `folder`, subpackages included, with everything it imports."""
    return {_module_name(p): _imports(p) for p in sorted((ROOT / folder).rglob("*.py"))}


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


# --------------------------------------------------------------------------- the import graph


def _package_modules(folder: str) -> dict[str, set[str]]:
    """Every module under `folder`, subpackages included (a package is its `__init__`), with the
    modules it imports inside `surgery`/`serve`. Importing `a.b.c` runs `a.b`'s `__init__` first,
    so it counts as importing `a.b` too."""
    files = sorted((ROOT / folder).rglob("*.py"))
    names = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for imported in _imports(path):
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in names and candidate != name and not name.startswith(candidate + "."):
                    found.add(candidate)
        graph[name] = found
    return graph


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_inside_surgery_or_serve() -> None:
    for folder in ("surgery", "serve"):
        assert _cycles(_package_modules(folder)) == [], folder


def test_the_circle_finder_finds_a_circle_through_a_package() -> None:
    graph = {"p": {"p.a"}, "p.a": {"q"}, "q": {"p"}, "r": set()}
    assert _cycles(graph) == [["p", "p.a", "q"]]


# DESIGN.md's tiers, bottom up: a module imports its own tier and the tiers below it, never above.
# A name stands for the module and the modules split from it (`recipe` covers `recipe_yaml`).
LANGUAGE = ("schema", "sections", "registry", "recipe", "library_fetch", "library_index", "library_remote", "library_sources",
            "library_resolve", "keys", "provenance")  # fmt: skip
COMPILER = ("model", "backbone", "backbones", "heads", "ops", "freeze")


def _in(module: str, tier: tuple[str, ...]) -> bool:
    name = module.removeprefix("surgery.")
    return any(name == part or name.startswith((part + ".", part + "_")) for part in tier)


def test_the_language_imports_no_compiler_or_command() -> None:
    graph = _package_modules("surgery")
    allowed = set(LEAVES) | {m for m in graph if _in(m, LANGUAGE)}
    offenders = {m: sorted(graph[m] - allowed) for m in graph if _in(m, LANGUAGE) and graph[m] - allowed}
    assert offenders == {}


def test_the_compiler_imports_no_command() -> None:
    graph = _package_modules("surgery")
    allowed = set(LEAVES) | {m for m in graph if _in(m, LANGUAGE) or _in(m, COMPILER)}
    offenders = {m: sorted(graph[m] - allowed) for m in graph if _in(m, COMPILER) and graph[m] - allowed}
    assert offenders == {}


def test_nothing_imports_the_command_line() -> None:
    for folder in ("surgery", "serve"):
        assert _offenders(_modules(folder), "cli") == []
