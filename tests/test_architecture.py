"""The package's parts depend one way (README, "How it is built").

Reads every module of ``gitplug`` with :mod:`ast` (imports under
``TYPE_CHECKING`` and inside functions count: a cycle of types is still a
cycle for the reader) and checks the layering and that no import cycle exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gitplug

PACKAGE = Path(gitplug.__file__).parent

#: The shared base every part may use; these import nothing of gitplug.
BASE = {"errors", "signals", "prefixes"}
#: Parts (subpackages) and what each may import besides itself and the base.
ALLOWED: dict[str, set[str]] = {
    "config": BASE,
    "state": BASE,
    "runtime": BASE,
    "deploy": BASE | {"config", "state", "runtime"},
    "web": BASE | {"config", "state", "runtime", "deploy"},
}
MAX_TOP_LEVEL_MODULES = 15


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``gitplug...`` module ``path`` imports, resolved to dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gitplug"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("gitplug"):
                target = node.module
            else:
                continue
            # ``from . import signals`` imports a module, not a name of the package.
            modules = {f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")}
            found |= modules
            if len(modules) < len(node.names):
                found.add(target)
    return {m for m in found if _exists(m)}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:]) if "." in module else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _part(module: str) -> str:
    """``gitplug.deploy.pipeline`` -> ``deploy``; ``gitplug.cli`` -> ``cli``."""
    return module.split(".")[1] if "." in module else ""


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_lies_below_it(part: str) -> None:
    wrong = sorted(
        f"{mod} imports {target}"
        for mod, targets in GRAPH.items()
        if _part(mod) == part
        for target in targets
        if _part(target) not in ALLOWED[part] | {part}
    )
    assert not wrong, f"{part} may import only {sorted(ALLOWED[part])}:\n" + "\n".join(wrong)


def test_the_base_modules_import_nothing_of_gitplug() -> None:
    for base in BASE:
        assert not GRAPH[f"gitplug.{base}"], GRAPH[f"gitplug.{base}"]


def test_no_import_cycles() -> None:
    # Edges into a package's __init__ from its own modules are how Python
    # imports a submodule (``from . import x``), not a dependency.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_top_of_the_package_stays_small() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_part_says_what_it_owns_and_may_import() -> None:
    for part in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"gitplug/{part}/__init__.py needs a docstring naming what it may import"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_every_part_lists_its_modules(part: str) -> None:
    """The part's docstring is its map: each module appears in it as :mod:`.name`."""
    doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in (PACKAGE / part).glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if f":mod:`.{m}`" not in doc]
    assert not missing, f"gitplug/{part}/__init__.py does not list {missing}; add a line for each"


def test_no_module_cites_the_spec() -> None:
    """Product text cites README sections; docstrings are product text too (``help()`` shows them)."""
    roots = [PACKAGE, PACKAGE.parent / "bench"]
    citing = [f"{path.relative_to(PACKAGE.parent)}:{number}"
              for root in roots if root.is_dir() for path in sorted(root.rglob("*.py"))
              for number, line in enumerate(path.read_text().splitlines(), 1) if "SPEC" in line]
    assert not citing, f"these lines cite SPEC; cite the README section instead: {citing}"
