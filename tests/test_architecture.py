"""The floors of docs/architecture.md, enforced: which package may import which, and no import circles.

Every import statement counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): a circle hidden behind ``TYPE_CHECKING`` is still two modules that cannot be
understood apart.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each product package and the product packages it may import (besides itself and third-party libraries).
PRODUCT = {
    "tunnel_core": set(),
    "tunnel_link": {"tunnel_core"},
    "tunnel_wireguard": {"tunnel_core"},
    "tunnel_runtime": {"tunnel_core", "tunnel_link"},
    "relay": {"tunnel_core", "tunnel_link", "tunnel_wireguard", "tunnel_runtime"},
    "tunnel_agent": {"tunnel_core", "tunnel_link", "tunnel_wireguard", "tunnel_runtime"},
}
# Development packages may use the whole product and the dev kit; the product never imports them.
DEVELOPMENT = {"devkit", "tunnel_demo", "tunnel_bench"}
PURE = {"tunnel_core"}  # the standard library only: no third-party import at all


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(module: str, path: Path) -> Iterator[str]:
    """Every module name ``module`` imports, absolute, wherever the statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # `from pkg import mod` imports the module pkg.mod when there is one.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _top(name: str) -> str:
    return name.partition(".")[0]


def _all_modules() -> dict[str, Path]:
    return {name: path for package in [*PRODUCT, *DEVELOPMENT] if (ROOT / package).is_dir()
            for name, path in _modules(package)}


@pytest.mark.parametrize("package", sorted(PRODUCT))
def test_a_product_package_imports_only_the_floors_below_it(package: str) -> None:
    allowed = PRODUCT[package] | {package}
    known = set(PRODUCT) | DEVELOPMENT | {"tests"}
    wrong = []
    for module, path in _modules(package):
        for name in _imports(module, path):
            top = _top(name)
            if top in known and top not in allowed:
                wrong.append(f"{module} imports {name}")
            elif package in PURE and top not in known and top not in sys.stdlib_module_names and top != "__future__":
                wrong.append(f"{module} imports {name}, which is not in the standard library")
    assert not wrong, "floor rules broken (docs/architecture.md):\n" + "\n".join(wrong)


def test_development_packages_are_never_imported_by_the_product_or_each_other_wrongly() -> None:
    wrong = []
    for package in DEVELOPMENT:
        if not (ROOT / package).is_dir():
            continue
        for module, path in _modules(package):
            for name in _imports(module, path):
                if _top(name) == "tests":
                    wrong.append(f"{module} imports {name}: the dev kit, not the tests, is shared")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules() -> None:
    modules = _all_modules()
    graph = {module: {name for name in _imports(module, path) if name in modules and name != module}
             for module, path in modules.items()}
    circles = _circles(graph)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in circles)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_a_circle_and_a_floor_break() -> None:
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    assert list(_imports("relay.server", ROOT / "relay" / "server.py"))  # it reads real imports


# --- the size of the rooms ---------------------------------------------------------------------------

MODULE_LINES = 800  # STYLE.md: modules under ~800 lines
PROGRAM_CLASS_LINES = 200  # issue 11: no class over ~200 lines in the two programs
# The relay's satellites: only its composition root (relay/server.py) knows them all and wires them up.
RELAY_SATELLITES = {"relay.admin", "relay.dashboard", "relay.enroll", "relay.listeners", "relay.metrics",
                    "relay.tunnel", "relay.wgtransport"}


@pytest.mark.parametrize("package", sorted(PRODUCT))
def test_no_module_of_the_product_is_a_god_module(package: str) -> None:
    big = [f"{module}: {n} lines" for module, path in _modules(package)
           if (n := len(path.read_text().splitlines())) > MODULE_LINES]
    assert not big, "\n".join(big)


@pytest.mark.parametrize("package", ["relay", "tunnel_agent"])
def test_no_class_of_the_programs_is_a_hub(package: str) -> None:
    big = []
    for module, path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and (n := node.end_lineno - node.lineno + 1) > PROGRAM_CLASS_LINES:
                big.append(f"{module}.{node.name}: {n} lines")
    assert not big, "\n".join(big)


def test_only_the_relay_composition_root_knows_its_satellites() -> None:
    wrong = []
    for module, path in _modules("relay"):
        if module in {"relay.server", *RELAY_SATELLITES}:
            continue
        wrong += [f"{module} imports {name}" for name in set(_imports(module, path)) & RELAY_SATELLITES]
    server = set(_imports("relay.server", ROOT / "relay" / "server.py"))
    assert RELAY_SATELLITES <= server, f"relay.server does not wire up {sorted(RELAY_SATELLITES - server)}"
    for satellite in RELAY_SATELLITES:
        path = ROOT / (satellite.replace(".", "/") + ".py")
        wrong += [f"{satellite} imports {name}" for name in set(_imports(satellite, path))
                  & (RELAY_SATELLITES | {"relay.server"}) - {satellite}]
    assert not wrong, "satellites are wired by relay.server alone:\n" + "\n".join(wrong)
