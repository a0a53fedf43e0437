"""The package's shape (docs/architecture.md): layers import only downwards, no cycles, no module over 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rival_jax"
# Lowest first; a module may import its own layer's modules and lower layers only.
LAYERS = (
    ("errors", "config", "runtime", "progress", "files", "images", "options"),
    ("core",),
    ("models",),
    ("metrics",),
    ("pipeline",),
    ("tpu",),
    ("data", "jobs"),
    ("cli", "__main__", "__init__"),
)
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """rival_jax modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rival_jax"):
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else "__init__"
    return next(index for index, layer in enumerate(LAYERS) if name in layer)


def test_every_module_belongs_to_a_layer_and_imports_none_above_it() -> None:
    modules = _modules()
    upward = [
        f"{module} -> {target}"
        for module, path in modules.items()
        for target in _imports(path, modules)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_modules_import_each_other_without_cycles() -> None:
    modules = _modules()
    graph = {m: {t for t in _imports(p, modules) if t != m and not t.startswith(m + ".")} for m, p in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for target in graph[module]:
            visit(target, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_no_module_is_over_300_lines() -> None:
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
