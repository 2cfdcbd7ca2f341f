"""The import structure: no cycle, nothing importing back up the layers, and `config` / `build` as the only way in.

Every import statement of the project's modules counts, those inside functions too (a lazy import is still a
dependency). Layers, lowest first: the core (diffusion_rl's modules), envs, agents, the composition root
(diffusion_rl.build), the command line (diffusion_rl.cli, diffusion_rl.__main__), the benchmarks.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diffusion_rl", "envs", "agents", "benchmarks")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (resolving relative imports and `from package import module`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # 'a.b.c' that is an attribute of module 'a.b'
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[0]
    if top == "benchmarks":
        return 5
    if module in ("diffusion_rl.cli", "diffusion_rl.__main__"):
        return 4
    if module == "diffusion_rl.build":
        return 3
    return {"diffusion_rl": 0, "envs": 1, "agents": 2}[top]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    edges = graph()
    assert "diffusion_rl.build" in edges["diffusion_rl.cli"]  # the graph sees lazy imports
    assert cycles(edges) == []


def test_no_import_runs_back_up_the_layers():
    up = [f"{a} -> {b}" for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert up == []


@pytest.mark.parametrize("module", ["diffusion_rl.cli"])
def test_only_the_command_line_reaches_the_command_line(module):
    """No library module and no benchmark imports cli: they use config (settings) and build (objects)."""
    importers = sorted(a for a, targets in graph().items() if module in targets and a != "diffusion_rl.__main__")
    assert importers == []


def test_a_bad_stride_is_refused_in_one_place():
    """The stride's range check has one home (envs.check_stride_one_step, called by MRPSettings.resolve): no other
    module of the library raises about the stride's range."""
    sources = {name: path.read_text() for name, path in _modules().items() if not name.startswith("benchmarks")}
    raising = sorted(name for name, text in sources.items() if 'check_positive("stride"' in text
                     or "stride + one_step" in text and "raise ConfigError" in text)
    assert raising == ["envs.diffusion_mrp"]
    callers = sorted(name for name, text in sources.items() if "check_stride_one_step(" in text
                     and name not in ("envs", "envs.diffusion_mrp"))
    assert callers == []
