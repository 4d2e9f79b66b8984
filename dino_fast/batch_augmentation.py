"""The DINO multi-crop augmentation on whole batches of tensors, on the CPU or the GPU.

`DataAugmentationDINO` (augmentation.py) is the official per-image PIL pipeline: about 2.3 ms per
image on one CPU core for 2 + 4 crops at CIFAR size (32 / 16 px), as much as the ViT's step there.
`BatchedDataAugmentationDINO` draws the same random parameters from the same distributions and
applies the same operations to the whole batch at once, a few tensor calls per operation:

    random-resized crop (torchvision's sampler: 10 tries, then a centre crop) and horizontal flip
        -> PIL's antialiased bicubic resampling of the crop (its filter, support and
        renormalisation at the crop's border) as two batched matrix products, one per axis;
    colour jitter p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; each image its
        own random order, torchvision's formulas), grayscale p=0.2, Gaussian blur (PIL's: three
        box-blur passes per axis with a fractional radius, per-image standard deviation),
        solarization (threshold 128/255), normalisation.

On a CPU in fp32 every crop goes through all of these operations in one compiled pass while it is
in the cache (`dino_fast.cpu_kernels.photometric`, the C kernel of the loss's library; the same
formulas, bit for bit but for the rounding of the resize's and blur's sums and contrast's mean);
elsewhere, or with DINO_FAST_CPU_KERNEL=0, a few tensor calls per operation over the batch.

Input: (B, 3, H, W) uint8 (0..255) or floating images in [0, 1] (a float batch in 0..255 is
not detected and saturates), all of one size (CIFAR, the procedural data). Output:
2 + local_crops_number float32 batches, crop-major as `collate_crops` gives them, on the input's
device. Randomness comes from a `torch.Generator` (CPU) that the caller seeds: the same generator
state draws the same crop parameters on any device (pixels then agree to float rounding). The
parameters are drawn on the CPU and copied with `non_blocking=True`, so on CUDA the augmentation
makes no synchronising call (the normalisation constants are copied once per device).

The one difference from the PIL pipeline: values stay float between operations, where PIL and
torchvision's PIL kernels round to uint8 after each: about 1/255 per operation on average, up
to 15/255 on a pixel for hue (PIL's 8-bit HSV), and see `resized_crops` for the resize's
intermediate clipping.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from dino_fast import cpu_kernels
from dino_fast.augmentation import (
    COLOR_JITTER_P,
    FLIP_P,
    GRAYSCALE_P,
    SOLARIZE_THRESHOLD,
    CropTransform,
    DataAugmentationDINO,
    _to_rgb_pil,
)

RATIO = (3.0 / 4.0, 4.0 / 3.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A CPU parameter tensor on `like`'s device and dtype, copied without a host sync."""
    return t.to(like.device, like.dtype, non_blocking=True)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU index or mask tensor on `device`, copied without a host sync."""
    return t.to(device, non_blocking=True)


@functools.cache
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor, copied to each device once."""
    return torch.tensor(values, dtype=dtype).to(device)


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


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter (a = -0.5), support 2."""
    x = x.abs()
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                     out_size: int) -> torch.Tensor:
    """(N, out_size, in_size) float64 weights of PIL's bicubic resize of pixels
    [start, start + length) of an axis of in_size pixels to out_size pixels, as PIL resizes a
    crop: output pixel i centred at (i + 0.5) * length / out_size in the crop, the filter
    stretched by the shrink factor when shrinking (antialiasing), taps limited to the crop and
    each row renormalised to sum 1 (PIL's precompute_coeffs). start, length: (N,) integers."""
    start, length = start.to(torch.float64), length.to(torch.float64)
    scale = length / out_size
    filterscale = scale.clamp(min=1.0)
    support = 2.0 * filterscale
    center = (torch.arange(out_size, dtype=torch.float64)[None, :] + 0.5) * scale[:, None]
    first = torch.floor(center - support[:, None] + 0.5).clamp(min=0)
    end = torch.minimum(torch.floor(center + support[:, None] + 0.5), length[:, None])
    src = torch.arange(in_size, dtype=torch.float64)[None, None, :] - start[:, None, None]
    taps = (src >= first[..., None]) & (src < end[..., None])
    w = _bicubic((src - center[..., None] + 0.5) / filterscale[:, None, None]) * taps
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total == 0, torch.ones_like(total), total)


# Crops have whole-pixel boxes, so an axis of in_size pixels has in_size * (in_size + 1) / 2
# possible (start, length) pairs: below this many table entries (in_size^2 * out_size, about 4 MB
# of float32 at 64 -> 64 px) their weights are computed once and looked up, which at CIFAR size
# takes a tenth of the time of computing each crop's weights.
RESAMPLE_TABLE_MAX_ENTRIES = 1 << 20


@functools.cache
def _resample_table(in_size: int, out_size: int) -> torch.Tensor:
    """(in_size, in_size + 1, out_size, in_size) float32: entry [start, length] holds
    `resample_weights(start, length, in_size, out_size)` where start + length <= in_size."""
    start, length = torch.meshgrid(torch.arange(in_size), torch.arange(in_size + 1),
                                   indexing="ij")
    valid = (length > 0) & (start + length <= in_size)
    table = torch.zeros(in_size, in_size + 1, out_size, in_size)
    table[valid] = resample_weights(start[valid], length[valid], in_size, out_size).float()
    return table


def crop_resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int,
                          out_size: int) -> torch.Tensor:
    """`resample_weights` as float32, looked up in a table computed once per (in_size, out_size)
    where that table is small, computed otherwise."""
    if in_size * in_size * out_size > RESAMPLE_TABLE_MAX_ENTRIES:
        return resample_weights(start, length, in_size, out_size).float()
    return _resample_table(in_size, out_size)[start, length]


def crop_weights(boxes: torch.Tensor, b: int, height: int, width: int, size: int,
                 flip: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The resize weights of `resized_crops` (its arguments, for b images of height x width):
    (N, size, height) for the rows and (N, size, width) for the columns, float32 on the CPU,
    the columns mirrored where flip[n]."""
    n = boxes.shape[0]
    if n % b:
        raise ValueError(f"boxes must hold a whole number of crops per image: {n} boxes for "
                         f"{b} images")
    top, left, h, w = boxes.unbind(1)
    outside = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > height) | (left + w > width)
    if outside.any():  # boxes are CPU tensors: no device sync
        raise ValueError(f"boxes must lie within the {height}x{width} images with h, w >= 1 "
                         f"(top, left, h, w), got {boxes[outside.nonzero()[0, 0]].tolist()}")
    wx = crop_resample_weights(left, w, width, size)   # (N, size, W)
    wy = crop_resample_weights(top, h, height, size)   # (N, size, H)
    if flip is not None:  # mirrored output columns
        wx = torch.where(flip.to(torch.bool)[:, None, None], wx.flip(1), wx)
    return wy, wx


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int,
                  flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop box n of image n % B (top, left, h, w in pixels), resize it to size x size as PIL
    resizes that crop with its antialiased bicubic filter, computed in float (PIL's mode "F"),
    clamp to [0, 1], and mirror it where flip[n]. images: (B, C, H, W) floating; boxes:
    (R * B, 4) CPU integers as `sample_crop_boxes` returns (R crops of each image); flip:
    (R * B,) CPU booleans. Returns (R * B, C, size, size).

    PIL's 8-bit path also rounds and clips between its two passes (which pass comes first
    depends on the Pillow version and the sizes): that moves pixels by about 1/255, and by up
    to a few percent on the few where a bicubic overshoot at a hard edge was clipped."""
    b, c, height, width = images.shape
    n = boxes.shape[0]
    wy, wx = crop_weights(boxes, b, height, width, size, flip)
    wx = _to(wx, images).view(n // b, b, size, width)
    wy = _to(wy, images).view(n // b, b, size, height)
    x = torch.einsum("bchw,rbtw->rbcht", images, wx)
    x = torch.einsum("rbsh,rbcht->rbcst", wy, x).clamp_(0, 1)
    return x.reshape(n, c, size, size)


# Photometric operations on (B, 3, H, W) float images in [0, 1], one factor per image, with the
# formulas of torchvision's tensor kernels (adjust_hue, rgb_to_grayscale, solarize).

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by factor[b] turns (in [-0.5, 0.5]) through HSV, as torchvision: the hue
    computed with its formulas (as a fraction of a turn, so that it rounds as torchvision's),
    and HSV -> RGB as min + chroma * (each channel's piecewise-linear function of the hue),
    which is torchvision's per-sector choice among v, p, q, t written without the sectors."""
    r, g, b = x.unbind(1)
    # (elementwise max / min of the three planes: the values of x.max(dim=1), several times
    # faster than that reduction on small images)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    cr = maxc - minc
    cr_divisor = torch.where(cr == 0, torch.ones_like(cr), cr)
    max_is_r, max_is_g = maxc == r, maxc == g
    # max r: (g - b) / cr; max g: 2 + (b - r) / cr; max b: 4 + (r - g) / cr (torchvision's
    # hr + hg + hb, one of which is nonzero)
    num = torch.where(max_is_r, g - b, torch.where(max_is_g, b - r, r - g))
    h = num / cr_divisor + torch.where(max_is_r, 0.0, torch.where(max_is_g, 2.0, 4.0))
    # torchvision's fmod(h / 6 + 1, 1): h / 6 + 1 lies in [5/6, 11/6], where subtracting 1 from
    # the values >= 1 is exact, so this is fmod's result bit for bit
    h = h.div_(6.0).add_(1.0)
    h = h.sub_((h >= 1.0).to(h.dtype))
    h = torch.remainder(h + _to(factor, x).view(-1, 1, 1), 1.0) * 6.0
    # r: clamp(|h - 3| - 1), g: clamp(2 - |h - 2|), b: clamp(2 - |h - 4|), each in [0, 1]
    centre, sign, offset = (_constant(values, x.device, x.dtype).view(1, 3, 1, 1) for values in
                            ((3.0, 2.0, 4.0), (1.0, -1.0, -1.0), (-1.0, 2.0, 2.0)))
    shape = ((h.unsqueeze(1) - centre).abs_().mul_(sign).add_(offset)).clamp_(0.0, 1.0)
    return shape.mul_(cr.unsqueeze(1)).add_(minc.unsqueeze(1))


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD / 255) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis


def box_blur_radius(sigma: torch.Tensor, passes: int = BLUR_PASSES) -> torch.Tensor:
    """The fractional box radius whose `passes` box blurs have variance sigma ** 2 (PIL's
    _gaussian_blur_radius, after Gwosdek et al. 2011)."""
    s2 = sigma.to(torch.float64) ** 2 / passes
    length = torch.sqrt(12.0 * s2 + 1.0)
    whole = torch.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
    return whole + frac


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """PIL's GaussianBlur(radius=sigma[b]) of image b (sigma > 0, a CPU tensor): per axis, three
    passes of a box blur of fractional radius r (weight 1 / (2r + 1) on the int(r) pixels each
    side and the centre, the remainder split between the next pixel on either side), edges
    replicated; each axis's passes are applied as one matrix per image (`blur_matrices`)."""
    down, across = (_to(m, x) for m in blur_matrices(sigma, x.shape[2], x.shape[3]))
    return down[:, None] @ x @ across[:, None].transpose(-1, -2)


def blur_matrices(sigma: torch.Tensor, height: int, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrices of `gaussian_blur` for standard deviations sigma (b,): (b, height, height)
    and (b, width, width) float64, the blurred image being down @ x @ across^T."""
    kernel, reach = box_kernels(sigma)
    # the three replicate-edge passes of each axis as one (size, size) matrix per image
    return _box_passes_matrix(kernel, reach, height), _box_passes_matrix(kernel, reach, width)


def box_kernels(sigma: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The box kernel of one pass of PIL's blur for standard deviations sigma (b,): (b, 2 * reach
    + 1) float64 taps centred on the pixel, and reach."""
    r = box_blur_radius(sigma)
    whole = torch.floor(r)
    inner = 1.0 / (2 * r + 1)
    outer = (1.0 - (2 * whole + 1) * inner) / 2
    reach = int(whole.max()) + 1
    offsets = torch.arange(-reach, reach + 1, dtype=torch.float64).abs()[None, :]
    kernel = torch.where(offsets <= whole[:, None], inner[:, None],
                         torch.where(offsets == whole[:, None] + 1, outer[:, None],
                                     torch.zeros(())))
    return kernel, reach


def _box_passes_matrix(kernel: torch.Tensor, reach: int, size: int) -> torch.Tensor:
    """(b, size, size) float64: BLUR_PASSES passes of the box blur of `kernel[b]` (2 * reach + 1
    taps centred on the pixel) along an axis of `size` pixels with its edge pixels replicated,
    as the matrix M with out = M @ column."""
    b, taps = kernel.shape
    source = (torch.arange(size)[:, None] + torch.arange(-reach, reach + 1)[None, :]
              ).clamp_(0, size - 1)  # replicated edges: taps beyond the border read the edge
    one = torch.zeros(b, size, size, dtype=kernel.dtype)
    one.scatter_add_(2, source.expand(b, size, taps), kernel[:, None, :].expand(b, size, taps))
    out = one
    for _ in range(BLUR_PASSES - 1):
        out = one @ out
    return out


def color_jitter(x: torch.Tensor, apply: torch.Tensor, order: torch.Tensor,
                 factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchvision's ColorJitter with per-image parameters: where apply[b], image b goes through
    brightness (0), contrast (1), saturation (2) and hue (3) in the order order[b] (a permutation
    of 0..3) with factors[op][b]. apply, order and factors are CPU tensors.

    At each of the 4 positions, brightness, contrast and saturation are one blend for the whole
    batch, f * x + (1 - f) * m with m = 0, the mean grey level or the grey image (torchvision's
    formulas), f = 1 (exactly the identity) for the images that apply another operation there;
    hue, whose HSV round trip is not exact, runs on the images that apply it only. May write
    into x (pass a copy to keep it)."""
    for position in range(4):
        op = torch.where(apply, order[:, position], torch.full_like(order[:, position], -1))
        blend = (op >= 0) & (op <= 2)
        if blend.any():
            f = torch.ones(len(op))
            for k in range(3):
                f = torch.where(op == k, factors[k], f)
            gray = grayscale(x)
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            use_mean = _on(op == 1, x.device).view(-1, 1, 1, 1)
            use_gray = _on(op == 2, x.device).view(-1, 1, 1, 1)
            other = torch.where(use_gray, gray, torch.where(use_mean, mean, 0.0))
            f = _to(f, x).view(-1, 1, 1, 1)
            x = (f * x + (1 - f) * other).clamp_(0, 1)
        hue = op == 3
        if hue.any():
            idx = torch.nonzero(hue)[:, 0]
            rows = _on(idx, x.device)
            x[rows] = adjust_hue(x[rows], factors[3][idx])
    return x


class BatchedCropTransform(CropTransform):
    """One DINO crop of every image of a batch: the batched counterpart of `CropTransform`, with
    the same arguments. Call: (images (B, 3, H, W) float in [0, 1], generator, repeats=1) ->
    normalised float32 (repeats * B, 3, size, size); row r * B + b is the r-th independent crop of
    image b. Probabilities are attributes (flip_p, jitter_p, grayscale_p, blur_p, solarize_p) so
    that tests can switch operations on and off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flip_p, self.jitter_p, self.grayscale_p = FLIP_P, COLOR_JITTER_P, GRAYSCALE_P

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 repeats: int = 1) -> torch.Tensor:
        b, _, height, width = images.shape
        n, dev = repeats * b, images.device

        def coin(p: float) -> torch.Tensor:  # always drawn, so the stream does not depend on p
            return torch.rand(n, generator=generator) < p

        boxes = sample_crop_boxes(n, height, width, self.scale, self.ratio, generator)
        flip = coin(self.flip_p)

        jitter = coin(self.jitter_p)
        order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # each image its own order
        factors = [_uniform(n, lo, hi, generator).float() for lo, hi in self._jitter_ranges]
        gray = coin(self.grayscale_p)
        blur = coin(self.blur_p)
        sigma = _uniform(n, *self.blur_radius, generator).float()
        blur_idx = torch.nonzero(blur & (sigma > 0))[:, 0]
        sol = coin(self.solarize_p)
        mean = _constant(tuple(self.mean), dev, images.dtype).view(1, 3, 1, 1)
        std = _constant(tuple(self.std), dev, images.dtype).view(1, 3, 1, 1)

        fn = cpu_kernels.photometric_kernel() if dev.type == "cpu" and \
            images.dtype == torch.float32 else None
        if fn is not None:  # the same operations, one pass per crop (cpu_kernels.photometric)
            size = self.size
            ops = torch.where(jitter[:, None], order, torch.full_like(order, -1))
            slot = torch.full((n,), -1, dtype=torch.int64)
            slot[blur_idx] = torch.arange(len(blur_idx))
            taps, reach = box_kernels(sigma[blur_idx]) if len(blur_idx) else \
                (torch.zeros(1, 1), 0)
            x = torch.empty(n, 3, size, size)
            return cpu_kernels.photometric(
                fn, x, ops, torch.stack(factors, 1), gray, slot, taps, reach, sol,
                SOLARIZE_THRESHOLD / 255, mean, std,
                crop_from=(images.contiguous(), *crop_weights(boxes, b, height, width, size, flip)))

        x = resized_crops(images, boxes, self.size, flip=flip)
        x = color_jitter(x, jitter, order, factors)
        if gray.any():  # (a CPU test: no sync)
            x = torch.where(_on(gray, dev).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        if len(blur_idx):
            rows = _on(blur_idx, dev)
            x[rows] = gaussian_blur(x[rows], sigma[blur_idx])
        if sol.any():
            x = torch.where(_on(sol, dev).view(-1, 1, 1, 1), solarize(x), x)
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
    DINOLoss take. The same generator state gives the same crops on every device.

    Example:
        >>> augment = BatchedDataAugmentationDINO(local_crops_number=2, global_size=32,
        ...                                       local_size=16)
        >>> images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> [tuple(c.shape) for c in augment(images, torch.Generator().manual_seed(0))]
        [(8, 3, 32, 32), (8, 3, 32, 32), (8, 3, 16, 16), (8, 3, 16, 16)]
    """
    crop_transform = BatchedCropTransform

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator (the crops' random "
                            f"parameters are drawn on the CPU), got {generator!r}")
        x = as_float_images(images)
        crops = [self.global_transfo1(x, generator), self.global_transfo2(x, generator)]
        if self.local_crops_number:  # one call for all local crops (crop j of image b: row j*B+b)
            local = self.local_transfo(x, generator, repeats=self.local_crops_number)
            crops.extend(local.chunk(self.local_crops_number))
        return crops


def to_uint8_tensor(image) -> torch.Tensor:
    """Dataset transform for the batched augmentation: PIL image (or (C, H, W) tensor) ->
    (3, H, W) uint8 RGB tensor, so that a DataLoader moves bytes and the crops are made later,
    batch by batch."""
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
