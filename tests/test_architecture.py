"""The package's layering (docs/architecture.md): every import points down, there are no import circles, and no
module is longer than 400 lines. Read from the source (every import statement, including the ones inside functions
and under ``TYPE_CHECKING``), so an import that runs late is caught as well as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bestformer

ROOT = Path(bestformer.__file__).parent

#: the layers from the ground up; a module may import its own layer and the ones before it
LAYERS = ["version", "lazy", "errors", "fileio", "hardware", "progress", "quant", "neurons", "layers", "models", "data",
          "training", "analysis", "convert", "deploy", "zoo", "pipeline", "cli", "__init__", "__main__"]
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return (node.module or "").removeprefix("bestformer").removeprefix(".")
    base = importer.split(".") if importer != "__init__" else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """Each module's imports of this package's modules, with their line numbers."""
    graph: dict[str, set[tuple[str, int]]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name.removeprefix("bestformer.") for a in node.names
                           if a.name.startswith("bestformer.")]
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("bestformer")):
                base = _resolve(name, path.name == "__init__.py", node)
                subs = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                targets = [t for t in subs if t in modules] or [base or "__init__"]
            else:
                continue
            edges.update((t, node.lineno) for t in targets if t in modules and t != name)
    return graph


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_module_has_a_layer() -> None:
    unknown = sorted({m.split(".")[0] for m in _modules()} - set(LAYERS))
    assert not unknown, f"packages missing from LAYERS (and docs/architecture.md): {unknown}"


def test_imports_point_down() -> None:
    modules = _modules()
    upward = [f"{modules[src].relative_to(ROOT)}:{line} imports bestformer.{dst}"
              for src, edges in _imports(modules).items() for dst, line in sorted(edges)
              if _layer(dst) > _layer(src)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    graph = {m: {d for d, _ in edges} for m, edges in _imports(_modules()).items()}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join([*stack[stack.index(nxt):], node, nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_short(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it by job"


def test_the_checker_resolves_relative_imports() -> None:
    # the resolver itself: a relative import two levels up from a module, and one from a package
    node = ast.parse("from ..training.engine import Trainer").body[0]
    assert _resolve("models.csd", False, node) == "training.engine"
    node = ast.parse("from ...zoo import load").body[0]
    assert _resolve("training.dist", True, node) == "zoo"
    assert _layer("training.engine") > _layer("models.csd")


DOC = Path(__file__).parents[1] / "docs" / "architecture.md"


def test_the_page_names_every_package() -> None:
    text = DOC.read_text()
    packages = {m.split(".")[0] for m in _modules() if "." in m or (ROOT / m).is_dir()}
    missing = sorted(p for p in packages if f"{p}/" not in text)
    assert not missing, f"docs/architecture.md does not show {missing}"
    readme = (DOC.parents[1] / "README.md").read_text()
    assert not [p for p in packages if f"  {p}/" not in readme], "the README's layout misses a package"


def test_the_worked_examples_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    import torch

    from bestformer.models import _registry
    from bestformer.neurons import registry

    # the examples register names: register them in copies of the tables, put back after the test
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))
    monkeypatch.setattr(_registry, "_INPUT_CONFIGS", dict(_registry._INPUT_CONFIGS))
    monkeypatch.setattr(registry, "_NEURONS", dict(registry._NEURONS))
    family, neuron = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[:2]
    family = re.sub(r"from \.(\.?)(\w*)", lambda m: f"from bestformer.{'models.' if not m[1] else ''}{m[2]}",
                    family)
    exec(compile(family, "architecture.md (family)", "exec"), {"__name__": "mynet"})
    model = bestformer.create_model("mynet_tiny")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    exec(compile("import torch\n" + neuron, "architecture.md (neuron)", "exec"), {"__name__": "mine"})
    out = bestformer.create_model("bestformer_tiny", neuron="mine").eval()(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
