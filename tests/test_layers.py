"""The package's layers: every public name imports from `dino_fast`, `import dino_fast` loads no
Triton kernel, and the modules of dino_fast/ and kernels/ import each other without a cycle,
function-level (lazy) imports included."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dino_fast

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dino_fast"
# source folder -> the package its files are installed as (setup.py's package_dir)
SOURCES = {ROOT / "dino_fast": "dino_fast", ROOT / "kernels": "dino_fast.kernels"}


def module_files() -> dict:
    """{module name: file} of every .py file of the package, kernels included."""
    modules = {}
    for folder, package in SOURCES.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name: str, path: Path, known: set) -> set:
    """The package modules that module `name` imports anywhere in its file (top level, inside
    functions, under `if`); `from a import b` counts as importing a.b when that is a module.
    Importing a.b.c also runs the package a.b's __init__."""
    is_package = path.stem == "__init__"
    base = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, `level - 1` packages up
                parts = base.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{parent}.{node.module}" if node.module else parent
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in known else source)
    edges = set()
    for target in targets:
        while target and target not in known:  # a.b.Name or an unknown submodule: its module
            target = target.rpartition(".")[0]
        while target and target != PACKAGE:
            edges.add(target)
            target = target.rpartition(".")[0]  # the enclosing packages' __init__ run first
    edges.discard(name)
    return edges


def import_graph() -> dict:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict):
    """One import cycle of `graph` ({module: modules it imports}) as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_public_name_imports_from_the_package():
    assert len(dino_fast.__all__) == len(set(dino_fast.__all__))
    for name in dino_fast.__all__:
        assert getattr(dino_fast, name) is not None, name
    for name in ("DINOLoss", "dino_loss", "TeacherEMA", "ema_update_", "DINOHead",
                 "MultiCropWrapper", "build_vit", "DataAugmentationDINO",
                 "BatchedDataAugmentationDINO", "ProceduralShapes", "build_dataset",
                 "knn_accuracy"):
        assert name in dino_fast.__all__, name
    namespace = {}
    exec("from dino_fast import *", namespace)
    assert set(dino_fast.__all__) <= set(namespace)


def test_importing_the_package_loads_no_triton_kernel():
    code = ("import sys, dino_fast; "
            "print([m for m in sys.modules if m.startswith('dino_fast.kernels')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("script", ["dino_fast.train", "dino_fast.knn"])
def test_the_scripts_run_without_import_warnings(script):
    """`python -m dino_fast.x` warns when the package's __init__ already imported dino_fast.x."""
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", script, "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "Warning" not in proc.stderr


def test_the_graph_sees_function_level_imports_and_the_kernels():
    graph = import_graph()
    assert "dino_fast.kernels.ema" in graph
    # ema.py imports its kernel inside a function, on the first Triton call; train.py imports
    # visualize (matplotlib) only when it draws
    assert "dino_fast.kernels.ema" in graph["dino_fast.ema"]
    assert "dino_fast.visualize" in graph["dino_fast.train"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_modules_do_not_import_names_from_the_package_root():
    """`from dino_fast import DINOLoss` inside the package would run dino_fast/__init__ from a
    module that __init__ itself imports: modules import from the module that defines a name."""
    files = module_files()
    offenders = []
    for name, path in files.items():
        if name == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == PACKAGE and not node.level:
                offenders += [f"{name}: from dino_fast import {a.name}" for a in node.names
                              if f"{PACKAGE}.{a.name}" not in files]
    assert not offenders, offenders


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))
