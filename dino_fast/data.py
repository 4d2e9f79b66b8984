"""Datasets: the built-in procedural shapes, image folders and CIFAR-10.

`ProceduralShapes` needs no files: every image is drawn on the fly from (seed, split, index).
Each image is a 3 x 3 grid of copies of its class's shape (each copy with its own size, jitter and
rotation) on a textured background; brightness, polarity, a faint tint and the texture are
nuisances, so a representation that k-NN classifies well has learnt shape.

Why a grid of muted shapes: DINO learns whatever two crops of one image share after the
augmentation. With one shape per image in saturated random colours, the colours are what the
crops share most, and a 4-minute CPU run learns them: k-NN on shape stays at chance (10.7 %
before, 10.5 % after). Repeating the shape puts it in every crop, local ones included, and
muting the colours leaves the shape the strongest thing the crops share.

`build_dataset(data_path, split, transform)` picks the dataset from a string: "procedural", an
image folder, or "cifar10[:root]"; `eval_split` names the held-out split of a data path and
`subset` takes a fixed random subset. IMAGENET_MEAN / IMAGENET_STD are the normalisation
statistics the augmentation and the evaluation transform share.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset

# Per-channel RGB statistics of ImageNet, used to normalise every image (as the official code)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow",
          "frame", "pacman", "tee", "hexagon")
SPLITS = {"train": 0, "test": 1}
DEFAULT_NUM_SAMPLES = {"train": 10_000, "test": 2_000}
TEXTURES = ("noise", "stripes", "checker", "gradient", "blobs")
GRID = 3  # copies of the shape per image side
TINT = 0.1  # largest departure of a colour channel from the image's grey level
TEXTURE_CONTRAST = 0.15  # largest channel difference between the two background colours

# Shape outlines on the unit disk (radius 1, centred at 0), before rotation and scaling.


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_CROSS_W = 0.33  # half-width of the arms
_OUTLINES = {
    "square": _regular_polygon(4, phase=np.pi / 4),
    "triangle": _regular_polygon(3, phase=np.pi / 2),
    "hexagon": _regular_polygon(6),
    "star": _star(),
    "cross": np.array([(-_CROSS_W, -1), (_CROSS_W, -1), (_CROSS_W, -_CROSS_W), (1, -_CROSS_W),
                       (1, _CROSS_W), (_CROSS_W, _CROSS_W), (_CROSS_W, 1), (-_CROSS_W, 1),
                       (-_CROSS_W, _CROSS_W), (-1, _CROSS_W), (-1, -_CROSS_W),
                       (-_CROSS_W, -_CROSS_W)], dtype=float),
    "arrow": np.array([(-0.9, -0.3), (0.1, -0.3), (0.1, -0.8), (0.95, 0), (0.1, 0.8),
                       (0.1, 0.3), (-0.9, 0.3)], dtype=float),
    "tee": np.array([(-0.9, -0.9), (0.9, -0.9), (0.9, -0.45), (0.25, -0.45), (0.25, 0.95),
                     (-0.25, 0.95), (-0.25, -0.45), (-0.9, -0.45)], dtype=float),
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                theta: float) -> None:
    """Fill `shape` (255 on 0) of radius r at (cx, cy), rotated by theta, on an 'L' mask."""
    c, s = math.cos(theta), math.sin(theta)

    def place(points: np.ndarray) -> list:
        x = cx + r * (c * points[:, 0] - s * points[:, 1])
        y = cy + r * (s * points[:, 0] + c * points[:, 1])
        return list(zip(x.tolist(), y.tolist()))

    def disk(x, y, radius, fill):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)

    if shape in _OUTLINES:
        draw.polygon(place(_OUTLINES[shape]), fill=255)
    elif shape == "circle":
        disk(cx, cy, r, 255)
    elif shape == "ring":
        disk(cx, cy, r, 255)
        disk(cx, cy, 0.55 * r, 0)
    elif shape == "crescent":
        disk(cx, cy, r, 255)
        disk(cx + 0.5 * r * c, cy + 0.5 * r * s, 0.85 * r, 0)
    elif shape == "frame":
        draw.polygon(place(_OUTLINES["square"] * 0.95), fill=255)
        draw.polygon(place(_OUTLINES["square"] * 0.55), fill=0)
    elif shape == "pacman":
        start = math.degrees(theta) + 35
        draw.pieslice([cx - r, cy - r, cx + r, cy + r], start, start + 290, fill=255)
    else:  # pragma: no cover - SHAPES and this function are kept in sync
        raise AssertionError(shape)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size) pattern in [0, 1]: one of TEXTURES with random frequency and phase."""
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    if kind == "noise":
        return rng.random((size, size), dtype=np.float32)
    xx = (np.arange(size, dtype=np.float32) / size)[None, :]
    yy = xx.T
    angle = rng.uniform(0, np.pi)
    u = xx * np.float32(math.cos(angle)) + yy * np.float32(math.sin(angle))  # (size, size)
    if kind == "stripes":
        freq = np.float32(2 * np.pi * rng.uniform(2, 6))
        phase = np.float32(2 * np.pi * rng.random())
        return 0.5 + 0.5 * np.sin(freq * u + phase)
    if kind == "checker":
        cells = rng.integers(2, 7)
        return ((np.floor(xx * cells + rng.random()) + np.floor(yy * cells + rng.random()))
                % 2).astype(np.float32)
    if kind == "gradient":
        return (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    # blobs: a coarse random grid, upsampled smoothly
    coarse = (rng.random((4, 4)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC),
                      dtype=np.float32) / 255


class ProceduralShapes(Dataset):
    """Images of shapes, each class one shape, generated deterministically on the fly.

    Args:
        split: "train" or "test" (held out: a different random stream, so no image is shared).
        num_samples: dataset length (default 10,000 train / 2,000 test). Label of index i is
            i % num_classes, so classes are balanced (sizes differ by at most one).
        image_size: side in pixels (32 or 64 are the intended sizes; any size >= 8 works).
        num_classes: 2..12, the first num_classes of SHAPES.
        transform: applied to the PIL image (e.g. DataAugmentationDINO).
        seed: the image of (seed, split, index) never changes (numpy's PCG64 seeded by those
            three).
        cache: keep the rendered images (uint8 arrays) in memory after their first use.

    Nuisances, each drawn independently per image (and per copy for the geometry): a grey level
    in [0.1, 0.9] with a tint of at most +-0.1 per channel, a background texture (noise,
    stripes, checker, gradient, blobs) of weak contrast, the polarity (near-white shapes on a
    dark background, near-black ones on a light one), each copy's radius (32-45 % of its grid
    cell), a jitter of +-5 % of the cell, its rotation, and mild pixel noise. Shapes are drawn at
    4x (2x from 64 px on) and downsampled, so edges are antialiased.

    __getitem__ -> (transform(PIL RGB image), int label). Rendering takes about 0.4 ms for a
    32 px image and 0.8 ms for a 64 px one on one core of a busy 2-core CPU (measured), a small
    fraction of the multi-crop augmentation's cost.

    Example:
        >>> ds = ProceduralShapes("train", num_samples=100, image_size=32)
        >>> image, label = ds[3]
        >>> image.size, label, len(ds)
        ((32, 32), 3, 100)
    """

    classes_all = SHAPES

    def __init__(self, split: str = "train", num_samples: Optional[int] = None,
                 image_size: int = 32, num_classes: int = 10,
                 transform: Optional[Callable] = None, seed: int = 0, cache: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if num_samples is None:
            num_samples = DEFAULT_NUM_SAMPLES[split]
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8 (pixels), got {image_size!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
                or not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be an integer in [2, {len(SHAPES)}], got "
                             f"{num_classes!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split, self.num_samples, self.image_size = split, num_samples, image_size
        self.num_classes, self.transform, self.seed = num_classes, transform, seed
        self.classes = list(SHAPES[:num_classes])
        self.supersample = 4 if image_size < 64 else 2
        self._cache: Optional[dict] = {} if cache else None

    @property
    def targets(self) -> list[int]:
        """Labels in index order, as torchvision datasets expose them."""
        return [i % self.num_classes for i in range(self.num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        label = index % self.num_classes
        if self._cache is not None and index in self._cache:
            pixels = self._cache[index]
        else:
            pixels = self.render(index)
            if self._cache is not None:
                self._cache[index] = pixels
        image = Image.fromarray(pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def render(self, index: int) -> np.ndarray:
        """The (image_size, image_size, 3) uint8 image of `index`."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        size, ss = self.image_size, self.supersample
        shape = SHAPES[index % self.num_classes]

        # background: two nearby, muted colours around a grey level, mixed by a weak texture
        # (float32 throughout: this is the hot loop of a CPU training run's data loading)
        grey = np.float32(rng.uniform(0.1, 0.9))
        bg_a = np.clip(grey + rng.uniform(-TINT, TINT, 3).astype(np.float32), 0, 1)
        bg_b = np.clip(bg_a + rng.uniform(-TEXTURE_CONTRAST, TEXTURE_CONTRAST, 3)
                       .astype(np.float32), 0, 1)
        t = _texture(rng, size)
        background = bg_a + (bg_b - bg_a) * t[..., None]  # (size, size, 3)

        # foreground: near white on a dark background, near black on a light one
        fg_grey = 1.0 if grey < 0.5 else 0.0
        fg = np.clip(fg_grey + rng.uniform(-TINT, TINT, 3), 0, 1).astype(np.float32)

        # geometry, on the supersampled canvas: one copy of the shape per grid cell
        canvas = size * ss
        cell = canvas / GRID
        mask = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(mask)
        for row in range(GRID):
            for col in range(GRID):
                r = rng.uniform(0.32, 0.45) * cell
                cx, cy = (np.array([col, row]) + 0.5 + rng.uniform(-0.05, 0.05, 2)) * cell
                _draw_shape(draw, shape, float(cx), float(cy), r, rng.uniform(0, 2 * np.pi))
        alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None]
        alpha /= 255

        image = background
        image += (fg - background) * alpha
        image += rng.standard_normal(image.shape, dtype=np.float32) * 0.02
        image *= 255
        image += 0.5
        return np.clip(image, 0, 255, out=image).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Choosing a dataset from --data_path
# --------------------------------------------------------------------------------------------

CIFAR10_DEFAULT_ROOT = os.path.join("~", ".cache", "dino_fast", "cifar10")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB; an unreadable file raises OSError naming it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except OSError as exc:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise OSError(f"cannot read image {path}: {exc}") from exc


def build_dataset(data_path: str = "procedural", split: str = "train",
                  transform: Optional[Callable] = None, image_size: int = 32, *,
                  num_samples: Optional[int] = None, seed: int = 0,
                  download: bool = False) -> Dataset:
    """The dataset named by `data_path`, for `split` ("train" or "test"; "val" for folders).

    Args:
        data_path:
          "procedural"        ProceduralShapes(split, num_samples, image_size, seed=seed)
          "cifar10[:root]"    torchvision CIFAR10 under root (default ~/.cache/dino_fast/cifar10);
                              downloads only with download=True
          a folder            torchvision ImageFolder on data_path/split when that folder exists,
                              else on data_path itself (class subfolders of images)
        split: "train", "test" or (folders) "val".
        transform: applied to each PIL image.
        image_size, num_samples, seed: only for "procedural" (real images keep their size; the
            transform resizes).
        download: let torchvision fetch CIFAR-10 (needs internet).

    Returns:
        A map-style dataset of (transform(image), int label).

    Raises FileNotFoundError naming the path for a missing or empty folder; an unreadable
    image raises OSError naming the file when it is loaded.

    Example:
        >>> len(build_dataset("procedural", "test", num_samples=50))
        50
    """
    if not isinstance(data_path, (str, os.PathLike)):
        raise TypeError(f"data_path must be a string or a path, got {type(data_path).__name__}")
    data_path = os.fspath(data_path)
    if data_path == "procedural":
        return ProceduralShapes(split, num_samples=num_samples, image_size=image_size,
                                transform=transform, seed=seed)
    if data_path == "cifar10" or data_path.startswith("cifar10:"):
        root = data_path.partition(":")[2] or CIFAR10_DEFAULT_ROOT
        return _cifar10(os.path.expanduser(root), split, transform, download)
    return _image_folder(data_path, split, transform)


def _cifar10(root: str, split: str, transform, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10
    if split not in SPLITS:
        raise ValueError(f"CIFAR-10 has the splits 'train' and 'test', got {split!r}")
    try:
        return CIFAR10(root, train=split == "train", transform=transform, download=download)
    except RuntimeError as exc:
        if download:
            raise
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root}: put the extracted python version there "
            f"({os.path.join(root, 'cifar-10-batches-py')}/data_batch_1 ... test_batch, from "
            f"cifar-10-python.tar.gz), pass download=True to fetch it (needs internet), or point "
            f"data_path at an image folder with train/ and test/ class subfolders "
            f"({exc})") from None


def _image_folder(data_path: str, split: str, transform) -> Dataset:
    from torchvision.datasets import ImageFolder
    path = Path(data_path)
    if not path.exists():
        raise FileNotFoundError(f"data_path {data_path} does not exist (expected an image folder "
                                f"with class subfolders, 'procedural' or 'cifar10[:root]')")
    if not path.is_dir():
        raise NotADirectoryError(f"data_path {data_path} is not a folder (expected an image "
                                 f"folder with class subfolders, 'procedural' or "
                                 f"'cifar10[:root]')")
    if (path / split).is_dir():
        root = path / split
    else:
        splits = [s for s in ("train", "val", "test") if (path / s).is_dir()]
        if splits:  # a split layout without this split: do not treat train/ as a class
            raise FileNotFoundError(f"{data_path} has the split folders {splits} but no "
                                    f"{split}/ folder")
        root = path
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as exc:  # no class folder, or no image file in any of them
        raise FileNotFoundError(f"no images in {root}: expected class subfolders holding image "
                                f"files ({exc})") from None


def eval_split(data_path: str) -> str:
    """The held-out split of a data path: 'test', or 'val' for an image folder that has val/ and
    no test/ (the ImageNet layout).

    Example:
        >>> eval_split("procedural")
        'test'
    """
    path = Path(data_path)
    if path.is_dir() and not (path / "test").is_dir() and (path / "val").is_dir():
        return "val"
    return "test"


def subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """A fixed random subset of `n` images of `dataset`.

    Args:
        dataset: any map-style dataset.
        n: number of images to keep; `n <= 0` or `n >= len(dataset)` keeps the whole dataset.
        seed: the subset is a function of (seed, len(dataset)) only.

    Returns:
        `dataset` itself, or a `torch.utils.data.Subset` of it.
    """
    if n <= 0 or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].tolist())


class InMemoryDataset(Dataset):
    """Items (image tensor, int label) kept in two tensors: what `cache_in_memory` returns."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def cache_in_memory(dataset: Dataset, max_bytes: int = 2 << 30) -> Dataset:
    """`dataset` with every item computed once and kept, for a training process that loads its
    own data (no loader workers: on a CPU they only take time from the training threads).

    The items must come from a deterministic transform (the batched augmentation's uint8
    images, the evaluation transform; the procedural images are drawn from their index), each
    (a tensor of one shape and dtype, an int label): then an epoch or a k-NN evaluation reads
    memory instead of decoding (or drawing) every image again. Returns `dataset` itself, having
    read only its first item, when the images would take more than `max_bytes`, when an item is
    not a tensor, or (after reading up to it) when one differs in shape or dtype from the first.

    Example:
        >>> from dino_fast.batch_augmentation import to_uint8_tensor
        >>> cached = cache_in_memory(ProceduralShapes("test", 100, transform=to_uint8_tensor))
        >>> type(cached).__name__, tuple(cached[0][0].shape), cached[0][1]
        ('InMemoryDataset', (3, 32, 32), 0)
    """
    n = len(dataset)
    if n == 0:
        return dataset
    first, first_label = dataset[0]
    if not isinstance(first, torch.Tensor) or n * first.nbytes > max_bytes:
        return dataset
    images = torch.empty((n, *first.shape), dtype=first.dtype)
    labels = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        image, label = dataset[i] if i else (first, first_label)
        if not isinstance(image, torch.Tensor) or image.shape != first.shape or \
                image.dtype != first.dtype:
            return dataset
        images[i] = image
        labels[i] = int(label)
    return InMemoryDataset(images, labels)
