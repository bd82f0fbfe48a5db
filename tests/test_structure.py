"""The shape of the code a reader relies on: the core never depends on the toy world, the modules
import one another without cycles, no file outgrows a sitting, and the repository stands alone."""

import ast
import os
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
# The toy world and what is built on it; it uses the core, never the other way round.
TOY = {"toyworld", "toymodel", "toyeval", "oracle"}
# Everything else at the top level but the benchmarks (which may time the toy's models) is the core.
CORE = [m for m in MODULES if m not in TOY and not m.startswith("bench_")]


def is_main_block(node):
    """`if __name__ == "__main__":`, a script's entry point: it runs only when the file is the program
    (as the module __main__, not the module of its name), so what it imports is not the module's."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def project_imports(module):
    """The project modules `module` imports anywhere in its code (top level or inside a function)."""
    with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found, todo = set(), [tree]
    while todo:
        node = todo.pop()
        if is_main_block(node):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return found & set(MODULES)


def test_the_core_never_imports_the_toy_world():
    assert "train" in CORE and "pairs" in CORE and "blipdiff" in CORE
    offenders = {m: sorted(project_imports(m) & TOY) for m in CORE}
    assert not {m: toy for m, toy in offenders.items() if toy}


def test_no_import_cycles():
    graph = {m: project_imports(m) - {m} for m in MODULES}
    done, path = set(), []

    def visit(m):
        if m in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(graph[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


def test_no_file_over_600_lines():
    lengths = {}
    for m in MODULES:
        with open(os.path.join(ROOT, m + ".py"), encoding="utf-8") as f:
            lengths[m] = sum(1 for _ in f)
    assert {m: n for m, n in lengths.items() if n > 600} == {}
    assert lengths["train"] <= 450


def test_nothing_cites_a_file_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    # Spelt in pieces, so this file does not cite them itself.
    needles = [".." + "/shared", "shared/" + "reference", "reference " + "notes"]
    cited = []
    for path in tracked.stdout.split():
        if path.endswith((".png", ".jpg", ".safetensors", ".bin", ".npy")):
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
            text = f.read()
        cited += [f"{path}: {needle}" for needle in needles if needle in text]
    assert cited == []


def test_no_call_with_ten_positional_arguments():
    """Long argument lists are read by name: a call with 10 or more positional arguments is one whose
    meaning a reader must count out (generate's options are a Sampling, editing's an Edit)."""
    long_calls = []
    for m in MODULES:
        with open(os.path.join(ROOT, m + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        # A command line spelt out as arguments (toymodel's stages: "--steps", "3000", ...) is no such list.
        long_calls += [f"{m}.py:{node.lineno}" for node in ast.walk(tree)
                       if isinstance(node, ast.Call) and len(node.args) >= 10
                       and not any(isinstance(a, ast.Constant) and str(a.value).startswith("--") for a in node.args)]
    assert long_calls == []
