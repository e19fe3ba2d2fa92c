"""No import cycles in the WebUI glue: each ``spm.webui`` module imports first, on its own, in a fresh
interpreter, and the static import graph (function-level imports included) has no cycle through ``spm.webui``.

A cycle whose imports sit inside functions imports fine today and breaks the day one of them moves to the
top of a file, so the static check is the one that found ``script ⇄ ui``; the runtime check catches a cycle
of top-level imports and a module that only imports after a sibling did.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "spm"
WEBUI_MODULES = sorted(p.stem for p in (PKG / "webui").glob("*.py") if p.stem != "__init__")


def module_names() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of spm it imports``, from every import statement, wherever it is in the file."""
    mods = module_names()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_through_spm_webui():
    found = [c for c in cycles(import_graph()) if any(m.startswith("spm.webui.") for m in c)]
    assert found == [], f"import cycles: {found}"


def test_each_webui_module_imports_first_in_a_fresh_interpreter(tmp_path):
    """One fresh interpreter; before each module, every ``spm`` module and the stand-in WebUI are forgotten,
    so each module is the first of the package to be imported (torch stays loaded: it is not ours and
    reloading it is not possible)."""
    code = f"""
import importlib, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import torch  # noqa: F401
failed = []
for name in {WEBUI_MODULES!r}:
    for m in [m for m in sys.modules if m == "spm" or m.startswith("spm.") or m == "tests.webui_stub"]:
        del sys.modules[m]
    from tests import webui_stub
    webui_stub.install(Path({str(tmp_path)!r}))
    try:
        importlib.import_module("spm.webui." + name)
    except Exception as e:
        failed.append(f"spm.webui.{{name}}: {{type(e).__name__}}: {{e}}")
    webui_stub.uninstall()
print("FAILED" if failed else "OK", *failed, sep="\\n")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[0] == "OK", res.stdout
