"""The batched multi-crop augmentation: every operation against torchvision's kernel on the same
parameters, the crop sampler against torchvision's, the recipe's probabilities per crop, seeding,
shapes and devices, bad input, and the loader pieces (uint8 transform, collate)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

import dino_fast.batch_augmentation as B
from dino_fast.augmentation import DataAugmentationDINO
from dino_fast.batch_augmentation import (BatchedDataAugmentationDINO, collate_images,
                                          sample_crop_boxes, to_uint8_tensor)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=8, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=gen(seed))


# ---------------------------------------------------------------- shapes, seeding, input types

@pytest.mark.parametrize("global_size,local_size,nlocal,src", [(32, 16, 4, 32), (32, 16, 0, 32),
                                                               (24, 8, 3, 40)])
def test_crop_count_sizes_dtype_and_device(global_size, local_size, nlocal, src):
    aug = BatchedDataAugmentationDINO(local_crops_number=nlocal, global_size=global_size,
                                      local_size=local_size)
    x = (images(5, src) * 255).to(torch.uint8)
    crops = aug(x, gen())
    assert len(crops) == 2 + nlocal == aug.ncrops
    assert [tuple(c.shape) for c in crops] == \
        [(5, 3, global_size, global_size)] * 2 + [(5, 3, local_size, local_size)] * nlocal
    assert all(c.dtype == torch.float32 and c.device == x.device for c in crops)
    assert all(torch.isfinite(c).all() for c in crops)


def test_crops_are_reproducible_from_the_generator_and_differ_otherwise():
    aug = BatchedDataAugmentationDINO(local_crops_number=3, global_size=32, local_size=16)
    x = images()
    a, b, c = aug(x, gen(3)), aug(x, gen(3)), aug(x, gen(4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))
    assert not torch.equal(a[2], a[3]) and not torch.equal(a[0], a[1])  # independent draws
    # the global stream is neither used nor disturbed
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    aug(x, gen(3))
    assert torch.equal(torch.rand(3), before)


def test_uint8_input_is_scaled_to_unit_range():
    aug = BatchedDataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8)
    u8 = (images(4) * 255).round().to(torch.uint8)
    for a, b in zip(aug(u8, gen()), aug(u8.float() / 255, gen())):
        torch.testing.assert_close(a, b)


def test_output_is_normalised_with_the_given_statistics():
    mean, std = (0.5, 0.25, 0.5), (0.5, 0.5, 0.25)
    plain = BatchedDataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8,
                                        mean=(0, 0, 0), std=(1, 1, 1))
    centred = BatchedDataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8,
                                          mean=mean, std=std)
    x = images()
    for a, b in zip(plain(x, gen()), centred(x, gen())):
        assert a.min() >= 0 and a.max() <= 1
        expected = (a - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        torch.testing.assert_close(b, expected)


@pytest.mark.parametrize("bad,error,message", [
    (torch.zeros(2, 1, 8, 8), ValueError, r"\(B, 3, H, W\)"),
    (torch.zeros(3, 8, 8), ValueError, r"\(B, 3, H, W\)"),
    (torch.zeros(0, 3, 8, 8), ValueError, "non-empty"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError, "uint8"),
    (np.zeros((2, 3, 8, 8)), TypeError, "tensor"),
])
def test_bad_images_are_rejected(bad, error, message):
    aug = BatchedDataAugmentationDINO(local_crops_number=1, global_size=8, local_size=4)
    with pytest.raises(error, match=message):
        aug(bad, gen())


def test_generator_must_be_a_cpu_generator():
    aug = BatchedDataAugmentationDINO(local_crops_number=1, global_size=8, local_size=4)
    with pytest.raises(TypeError, match="generator"):
        aug(images(2, 8), 0)


def test_arguments_are_checked_as_the_pil_pipeline_checks_them():
    with pytest.raises(ValueError, match="local_crops_number"):
        BatchedDataAugmentationDINO(local_crops_number=-1)
    with pytest.raises(ValueError, match="scale"):
        BatchedDataAugmentationDINO(global_crops_scale=(0.5, 0.2))
    aug = BatchedDataAugmentationDINO(global_size=32, local_size=16)
    assert aug.blur_radius == DataAugmentationDINO(global_size=32, local_size=16).blur_radius


# ---------------------------------------------------------------- geometry

def test_crop_boxes_follow_torchvision_sampler():
    n, h, w, scale = 4000, 30, 40, (0.05, 0.4)
    boxes = sample_crop_boxes(n, h, w, scale, generator=gen())
    top, left, bh, bw = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h).all() and (left + bw <= w).all() and (bh > 0).all() and (bw > 0).all()
    area = (bh * bw).double() / (h * w)
    # rounding the sides moves the area by up to about one row and one column
    assert area.min() >= 0.05 - 0.06 and area.max() <= 0.4 + 0.06
    # the same distribution as torchvision's sampler (means over 4000 draws)
    torch.manual_seed(0)
    image = Image.new("RGB", (w, h))
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    ours = boxes.double()
    assert (ours[:, 2] * ours[:, 3]).mean().item() == pytest.approx(
        (ref[:, 2] * ref[:, 3]).mean().item(), rel=0.03)
    assert (ours[:, 3] / ours[:, 2]).mean().item() == pytest.approx(
        (ref[:, 3] / ref[:, 2]).mean().item(), rel=0.03)
    for column, side in ((0, h), (1, w)):  # crops centred on the image on average
        centre = ours[:, column] + ours[:, column + 2] / 2
        assert centre.mean().item() == pytest.approx(side / 2, rel=0.03)


def test_crop_box_fallback_is_torchvisions_centre_crop():
    # a 40 x 4 strip: no crop of aspect 3/4..4/3 covering 90 % of it exists
    boxes = sample_crop_boxes(5, 4, 40, (0.9, 1.0), generator=gen())
    torch.manual_seed(0)
    expected = T.RandomResizedCrop.get_params(Image.new("RGB", (40, 4)), [0.9, 1.0],
                                              [3 / 4, 4 / 3])
    assert boxes.tolist() == [list(expected)] * 5


def test_whole_image_crop_is_the_identity_and_flip_mirrors():
    x = images(3, 16)
    full = torch.tensor([[0, 0, 16, 16]] * 3)
    exact = dict(atol=1e-5, rtol=0)  # the grid is float32: about 1e-6 px off the pixel centres
    torch.testing.assert_close(B.resized_crops(x, full, 16), x, **exact)
    flip = torch.tensor([True, False, True])
    out = B.resized_crops(x, full, 16, flip=flip)
    torch.testing.assert_close(out[1], x[1], **exact)
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]].flip(-1), **exact)


def test_resized_crop_matches_torchvision_inside_the_box():
    x = images(16, 32)
    boxes = sample_crop_boxes(16, 32, 32, (0.1, 0.9), generator=gen(1))
    size = 24
    out = B.resized_crops(x, boxes, size)
    ref = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [size, size],
                                       interpolation=TF.InterpolationMode.BICUBIC,
                                       antialias=False).clamp(0, 1) for i in range(16)])
    # bicubic taps reach 2 source pixels out: where they leave the box, this samples the image
    # and torchvision the box's clamped border; compare the pixels whose taps stay inside
    inside = torch.zeros(16, 1, size, size, dtype=torch.bool)
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        def ok(start, length):
            src = start + (torch.arange(size) + 0.5) * length / size - 0.5  # pixel-centre coords
            return (src.floor() - 1 >= start) & (src.floor() + 2 <= start + length - 1)
        inside[i, 0] = ok(top, h)[:, None] & ok(left, w)[None, :]
    assert inside.sum() > 0.3 * inside.numel()
    inside = inside.expand_as(out)
    torch.testing.assert_close(out[inside], ref[inside], atol=1e-5, rtol=0)
    assert (out - ref).abs().mean() < 0.02


# ---------------------------------------------------------------- photometric operations

FACTORS = torch.tensor([0.6, 0.8, 1.0, 1.3, 1.4, 0.9, 1.1, 0.7])
HUES = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5, -0.5, 0.07])


@pytest.mark.parametrize("ours,theirs,factors", [
    (B.adjust_brightness, TF.adjust_brightness, FACTORS),
    (B.adjust_contrast, TF.adjust_contrast, FACTORS),
    (B.adjust_saturation, TF.adjust_saturation, FACTORS),
    (B.adjust_hue, TF.adjust_hue, HUES),
])
def test_colour_operations_match_torchvision_per_image(ours, theirs, factors):
    x = images(8, 12)
    x[0, :, :4] = 0.5  # grey pixels: the hue of r = g = b is undefined
    x[1, 0] = x[1, 1]  # ties between channels
    out = ours(x.clone(), factors)
    ref = torch.stack([theirs(x[i], float(factors[i])) for i in range(8)])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_grayscale_solarize_and_blur_match_torchvision():
    x = images(6, 20)
    torch.testing.assert_close(B.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(B.solarize(x), TF.solarize(x, 128 / 255))
    sigma = torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0, 0.05])
    radius = math.ceil(3 * 2.0)
    ref = torch.stack([TF.gaussian_blur(x[i], [2 * radius + 1] * 2, [float(sigma[i])] * 2)
                       for i in range(6)])
    torch.testing.assert_close(B.gaussian_blur(x, sigma), ref, atol=1e-6, rtol=0)


def test_colour_jitter_applies_each_images_own_order():
    x = images(6, 10)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1],
                          [0, 1, 2, 3], [3, 0, 1, 2]])
    apply = torch.tensor([True, True, True, True, False, True])
    factors = [torch.linspace(0.6, 1.4, 6), torch.linspace(1.4, 0.6, 6),
               torch.linspace(0.8, 1.2, 6), torch.linspace(-0.1, 0.1, 6)]
    out = B.color_jitter(x.clone(), apply, order, factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(6):
        ref = x[i]
        if apply[i]:
            for op in order[i].tolist():
                ref = ops[op](ref, float(factors[op][i]))
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("which,blur_p,solarize_p", [("global_transfo1", 1.0, 0.0),
                                                     ("global_transfo2", 0.1, 0.2),
                                                     ("local_transfo", 0.5, 0.0)])
def test_each_crop_follows_the_official_recipe(monkeypatch, which, blur_p, solarize_p):
    """Rates of each random operation over 2000 images, told apart by their effect on images
    made for it; 4-sigma bands (binomial sd <= 0.011), fixed seed."""
    aug = BatchedDataAugmentationDINO(global_size=16, local_size=8, mean=(0, 0, 0),
                                      std=(1, 1, 1))
    t = getattr(aug, which)
    n, tol = 2000, 0.045

    # snapshot the recipe's probabilities before switching operations off
    recipe = {k: getattr(t, k) for k in ("flip_p", "jitter_p", "grayscale_p", "blur_p",
                                         "solarize_p")}
    assert recipe == dict(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=blur_p,
                          solarize_p=solarize_p)
    off = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)

    def measure(x, changed, op):
        for k, v in {**off, op: recipe[op]}.items():
            setattr(t, k, v)
        return changed(t(x, gen())).double().mean().item()

    ramp = torch.linspace(0, 1, 32).expand(n, 3, 32, 32).contiguous()  # rises left to right
    flipped = measure(ramp, lambda y: y[:, 0, :, 0] > y[:, 0, :, -1], "flip_p")
    colour = torch.tensor([0.8, 0.3, 0.2]).view(1, 3, 1, 1).expand(n, 3, 32, 32).contiguous()
    jittered = measure(colour, lambda y: (y - colour[:, :, :y.shape[2], :y.shape[3]]).abs()
                       .amax(dim=(1, 2, 3)) > 1e-4, "jitter_p")
    grey = measure(colour, lambda y: (y[:, 0] - y[:, 1]).abs().amax(dim=(1, 2)) < 1e-6,
                   "grayscale_p")
    bright = torch.full((n, 3, 32, 32), 0.9)
    solarized = measure(bright, lambda y: y.mean(dim=(1, 2, 3)) < 0.5, "solarize_p")
    blurred = []
    real_blur = B.gaussian_blur
    monkeypatch.setattr(B, "gaussian_blur", lambda x, s: blurred.append(s) or real_blur(x, s))
    measure(images(n, 32), lambda y: y[:, 0, 0, 0] > -1, "blur_p")
    sigmas = torch.cat(blurred) if blurred else torch.zeros(0)
    assert flipped == pytest.approx(0.5, abs=tol)
    assert jittered == pytest.approx(0.8, abs=tol)
    assert grey == pytest.approx(0.2, abs=tol)
    assert solarized == pytest.approx(solarize_p, abs=tol if solarize_p else 0)
    assert len(sigmas) / n == pytest.approx(blur_p, abs=tol if blur_p < 1 else 0)
    assert ((sigmas >= aug.blur_radius[0]) & (sigmas <= aug.blur_radius[1])).all()


# ---------------------------------------------------------------- loader pieces

def test_uint8_transform_and_collate():
    rgb = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    t = to_uint8_tensor(rgb)
    assert t.dtype == torch.uint8 and t.shape == (3, 4, 5)
    assert torch.equal(t, torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    assert to_uint8_tensor(rgb.convert("L")).shape == (3, 4, 5)  # grey becomes RGB
    x, y = collate_images([(t, 3), (t, 1)])
    assert x.shape == (2, 3, 4, 5) and y.tolist() == [3, 1] and y.dtype == torch.int64
    with pytest.raises(ValueError, match="one size"):
        collate_images([(t, 0), (torch.zeros(3, 4, 4, dtype=torch.uint8), 1)])
    with pytest.raises(ValueError, match="empty"):
        collate_images([])
