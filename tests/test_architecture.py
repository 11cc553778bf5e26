"""Data flows one way: no library module imports the CLI, and no modules import each other in a circle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_imports() -> dict[str, set[str]]:
    """Module -> the wanfit modules it imports at module level (imports inside functions are lazy)."""
    files = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wanfit"):
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("wanfit")}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def all_imports(path: Path) -> set[str]:
    """Every wanfit module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("wanfit")}


def test_no_library_module_imports_the_command_line():
    library = [p for p in SRC.rglob("*.py") if "commands" not in p.parts and p.name != "cli.py"]
    offenders = {p.name for p in library if any(m.startswith("wanfit.commands") for m in all_imports(p))}
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    offenders |= {
        p.name for p in bench.glob("*.py") if any(m.startswith("wanfit.commands") for m in all_imports(p))
    }
    assert offenders == set()


def test_no_import_cycles():
    graph = module_imports()
    assert len(graph) > 30  # the walk found the package
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_importing_the_cli_and_pipeline_leaves_torch_compile_unloaded():
    # torch._dynamo costs about 2 s of a fresh process on a 2-core CPU: wanfit's own modules leave it
    # to code that compiles (wanfit.attention once wrapped a function at import). transformers' umT5
    # modules still import it, where a job loads them.
    import subprocess
    import sys

    code = (
        "import sys, wanfit.cli, wanfit.pipeline, wanfit.plan.planning, wanfit.runtime.lora; "
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo') or m == 'torch._inductor'))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
