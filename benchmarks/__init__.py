"""pytest-benchmark suite of dino_fast: `pytest benchmarks --benchmark-only`."""
import importlib.util
from pathlib import Path


def load_test_reference():
    """tests/reference.py: the literal official formulations and the per-dtype tolerances that
    the benchmarks check against (tests/ is no package, so it is loaded from its path)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("dino_fast_test_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
