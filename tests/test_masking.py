"""Argument checks of dino_fast.masking (the masks themselves are checked against DINOv2 in
test_dinov2_recipe.py): each error names the argument and says what was expected."""
import random

import numpy as np
import pytest
import torch

from dino_fast.masking import BlockMaskGenerator, mask_weights, sample_masks


@pytest.mark.parametrize("masks,exc,match", [
    (torch.tensor([[1, 0], [1, 1]]), TypeError,  # used to index: a (2, 2, 2) tensor, silently
     r"masks must be a bool \(n, N\) tensor, got dtype torch.int64"),
    (torch.tensor([[1.0, 0.0], [1.0, 1.0]]), TypeError,
     r"masks must be a bool \(n, N\) tensor, got dtype torch.float32"),
    (torch.tensor([True, False]), ValueError, r"masks must be a bool \(n, N\) tensor, got shape "
                                              r"\(2,\)"),
    (torch.ones(2, 2, 2, dtype=torch.bool), ValueError, r"got shape \(2, 2, 2\)"),
    ([[True, False]], TypeError, r"masks must be a bool \(n, N\) tensor, got list"),
])
def test_mask_weights_rejects_what_is_not_a_bool_matrix(masks, exc, match):
    with pytest.raises(exc, match=match):
        mask_weights(masks)


@pytest.mark.parametrize("rng", [np.random.default_rng(0), 0, np.random.RandomState(0)])
def test_sample_masks_takes_only_a_random_random(rng):
    with pytest.raises(TypeError, match=r"rng must be a random.Random \(or the random module\), "
                                        r"got "):
        sample_masks(8, 4, (0.1, 0.5), 0.5, rng=rng)

    class MyRandom(random.Random):  # a subclass is a random.Random, the default a fresh one
        pass
    a = sample_masks(8, 4, (0.1, 0.5), 0.5, rng=MyRandom(3))
    assert torch.equal(a.masks, sample_masks(8, 4, (0.1, 0.5), 0.5, rng=random.Random(3)).masks)
    assert sample_masks(8, 4).masks.shape == (8, 16)
    random.seed(5)  # the random module itself: its global stream, as DINOv2's collate draws
    b = sample_masks(8, 4, (0.1, 0.5), 0.5, rng=random)
    assert torch.equal(b.masks, sample_masks(8, 4, (0.1, 0.5), 0.5, rng=random.Random(5)).masks)


def test_sample_masks_rejects_a_generator_that_is_not_a_block_mask_generator():
    with pytest.raises(TypeError, match="generator must be a BlockMaskGenerator, got function"):
        sample_masks(8, 4, rng=random.Random(0), generator=lambda n, rng: None)
    with pytest.raises(ValueError, match="generator is for a 5x5 grid"):
        sample_masks(8, 4, rng=random.Random(0), generator=BlockMaskGenerator(5))


@pytest.mark.parametrize("rng", [np.random.default_rng(0), 0, None])
def test_block_mask_generator_call_takes_only_a_random_random(rng):
    with pytest.raises(TypeError, match="rng must be a random.Random"):
        BlockMaskGenerator(4)(6, rng)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(max_aspect=0), ValueError, "max_aspect must be a positive finite number, got 0"),
    (dict(max_aspect=-2.0), ValueError, "max_aspect must be a positive finite number"),
    (dict(min_aspect="0.3"), TypeError, "min_aspect must be a real number"),
    (dict(min_aspect=float("nan")), ValueError, "min_aspect must be a positive finite number"),
    (dict(min_aspect=0.0), ValueError, "min_aspect must be a positive finite number"),
    (dict(max_num_patches="8"), TypeError, "max_num_patches must be a real number"),
    (dict(max_num_patches=float("inf")), ValueError, "max_num_patches must be a positive"),
])
def test_block_mask_generator_rejects_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BlockMaskGenerator(8, **kwargs)
