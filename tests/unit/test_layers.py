"""Imports inside balancer point one way: from the entry points down to the pure core."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "balancer"

# A module may import only modules of lower layers.
LAYERS: dict[str, int] = {
    # leaves that the core itself uses: no balancer imports at all
    "jsondoc": -1,
    # the core: no balancer imports, or only each other's types
    "balancer": 0, "config": 0, "errors": 0, "endpoints": 0, "upstream": 0, "logs": 0,
    "retry": 0, "ring": 0, "metrics": 0, "load": 0, "trace": 0,
    "memory": 0, "routes": 0, "zonespill": 0,
    # pure logic over the core, and the aiohttp server adapter
    "health": 1, "affinity": 1, "prefix": 1, "strategy": 1, "httpserver": 1, "discovery": 1,
    "paths": 1,
    "outbound": 1,
    "state": 2, "tune": 2, "summary": 2,
    "router": 3,
    "route": 4, "monitor": 4, "models": 4, "loadpoll": 4,
    "admission": 5, "record": 5, "offload": 5,
    "forward": 6,
    "proxy": 7,
    "app": 8,
    # entry points
    "cli": 9, "__main__": 10,
}


def imports(path: Path) -> set[str]:
    """The balancer modules a file imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "balancer":
                found.update(a.name if a.name in LAYERS else "balancer" for a in node.names)
            elif node.module.startswith("balancer."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("balancer."))
    return found


def test_every_module_has_a_layer():
    """A new module must be placed in LAYERS (and so in the import order)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(LAYERS), sorted(modules - set(LAYERS))


def test_imports_point_down_the_layers():
    """No module imports one of its own layer or above: no cycles, and app never imports
    the command line."""
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        name = "balancer" if path.stem == "__init__" else path.stem
        for target in imports(path):
            if LAYERS[target] >= LAYERS[name] and target != "balancer":
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_the_command_line_does_not_reach_into_the_request_path():
    """cli routes with the shared decision (route), never with the proxy's internals."""
    assert not imports(PACKAGE / "cli.py") & {"proxy", "forward", "admission"}
    assert "cli" not in imports(PACKAGE / "app.py")


REQUEST_PATH = ("proxy", "route", "admission", "forward", "record", "router", "state",
                "upstream", "health", "monitor")


def test_no_function_on_the_request_path_is_over_60_lines():
    """Each step of a request reads on one screen."""
    long = []
    for name in REQUEST_PATH:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []
