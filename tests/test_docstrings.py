"""The examples in the public docstrings run and print what they show."""
import doctest
import importlib

import pytest

MODULES_WITH_EXAMPLES = ["dino_fast.models", "dino_fast.head", "dino_fast.ema", "dino_fast.data",
                         "dino_fast.augmentation", "dino_fast.batch_augmentation",
                         "dino_fast.knn", "dino_fast.cross_entropy"]


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS,
                             report=True)
    assert result.attempted > 0, f"{name} has no example left"
    assert result.failed == 0, f"{result.failed} failing example(s) in {name}"
