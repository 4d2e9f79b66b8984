"""The DINO multi-crop augmentation on whole batches of tensors, on the CPU or the GPU.

`DataAugmentationDINO` (augmentation.py) is the official per-image PIL pipeline: about 2.3 ms per
image on one CPU core for 2 + 4 crops at CIFAR size (32 / 16 px), as much as the ViT's step there.
`BatchedDataAugmentationDINO` draws the same random parameters from the same distributions and
applies the same operations with one tensor call per operation for the whole batch:

    random-resized crop (torchvision's sampler: 10 tries, then a centre crop) and horizontal flip
        -> one affine grid per image and one bicubic `grid_sample`;
    colour jitter p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; each image its
        own random order), grayscale p=0.2, Gaussian blur (per-image standard deviation, one
        grouped separable convolution), solarization (threshold 128/255), normalisation.

Input: (B, 3, H, W) uint8 (0..255) or floating (0..1) images, all of one size (CIFAR, the
procedural data). Output: 2 + local_crops_number float32 batches, crop-major as `collate_crops`
gives them, on the input's device. Randomness comes from a `torch.Generator` (CPU) that the
caller seeds: the same generator state gives the same crops on any device.

Differences from the PIL pipeline, by design: the crop is sampled from the whole image with
bicubic weights (PIL's crop-then-resize clamps at the crop's border; only the outermost output
pixels can differ); values stay float between operations (PIL rounds to uint8 after each); and
there is no antialiasing, so crops that shrink the source by more than about 1.5x alias (at CIFAR
size global crops are enlarged and local crops shrunk by at most 1.25x; feed large images
resized close to the crop size).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dino_fast.augmentation import (COLOR_JITTER_P, FLIP_P, GRAYSCALE_P, SOLARIZE_THRESHOLD,
                                    CropTransform, DataAugmentationDINO, _to_rgb_pil)

RATIO = (3.0 / 4.0, 4.0 / 3.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float],
                      ratio: Sequence[float] = RATIO,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, h, w), drawn as torchvision's `RandomResizedCrop.get_params`
    draws one: up to 10 tries of an area fraction in `scale` and a log-uniform aspect ratio in
    `ratio`, the first that fits the image wins; with none, the largest centred crop whose aspect
    is clamped to `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    tries = 10
    target = area * _uniform(n * tries, scale[0], scale[1], generator).view(n, tries)
    aspect = torch.exp(_uniform(n * tries, log_lo, log_hi, generator)).view(n, tries)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.long().argmax(1), torch.full((n,), -1))
    found = first >= 0
    pick = first.clamp(min=0)[:, None]
    h = h.gather(1, pick)[:, 0]
    w = w.gather(1, pick)[:, 0]
    # fallback: torchvision's centre crop
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    # positions uniform over the valid offsets, as randint(0, H - h + 1)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - h + 1)).long().clamp(max=height - h)
    left = torch.floor(u[:, 1] * (width - w + 1)).long().clamp(max=width - w)
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int,
                  flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop box b of image b (top, left, h, w in pixels), resize it to size x size bicubically
    (output pixel centres sampled at their place in the box, as `interpolate` with
    align_corners=False) and mirror it where flip[b]; values clamped to [0, 1].
    images: (B, C, H, W) floating; boxes: (B, 4) as `sample_crop_boxes` returns."""
    b, _, height, width = images.shape
    boxes = boxes.to(torch.float64)
    top, left, h, w = boxes.unbind(1)
    sx = w / width
    if flip is not None:
        sx = torch.where(flip.to(torch.bool).cpu(), -sx, sx)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.to(images.device, images.dtype), [b, 1, size, size],
                         align_corners=False)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


# Photometric operations on (B, 3, H, W) float images in [0, 1], one factor per image, with the
# formulas of torchvision's tensor kernels (adjust_brightness / contrast / saturation / hue,
# rgb_to_grayscale, solarize).

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by factor[b] turns (in [-0.5, 0.5]) through HSV, as torchvision."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + factor.view(-1, 1, 1).to(x.dtype), 1.0)
    # HSV -> RGB: sector i of the hue picks each channel among (v, p, q, t)
    v = maxc
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s + s * f)).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)  # (B, 4, H, W)
    select = _HSV_SELECT.to(x.device)[:, i.long().remainder(6)]  # (3, B, H, W)
    return vpqt.gather(1, select.transpose(0, 1))


# channel r, g, b of hue sector 0..5 as an index into (v, p, q, t)
_HSV_SELECT = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD / 255) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image b with a Gaussian of standard deviation sigma[b] pixels (> 0): separable, kernel
    radius ceil(3 max sigma) (at most side - 1), reflected borders, as torchvision's
    gaussian_blur with that kernel size; one multiply-add per tap and direction."""
    b, c, height, width = x.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, height - 1, width - 1)  # reflect padding needs radius < side
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.to(x.device, x.dtype)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(b, 1, 1, 1, -1)
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = sum(kernel[..., k] * y[..., k:k + width] for k in range(2 * radius + 1))
    y = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return sum(kernel[..., k] * y[..., k:k + height, :] for k in range(2 * radius + 1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, apply: torch.Tensor, order: torch.Tensor,
                 factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchvision's ColorJitter with per-image parameters: where apply[b], image b goes through
    brightness (0), contrast (1), saturation (2) and hue (3) in the order order[b] (a permutation
    of 0..3) with factors[op][b]. apply, order and factors are CPU tensors.

    At each of the 4 positions every image applies the operation its order puts there, the others
    get that operation's identity factor (exact for brightness, contrast and saturation); hue,
    whose HSV round trip is not exact, runs on the images that apply it only."""
    dev = x.device
    for position in range(4):
        for op in range(4):
            chosen = apply & (order[:, position] == op)
            if not chosen.any():
                continue
            if op == 3:
                idx = torch.nonzero(chosen)[:, 0]
                x[idx.to(dev)] = adjust_hue(x[idx.to(dev)], factors[3][idx].to(dev))
            else:
                factor = torch.where(chosen, factors[op], torch.ones(()))
                x = _JITTER_OPS[op](x, factor.to(dev))
    return x


class BatchedCropTransform(CropTransform):
    """One DINO crop of every image of a batch: the batched counterpart of `CropTransform`, with
    the same arguments. Call: (images (B, 3, H, W) float in [0, 1], generator) -> normalised
    float32 (B, 3, size, size). Probabilities are attributes (flip_p, jitter_p, grayscale_p,
    blur_p, solarize_p) so that tests can switch operations on and off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flip_p, self.jitter_p, self.grayscale_p = FLIP_P, COLOR_JITTER_P, GRAYSCALE_P

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        dev = images.device

        def coin(p: float) -> torch.Tensor:  # always drawn, so the stream does not depend on p
            return torch.rand(n, generator=generator) < p

        boxes = sample_crop_boxes(n, height, width, self.scale, self.ratio, generator)
        x = resized_crops(images, boxes, self.size, flip=coin(self.flip_p))

        jitter = coin(self.jitter_p)
        order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # each image its own order
        factors = [_uniform(n, lo, hi, generator).float() for lo, hi in self._jitter_ranges]
        x = color_jitter(x, jitter, order, factors)

        gray = coin(self.grayscale_p).to(dev).view(-1, 1, 1, 1)
        x = torch.where(gray, grayscale(x).expand_as(x), x)

        blur = coin(self.blur_p)
        sigma = _uniform(n, *self.blur_radius, generator).float()
        idx = torch.nonzero(blur & (sigma > 0))[:, 0]
        if len(idx):
            idx_d = idx.to(dev)
            x[idx_d] = gaussian_blur(x[idx_d], sigma[idx])

        sol = coin(self.solarize_p).to(dev).view(-1, 1, 1, 1)
        x = torch.where(sol, solarize(x), x)

        mean = torch.tensor(self.mean, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def as_float_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Check a (B, 3, H, W) batch and return it as float32 in [0, 1] (uint8 is divided by 255)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a (B, 3, H, W) tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (B, 3, H, W) RGB batch, got shape "
                         f"{tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not images.is_floating_point():
        raise TypeError(f"{name} must be uint8 (0..255) or floating (0..1), got {images.dtype}")
    return images.float()


class BatchedDataAugmentationDINO(DataAugmentationDINO):
    """The DINO multi-crop augmentation of `DataAugmentationDINO` (same arguments, same recipe:
    global crop 1 always blurred, global crop 2 blurred with p=0.1 and solarized with p=0.2,
    local crops blurred with p=0.5), applied to a whole batch of equally sized images at once.

    Call: aug(images, generator) with images (B, 3, H, W) uint8 or float in [0, 1] on any device
    and a seeded CPU `torch.Generator`; returns [global 1 (B, 3, G, G), global 2, local
    (B, 3, L, L) ...], float32, on the images' device: the crop-major list MultiCropWrapper and
    DINOLoss take.
    """
    crop_transform = BatchedCropTransform

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator (the crops' random "
                            f"parameters are drawn on the CPU), got {generator!r}")
        x = as_float_images(images)
        crops = [self.global_transfo1(x, generator), self.global_transfo2(x, generator)]
        if self.local_crops_number:  # one call for all local crops: local crop j of image b is
            # row j * B + b
            local = self.local_transfo(x.repeat(self.local_crops_number, 1, 1, 1), generator)
            crops.extend(local.chunk(self.local_crops_number))
        return crops


def to_uint8_tensor(image) -> torch.Tensor:
    """Dataset transform for the batched augmentation: PIL image (or (C, H, W) tensor) ->
    (3, H, W) uint8 RGB tensor, so that a DataLoader moves bytes and the crops are made later,
    batch by batch."""
    from torchvision.transforms.v2.functional import pil_to_tensor
    return pil_to_tensor(_to_rgb_pil(image))


def collate_images(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image (3, H, W), label), ...] -> (images (B, 3, H, W), labels (B,) int64)."""
    if len(batch) == 0:
        raise ValueError("collate_images got an empty batch")
    shapes = sorted({tuple(image.shape) for image, _ in batch})
    if len(shapes) != 1:
        raise ValueError(f"the batched augmentation needs images of one size, this batch has "
                         f"{shapes}: resize the data set to one size or use the per-image "
                         f"augmentation (--augmentation pil)")
    images = torch.stack([image for image, _ in batch])
    labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.int64)
    return images, labels
