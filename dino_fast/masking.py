"""DINOv2's block masking of the global crops' patches, for the iBOT masked-patch loss.

- `BlockMaskGenerator(grid)`: one (h, w) boolean mask with a requested number of masked patches,
  made of random rectangles (area and aspect ratio drawn at random) until the count is reached,
  as DINOv2's `MaskingGenerator` does.
- `sample_masks(n_images, grid, ...)`: the masks of a batch as DINOv2's collate function draws
  them: a fraction `probability` of the images is masked, their ratios spread evenly over
  `ratio_min_max` (image i of those draws its ratio in the i-th of as many equal sub-intervals),
  the others unmasked, and the order shuffled. Returns a `MaskBatch` with the masks flattened to
  (n_images, h * w) and the per-patch weights `iBOTPatchLoss.forward_masked` takes.

Every draw comes from the `random.Random` passed in, so a run that seeds it per epoch draws the
same masks when resumed.

    >>> import random
    >>> batch = sample_masks(8, (4, 4), (0.1, 0.5), 0.5, random.Random(0))
    >>> batch.masks.shape, batch.masks.dtype, int(batch.masks.any(1).sum())
    (torch.Size([8, 16]), torch.bool, 4)
    >>> bool(torch.allclose(batch.weights.sum(), torch.tensor(4.0)))   # 1 per masked image
    True
"""
from __future__ import annotations

import math
import numbers
import random
from typing import NamedTuple, Optional

import numpy as np
import torch

from dino_fast.checks import check_int, check_positive, check_unit_interval


def check_mask_ratio(ratio_min_max, name: str = "mask_ratio_min_max") -> tuple[float, float]:
    """(min, max) with 0 <= min <= max <= 1."""
    if not isinstance(ratio_min_max, (tuple, list)) or len(ratio_min_max) != 2 or not all(
            isinstance(r, numbers.Real) and not isinstance(r, bool) for r in ratio_min_max):
        raise TypeError(f"{name} must be two numbers (min, max), got {ratio_min_max!r}")
    lo, hi = (float(r) for r in ratio_min_max)
    if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1] (fractions of the patches masked), got "
                         f"({lo:g}, {hi:g})")
    if lo > hi:
        raise ValueError(f"{name}: min must be <= max, got ({lo:g}, {hi:g})")
    return lo, hi


def _check_grid(grid) -> tuple[int, int]:
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be an int or (height, width) in patches, got {grid!r}")
    return check_int(grid[0], "grid height", 1), check_int(grid[1], "grid width", 1)


def _check_rng(rng):
    """Every draw goes through random.Random's uniform / randint / shuffle: a random.Random or the
    `random` module itself (its global stream, as DINOv2's collate draws). A numpy Generator or
    a seed would fail deep inside, and numpy's RandomState.randint excludes its upper end (other
    masks), so they are refused here."""
    if not (isinstance(rng, random.Random) or rng is random):
        raise TypeError(f"rng must be a random.Random (or the random module), got "
                        f"{type(rng).__name__} (seed one with random.Random(seed))")
    return rng


class BlockMaskGenerator:
    """Random-rectangle masks on an (h, w) patch grid (DINOv2's MaskingGenerator).

    Args:
        grid: (h, w) patches, or an int for a square grid.
        max_num_patches: the most patches one rectangle may add (default: half the grid, as
            DINOv2's training script sets it).
        min_num_patches: the least area a rectangle is drawn with (4).
        min_aspect, max_aspect: the rectangles' aspect-ratio range (0.3 and 1 / min_aspect),
            drawn log-uniformly.

    `gen(n, rng)` returns an (h, w) bool numpy array with n masked patches when rectangles can
    reach that count (a rectangle is strictly smaller than the grid on both sides, and at most 10
    tries are made per rectangle; the count then falls short, as in DINOv2).
    """

    def __init__(self, grid, max_num_patches: Optional[float] = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: Optional[float] = None):
        self.height, self.width = _check_grid(grid)
        self.num_patches = self.height * self.width
        self.min_num_patches = check_int(min_num_patches, "min_num_patches", 0)
        self.max_num_patches = (0.5 * self.num_patches if max_num_patches is None
                                else check_positive(max_num_patches, "max_num_patches"))
        min_aspect = check_positive(min_aspect, "min_aspect")
        max_aspect = (1 / min_aspect if max_aspect is None
                      else check_positive(max_aspect, "max_aspect"))
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect must be >= min_aspect, got {max_aspect} < {min_aspect}")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_rectangle(self, mask: np.ndarray, budget: float, rng: random.Random) -> int:
        """Mask one rectangle adding at most `budget` new patches; returns how many it added."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        num_masking_patches = check_int(num_masking_patches, "num_masking_patches", 0)
        rng = _check_rng(rng)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_rectangle(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


class MaskBatch(NamedTuple):
    """The masks of a batch of global crops.

    masks: (n_images, h * w) bool, True = the patch is masked, patches in row-major order;
        image i is row i (crop-major: the first B rows are the first global crop of each image).
    weights: (M,) fp32, M = masks.sum(): 1 / (masked patches of its image) for each masked patch,
        in the order of `masks[masks]` (the `masks_weight` of `iBOTPatchLoss.forward_masked`).
    indices: (M,) int64, the masked patches' positions in masks.flatten(), computed on the CPU
        (DINOv2's `mask_indices_list`): selecting patch tokens with them needs no host sync on
        a GPU, as a boolean index does. None: derived from masks by `select`.
    """
    masks: torch.Tensor
    weights: torch.Tensor
    indices: Optional[torch.Tensor] = None

    @property
    def n_masked(self) -> int:
        return int(self.weights.shape[0])

    @property
    def select(self) -> torch.Tensor:
        """What `MultiCropWrapper(patch_select=...)` takes: the indices, else the masks."""
        return self.indices if self.indices is not None else self.masks

    def to(self, device, non_blocking: bool = False) -> MaskBatch:
        return MaskBatch(*(None if t is None else t.to(device, non_blocking=non_blocking)
                           for t in self))


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """1 / (masked patches of its image) for each masked patch of (n, N) bool masks, in the order
    of masks[masks]."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a bool (n, N) tensor, got {type(masks).__name__}")
    if masks.dtype != torch.bool:  # an integer mask would index, not select
        raise TypeError(f"masks must be a bool (n, N) tensor, got dtype {masks.dtype}")
    if masks.dim() != 2:
        raise ValueError(f"masks must be a bool (n, N) tensor, got shape {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand(masks.shape)[masks]


def sample_masks(n_images: int, grid, ratio_min_max=(0.1, 0.5), probability: float = 0.5,
                 rng: Optional[random.Random] = None,
                 generator: Optional[BlockMaskGenerator] = None) -> MaskBatch:
    """Draw a batch's masks as DINOv2's `collate_data_and_cast` does.

    Args:
        n_images: the number of global-crop images (2 x the batch size in training).
        grid: the patch grid (h, w) of a global crop (or an int for a square one).
        ratio_min_max: (min, max) fraction of a masked image's patches that are masked.
        probability: the fraction of the images that are masked (int(n_images * probability)).
        rng: the random stream, a `random.Random` (default: a fresh unseeded one).
        generator: the rectangle generator, a `BlockMaskGenerator` for `grid` (default
            `BlockMaskGenerator(grid)`).

    Returns:
        A MaskBatch (on the CPU).
    """
    n_images = check_int(n_images, "n_images", 1)
    h, w = _check_grid(grid)
    lo, hi = check_mask_ratio(ratio_min_max)
    probability = check_unit_interval(probability, "mask_sample_probability")
    rng = _check_rng(rng) if rng is not None else random.Random()
    if generator is None:
        generator = BlockMaskGenerator((h, w))
    elif not isinstance(generator, BlockMaskGenerator):
        raise TypeError(f"generator must be a BlockMaskGenerator, got {type(generator).__name__}")
    if (generator.height, generator.width) != (h, w):
        raise ValueError(f"generator is for a {generator.height}x{generator.width} grid, not the "
                         f"{h}x{w} grid given")
    n_patches = h * w
    n_masked_images = int(n_images * probability)
    edges = torch.linspace(lo, hi, n_masked_images + 1).tolist()  # fp32 steps, as DINOv2's
    masks = [generator(int(n_patches * rng.uniform(edges[i], edges[i + 1])), rng)
             for i in range(n_masked_images)]
    masks += [np.zeros((h, w), dtype=bool)] * (n_images - n_masked_images)
    rng.shuffle(masks)
    flat = torch.from_numpy(np.stack(masks).reshape(n_images, n_patches))
    return MaskBatch(flat, mask_weights(flat), flat.flatten().nonzero().squeeze(1))
