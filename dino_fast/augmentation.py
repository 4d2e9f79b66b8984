"""The DINO multi-crop augmentation and the crop-major collate function.

Per image: two global crops and `local_crops_number` local crops, each an independent
random-resized crop (bicubic) followed by the official photometric recipe

    horizontal flip p=0.5; colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
    p=0.8, in random order; grayscale p=0.2; Gaussian blur (p=1.0 global crop 1, p=0.1 global
    crop 2, p=0.5 local crops); solarization p=0.2 (global crop 2 only); to float and normalise.

torchvision does the work: its parameter samplers (`RandomResizedCrop.get_params`,
`ColorJitter.get_params`, drawing from torch's random stream, so `torch.manual_seed` and the
DataLoader's per-worker seeds make the crops reproducible) and its transforms.v2 functional
kernels, on PIL images until the final conversion as the official pipeline. What is written here
is only the composition: calling the v2 transform classes costs 5-10x more than their kernels on
small images (about 1.5-2.5 ms against 0.35 ms per 32 px crop on a 2-core CPU, measured), which
would have made the augmentation rather than the model the cost of a CPU training step. The blur
is PIL's GaussianBlur as in the official code (torchvision's blur on a PIL image is a tensor round
trip, 7x slower at 32 px), with its radius range scaled to the crop size (see `blur_radius`).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

from dino_fast.data import IMAGENET_MEAN, IMAGENET_STD

# The official recipe, at 224 px global crops
COLOR_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
COLOR_JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_RADIUS_224 = (0.1, 2.0)  # PIL GaussianBlur radius (the standard deviation), in pixels
SOLARIZE_THRESHOLD = 128


def check_crop_scale(scale, name: str) -> tuple[float, float]:
    """A random-resized crop's area range: a pair 0 < min <= max <= 1, returned as floats."""
    try:
        lo, hi = (float(s) for s in scale)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (min, max) of area fractions, got {scale!r}") \
            from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale!r}")
    return lo, hi


def check_crop_size(size, name: str) -> int:
    """A crop side in pixels: a positive integer."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"{name} must be a positive integer (pixels), got {size!r}")
    return int(size)


def _rand() -> float:
    return float(torch.rand(1))


class CropTransform:
    """One DINO crop: PIL image -> normalised float32 tensor (3, size, size).

    size: output side in pixels; scale: area fraction range of the random-resized crop (aspect
    ratio 3/4..4/3); blur_p, blur_radius: probability and PIL radius range of the Gaussian blur;
    solarize_p: probability of solarization (threshold 128). Randomness: torch's global stream.
    """

    def __init__(self, size: int, scale: Sequence[float], blur_p: float,
                 blur_radius: tuple[float, float], solarize_p: float = 0.0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.size = check_crop_size(size, "size")
        self.scale = check_crop_scale(scale, "scale")
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.blur_p, self.blur_radius, self.solarize_p = blur_p, blur_radius, solarize_p
        self.mean, self.std = list(mean), list(std)
        # ColorJitter.get_params wants the factor ranges ColorJitter itself derives
        jitter = T.ColorJitter(**COLOR_JITTER)
        self._jitter_ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale),
                                                         list(self.ratio))
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size],
                               interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        if _rand() < FLIP_P:
            image = F.horizontal_flip(image)
        if _rand() < COLOR_JITTER_P:
            image = self._color_jitter(image)
        if _rand() < GRAYSCALE_P:
            image = F.rgb_to_grayscale(image, num_output_channels=3)
        if self.blur_p > 0 and _rand() < self.blur_p:
            lo, hi = self.blur_radius
            radius = lo + (hi - lo) * _rand()
            image = image.filter(ImageFilter.GaussianBlur(radius=radius))
        if self.solarize_p > 0 and _rand() < self.solarize_p:
            image = F.solarize(image, SOLARIZE_THRESHOLD)
        x = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        return F.normalize(x, self.mean, self.std)

    def _color_jitter(self, image: Image.Image) -> Image.Image:
        order, b, c, s, h = T.ColorJitter.get_params(*self._jitter_ranges)
        for fn_id in order.tolist():
            if fn_id == 0 and b is not None:
                image = F.adjust_brightness(image, b)
            elif fn_id == 1 and c is not None:
                image = F.adjust_contrast(image, c)
            elif fn_id == 2 and s is not None:
                image = F.adjust_saturation(image, s)
            elif fn_id == 3 and h is not None:
                image = F.adjust_hue(image, h)
        return image


class DataAugmentationDINO:
    """The official DINO multi-crop augmentation: PIL image -> list of 2 + local_crops_number
    float32 tensors, [global 1 (3, G, G), global 2 (3, G, G), local (3, L, L) ...].

    Args:
        global_crops_scale / local_crops_scale: area fraction ranges of the random-resized crops.
        local_crops_number: number of local crops (the official default: 8).
        global_size / local_size: crop sides in pixels (224 / 96 official; e.g. 32 / 16 at CIFAR
            size). Any input size works; crops are resampled bicubically.
        mean / std: normalisation statistics (ImageNet's by default, as the official code).
        blur_radius: PIL GaussianBlur radius range (the Gaussian's standard deviation, in output
            pixels). Default: the official (0.1, 2.0) scaled by global_size / 224 and used for
            every crop, so 224/96 crops get the official blur exactly and smaller crops the same
            blur relative to the image (a 2 px blur would wipe out a 16 px local crop).

    Randomness comes from torch's global stream: `torch.manual_seed(s)` reproduces the crops.

    Example:
        >>> from PIL import Image
        >>> augment = DataAugmentationDINO(local_crops_number=2, global_size=32, local_size=16)
        >>> [tuple(c.shape) for c in augment(Image.new("RGB", (40, 40)))]
        [(3, 32, 32), (3, 32, 32), (3, 16, 16), (3, 16, 16)]
    """
    crop_transform = CropTransform  # one crop's pipeline (the batched subclass swaps it)

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                 local_crops_number: int = 8, global_size: int = 224, local_size: int = 96,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 blur_radius: Optional[tuple[float, float]] = None):
        if isinstance(local_crops_number, bool) or not isinstance(local_crops_number,
                                                                  numbers.Integral) \
                or local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an integer >= 0, got "
                             f"{local_crops_number!r}")
        global_size = check_crop_size(global_size, "global_size")
        local_size = check_crop_size(local_size, "local_size")
        for name, stats in (("mean", mean), ("std", std)):
            if isinstance(stats, (str, bytes)) or not hasattr(stats, "__len__") or \
                    not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                            and math.isfinite(v) for v in stats):
                raise TypeError(f"{name} must be 3 finite real numbers (RGB), got {stats!r}")
            if len(stats) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {stats!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std!r}")
        if blur_radius is None:
            factor = global_size / 224
            blur_radius = (BLUR_RADIUS_224[0] * factor, BLUR_RADIUS_224[1] * factor)
        lo, hi = (float(r) for r in blur_radius)
        if not 0 <= lo <= hi:
            raise ValueError(f"blur_radius must be a range 0 <= min <= max, got {blur_radius!r}")
        self.local_crops_number = int(local_crops_number)
        self.blur_radius = (lo, hi)
        common = dict(blur_radius=self.blur_radius, mean=mean, std=std)
        # first global crop: always blurred
        self.global_transfo1 = self.crop_transform(global_size, global_crops_scale, blur_p=1.0,
                                                   **common)
        # second global crop: rarely blurred, sometimes solarized
        self.global_transfo2 = self.crop_transform(global_size, global_crops_scale, blur_p=0.1,
                                                   solarize_p=0.2, **common)
        # small crops
        self.local_transfo = self.crop_transform(local_size, local_crops_scale, blur_p=0.5,
                                                 **common)

    @property
    def ncrops(self) -> int:
        """Crops per image: the `ncrops` argument of DINOLoss."""
        return 2 + self.local_crops_number

    def __call__(self, image) -> list[torch.Tensor]:
        image = _to_rgb_pil(image)
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def _to_rgb_pil(image) -> Image.Image:
    if isinstance(image, torch.Tensor):
        image = F.to_pil_image(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"DataAugmentationDINO expects a PIL image (or a (C, H, W) tensor), got "
                        f"{type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def collate_crops(batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(crops, label), ...] -> (crop batches, labels), crop-major.

    crops[v] is (B, 3, h_v, w_v): crop v of every sample, so a MultiCropWrapper gives the
    (V*B, out_dim) rows DINOLoss expects; labels is (B,) int64.
    """
    if len(batch) == 0:
        raise ValueError("collate_crops got an empty batch")
    ncrops = len(batch[0][0])
    for i, (crops, _) in enumerate(batch):
        if len(crops) != ncrops:
            raise ValueError(f"sample {i} has {len(crops)} crops, sample 0 has {ncrops}; every "
                             f"sample must go through the same DataAugmentationDINO")
    out = []
    for v in range(ncrops):
        shapes = {tuple(sample[0][v].shape) for sample in batch}
        if len(shapes) != 1:
            raise ValueError(f"crop {v} has different shapes across the batch: {sorted(shapes)}")
        out.append(torch.stack([sample[0][v] for sample in batch]))
    labels = torch.as_tensor([int(sample[1]) for sample in batch], dtype=torch.int64)
    return out, labels


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """The evaluation transform: PIL image -> normalised float32 tensor (3, image_size,
    image_size).

    Resizes the short side to image_size * 256/224 (bicubic) and takes the central image_size
    square, the official evaluation ratio (256 -> 224 at ImageNet size).

    Example:
        >>> from dino_fast.data import ProceduralShapes
        >>> ProceduralShapes("test", num_samples=1, transform=eval_transform(32))[0][0].shape
        torch.Size([3, 32, 32])
    """
    return T.Compose([
        T.Resize(round(image_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
