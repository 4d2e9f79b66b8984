"""The batched multi-crop augmentation: every operation against torchvision's kernel on the same
parameters, the crop sampler against torchvision's, the recipe's probabilities per crop, seeding,
shapes and devices, bad input, and the loader pieces (uint8 transform, collate)."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

import dino_fast.batch_augmentation as B
from dino_fast import cpu_kernels
from dino_fast.augmentation import DataAugmentationDINO
from dino_fast.batch_augmentation import (
    BatchedDataAugmentationDINO,
    collate_images,
    sample_crop_boxes,
    to_uint8_tensor,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


needs_cpu_kernel = pytest.mark.skipif(cpu_kernels.status() != "compiled",
                                      reason="the CPU kernels cannot be built here")


@pytest.fixture(params=["ops", pytest.param("kernel", marks=needs_cpu_kernel)])
def path(request, monkeypatch):
    """The batched augmentation on the PyTorch ops, or on the CPU kernel (cpu_kernels)."""
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "0" if request.param == "ops" else "1")
    return request.param


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
    # the aspect ratio is log-uniform: a uniform draw would shift this mean by about 0.03
    assert torch.log(ours[:, 3] / ours[:, 2]).mean().item() == pytest.approx(
        torch.log(ref[:, 3] / ref[:, 2]).mean().item(), abs=0.01)
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
    exact = dict(atol=1e-6, rtol=0)  # weights 1 and 0 at scale 1
    torch.testing.assert_close(B.resized_crops(x, full, 16), x, **exact)
    flip = torch.tensor([True, False, True])
    out = B.resized_crops(x, full, 16, flip=flip)
    torch.testing.assert_close(out[1], x[1], **exact)
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]].flip(-1), **exact)


def pil_crops(u8, boxes, size, flip):
    """The PIL pipeline's crop of each image: torchvision's resized_crop on the PIL image
    (bicubic, antialiased), then the flip; as float in [0, 1]."""
    out = []
    for i in range(len(boxes)):
        image = TF.to_pil_image(u8[i % len(u8)])
        crop = TF.resized_crop(image, *boxes[i].tolist(), [size, size],
                               interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if flip[i]:
            crop = TF.horizontal_flip(crop)
        out.append(TF.pil_to_tensor(crop).float() / 255)
    return torch.stack(out)


@pytest.mark.parametrize("scale,size", [((0.05, 0.4), 16), ((0.4, 1.0), 32), ((0.6, 1.0), 12)])
def test_resized_crops_are_pils_resize_of_the_crop(scale, size):
    """Enlarging (local and global crops at CIFAR size) and shrinking (antialiased) crops, with
    flips, two crops per image: PIL's float resize exactly, PIL's 8-bit pipeline to its
    rounding."""
    u8 = (images(8, 32) * 255).round().to(torch.uint8)
    boxes = sample_crop_boxes(16, 32, 32, scale, generator=gen(1))
    flip = torch.rand(16, generator=gen(2)) < 0.5
    out = B.resized_crops(u8.float() / 255, boxes, size, flip=flip)
    assert out.shape == (16, 3, size, size)
    # PIL's float mode ("F", one channel at a time) computes the same weights without rounding
    for i in range(16):
        top, left, h, w = boxes[i].tolist()
        for c in range(3):
            plane = Image.fromarray(u8[i % 8, c].numpy().astype(np.float32) / 255, mode="F")
            ref = np.asarray(plane.crop((left, top, left + w, top + h))
                             .resize((size, size), Image.BICUBIC)).clip(0, 1)
            ref = torch.from_numpy(ref.copy())
            torch.testing.assert_close(out[i, c], ref.flip(-1) if flip[i] else ref,
                                       atol=1e-6, rtol=0)
    # the 8-bit PIL pipeline rounds (and clips) between its passes as well
    diff = (out - pil_crops(u8, boxes, size, flip)).abs()
    assert diff.mean() < 0.6 / 255
    assert torch.quantile(diff.flatten(), 0.99) < 2.5 / 255
    assert diff.max() < 0.1


def test_resample_weight_rows_sum_to_one_inside_the_crop():
    start, length = torch.tensor([0, 3, 10]), torch.tensor([32, 7, 22])
    for out_size in (5, 16, 40):
        w = B.resample_weights(start, length, 32, out_size)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, out_size, dtype=torch.float64))
        for n in range(3):  # no tap outside the crop
            outside = torch.ones(32, dtype=torch.bool)
            outside[start[n]:start[n] + length[n]] = False
            assert (w[n][:, outside] == 0).all()


def test_crop_weights_table_is_resample_weights(monkeypatch):
    g = torch.Generator().manual_seed(3)
    for in_size, out_size in ((32, 16), (32, 32), (7, 12), (1, 3)):
        boxes = B.sample_crop_boxes(200, in_size, in_size, (0.01, 1.0), generator=g)
        _, left, _, w = boxes.unbind(1)
        looked_up = B.crop_resample_weights(left, w, in_size, out_size)
        assert looked_up.dtype == torch.float32
        assert torch.equal(looked_up, B.resample_weights(left, w, in_size, out_size).float())
    # above the table's size limit the weights are computed
    monkeypatch.setattr(B, "RESAMPLE_TABLE_MAX_ENTRIES", 0)
    monkeypatch.setattr(B, "_resample_table", None)  # would fail if called
    start, length = torch.tensor([0, 5]), torch.tensor([32, 11])
    assert torch.equal(B.crop_resample_weights(start, length, 32, 16),
                       B.resample_weights(start, length, 32, 16).float())


@pytest.mark.parametrize("box", [(-1, 0, 8, 8), (0, 0, 0, 8), (30, 0, 8, 8), (0, 25, 8, 8)])
def test_resized_crops_reject_boxes_outside_the_image(box):
    with pytest.raises(ValueError, match=r"boxes must lie within the 32x32 images .* got \["
                                         + ", ".join(map(str, box)) + r"\]"):
        B.resized_crops(torch.rand(2, 3, 32, 32), torch.tensor([box, (0, 0, 32, 32)]), 16)


# ---------------------------------------------------------------- photometric operations

HUES = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5, -0.5, 0.07])


def test_hue_matches_torchvision_per_image():
    x = images(8, 12)
    x[0, :, :4] = 0.5  # grey pixels: the hue of r = g = b is undefined
    x[1, 0] = x[1, 1]  # ties between channels
    out = B.adjust_hue(x.clone(), HUES)
    ref = torch.stack([TF.adjust_hue(x[i], float(HUES[i])) for i in range(8)])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def _hue_with_reductions(x, factor):
    """adjust_hue written with torchvision's own steps: channel max / min as reductions, the hue
    wrapped with fmod."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values
    cr = maxc - minc
    cr_divisor = torch.where(cr == 0, torch.ones_like(cr), cr)
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, b - r, r - g))
    h = num / cr_divisor + torch.where(maxc == r, 0.0, torch.where(maxc == g, 2.0, 4.0))
    h = torch.remainder(torch.fmod(h / 6.0 + 1.0, 1.0) + factor.view(-1, 1, 1), 1.0) * 6.0
    centre, sign, offset = (torch.tensor(v).view(1, 3, 1, 1) for v in
                            ((3.0, 2.0, 4.0), (1.0, -1.0, -1.0), (-1.0, 2.0, 2.0)))
    shape = ((h.unsqueeze(1) - centre).abs() * sign + offset).clamp(0.0, 1.0)
    return shape * cr.unsqueeze(1) + minc.unsqueeze(1)


def test_hue_is_bit_for_bit_the_reduction_and_fmod_form():
    x = images(64, 16)
    x[:4] = x[:4, :1]  # grey images
    x[4:12] = (x[4:12] * 4).round() / 4  # many ties between channels
    # pure red and blue (h / 6 + 1 = 1 and 5/3) in an image whose hue turns forward
    x[40, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[40, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    factor = torch.linspace(-0.5, 0.5, 64)
    assert torch.equal(B.adjust_hue(x.clone(), factor), _hue_with_reductions(x, factor))


def test_grayscale_and_solarize_match_torchvision():
    x = images(6, 20)
    torch.testing.assert_close(B.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(B.solarize(x), TF.solarize(x, 128 / 255))


@pytest.mark.parametrize("lo,hi", [(0.0143, 0.286), (0.1, 2.0), (2.0, 6.0)])
def test_blur_is_pils_gaussian_blur(lo, hi):
    """PIL's GaussianBlur (three box blurs per axis) over the blur ranges at 32 px (the official
    range scaled by 32 / 224), at 224 px, and wider; PIL rounds to uint8 after each of its six
    passes."""
    u8 = (images(12, 24, seed=3) * 255).round().to(torch.uint8)
    sigma = lo + (hi - lo) * torch.rand(12, generator=gen(4))
    out = B.gaussian_blur(u8.float() / 255, sigma)
    ref = torch.stack([TF.pil_to_tensor(TF.to_pil_image(u8[i]).filter(
        ImageFilter.GaussianBlur(float(sigma[i])))).float() / 255 for i in range(12)])
    diff = (out - ref).abs()
    assert diff.max() < 3.5 / 255 and diff.mean() < 1 / 255


@pytest.mark.parametrize("sigma,centre", [(0.2, 237), (0.286, 217), (1.0, 42)])
def test_blur_of_a_point_is_pils(sigma, centre):
    """The centre of a blurred white point on black: PIL's figures (small radii blur too)."""
    point = torch.zeros(1, 3, 9, 9)
    point[..., 4, 4] = 1
    out = B.gaussian_blur(point, torch.tensor([sigma]))[0, 0, 4, 4] * 255
    assert out.item() == pytest.approx(centre, abs=2.5)
    assert B.gaussian_blur(point, torch.tensor([sigma])).sum().item() == pytest.approx(3.0)


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


def test_each_image_draws_its_own_jitter_order(monkeypatch):
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "0")  # the ops path, where color_jitter is seen
    seen = []
    real = B.color_jitter
    monkeypatch.setattr(B, "color_jitter",
                        lambda x, apply, order, factors: seen.append(order) or
                        real(x, apply, order, factors))
    BatchedDataAugmentationDINO(local_crops_number=0, global_size=8, local_size=4)(
        images(200, 8), gen())
    order = seen[0]
    assert order.shape == (200, 4)
    assert (order.sort(dim=1).values == torch.arange(4)).all()  # permutations
    assert len({tuple(row) for row in order.tolist()}) == 24  # all 24 orders occur


@pytest.mark.gpu
def test_cuda_batch_gives_the_cpu_crops_without_a_host_sync():
    aug = BatchedDataAugmentationDINO(local_crops_number=3, global_size=32, local_size=16)
    u8 = (images(16, 32) * 255).round().to(torch.uint8)
    cpu = aug(u8, gen(5))
    gpu_images = u8.cuda()
    aug(gpu_images, gen(5))  # first call: caches the normalisation constants on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = aug(gpu_images, gen(5))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
    # the public operations take CPU parameters for CUDA images
    x = images(4, 8).cuda()
    assert B.adjust_hue(x, torch.full((4,), 0.05)).device.type == "cuda"
    order = torch.arange(4).repeat(4, 1)
    factors = [torch.full((4,), 1.2), torch.full((4,), 0.8), torch.full((4,), 1.1),
               torch.full((4,), 0.05)]
    jittered = B.color_jitter(x.clone(), torch.ones(4, dtype=torch.bool), order, factors)
    torch.testing.assert_close(jittered.cpu(), B.color_jitter(x.cpu(), torch.ones(
        4, dtype=torch.bool), order, factors), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which,blur_p,solarize_p", [("global_transfo1", 1.0, 0.0),
                                                     ("global_transfo2", 0.1, 0.2),
                                                     ("local_transfo", 0.5, 0.0)])
def test_each_crop_follows_the_official_recipe(monkeypatch, path, which, blur_p, solarize_p):
    """Rates of each random operation over 2000 images, told apart by their effect on images
    made for it; 4-sigma bands (binomial sd <= 0.011), fixed seed; on both paths."""
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
    real_kernels = B.box_kernels  # both paths take the blurred images' kernels from it
    monkeypatch.setattr(B, "box_kernels", lambda s: blurred.append(s) or real_kernels(s))
    measure(images(n, 32), lambda y: y[:, 0, 0, 0] > -1, "blur_p")
    sigmas = torch.cat(blurred) if blurred else torch.zeros(0)
    assert flipped == pytest.approx(0.5, abs=tol)
    assert jittered == pytest.approx(0.8, abs=tol)
    assert grey == pytest.approx(0.2, abs=tol)
    assert solarized == pytest.approx(solarize_p, abs=tol if solarize_p else 0)
    assert len(sigmas) / n == pytest.approx(blur_p, abs=tol if blur_p < 1 else 0)
    assert ((sigmas >= aug.blur_radius[0]) & (sigmas <= aug.blur_radius[1])).all()


# ---------------------------------------------------------------- the CPU kernel

def _photometric(x, ops=None, factors=None, gray=None, blur=None, taps=None, reach=0,
                 sol=None, mean=None, std=None, crop_from=None):
    """cpu_kernels.photometric on a copy of x, every operation off unless given."""
    n = x.shape[0]
    off = torch.zeros(n, dtype=torch.bool)
    return cpu_kernels.photometric(
        cpu_kernels.photometric_kernel(), x.clone(),
        torch.full((n, 4), -1) if ops is None else ops,
        torch.zeros(n, 4) if factors is None else factors, off if gray is None else gray,
        torch.full((n,), -1) if blur is None else blur,
        torch.zeros(1, 1) if taps is None else taps, reach, off if sol is None else sol,
        128 / 255, mean, std, crop_from=crop_from)


def _awkward_images(n=24, size=12, seed=5):
    """Random images with grey pixels (chroma 0), ties of the largest channel (r = g, g = b,
    r = b), pure black and white ones and pixels at the solarization threshold."""
    x = images(n, size, seed)
    x[0] = x[0, :1]
    x[1, 1] = x[1, 0]
    x[2, 2] = x[2, 1]
    x[3, 2] = x[3, 0]
    x[4], x[5] = 0.0, 1.0
    x[8, :, :2] = torch.tensor(128, dtype=torch.uint8).float() / 255  # the solarization threshold
    return x


@needs_cpu_kernel
@pytest.mark.parametrize("op", [0, 2, 3])
def test_kernel_jitter_is_bit_for_bit_the_ops(op):
    """Brightness, saturation and hue, each at every position and in random orders with the
    others: the kernel's fp32 formulas are the ops path's, rounding for rounding."""
    x = _awkward_images()
    n = x.shape[0]
    factors = [torch.linspace(0.6, 1.4, n), torch.linspace(1.4, 0.6, n),
               torch.linspace(0.8, 1.2, n), torch.linspace(-0.5, 0.5, n)]
    single = torch.full((n, 4), -1)
    single[torch.arange(n), torch.arange(n) % 4] = op  # op alone, at position n % 4
    mixed = torch.rand(n, 4, generator=gen(1)).argsort(1)
    mixed[mixed == 1] = -1  # (contrast's mean is summed in another order: the next test)
    for ops in (single, mixed):  # (color_jitter takes -1 as "nothing at this position")
        ref = B.color_jitter(x.clone(), torch.ones(n, dtype=torch.bool), ops, factors)
        out = _photometric(x, ops=ops, factors=torch.stack(factors, 1))
        assert torch.equal(out, ref)


@needs_cpu_kernel
def test_kernel_contrast_grayscale_solarize_and_normalisation_are_the_ops():
    x = _awkward_images()
    n = x.shape[0]
    ops = torch.full((n, 4), -1)
    ops[:, 1] = 1
    f = torch.linspace(0.6, 1.4, n)
    gray = torch.arange(n) % 3 == 0
    sol = torch.arange(n) % 2 == 0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    factors = torch.stack([torch.ones(n), f, torch.ones(n), torch.zeros(n)], 1)
    out = _photometric(x, ops=ops, factors=factors, gray=gray, sol=sol, mean=mean, std=std)
    ref = B.color_jitter(x.clone(), torch.ones(n, dtype=torch.bool),
                         torch.tensor([1, 0, 2, 3]).expand(n, 4),
                         [torch.ones(n), f, torch.ones(n), torch.zeros(n)])
    # brightness 1 and saturation 1 are exactly the identity on the ops path
    ref = torch.where(gray.view(-1, 1, 1, 1), B.grayscale(ref).expand_as(ref), ref)
    ref = torch.where(sol.view(-1, 1, 1, 1), B.solarize(ref), ref)
    ref = (ref - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=5e-6, rtol=0)  # the mean's rounding, / std
    plain = _photometric(x, gray=gray, sol=sol, mean=mean, std=std)  # no jitter: bit for bit
    ref = torch.where(gray.view(-1, 1, 1, 1), B.grayscale(x).expand_as(x), x)
    ref = (torch.where(sol.view(-1, 1, 1, 1), B.solarize(ref), ref) - mean.view(1, 3, 1, 1)) \
        / std.view(1, 3, 1, 1)
    assert torch.equal(plain, ref)


@needs_cpu_kernel
@pytest.mark.parametrize("size,lo,hi", [(16, 0.01, 0.3), (12, 0.5, 2.5), (7, 2.0, 6.0)])
def test_kernel_blur_is_gaussian_blur(size, lo, hi):
    """Three box passes per axis, edges replicated, up to reaches wider than the image."""
    x = images(10, size, seed=2)
    sigma = lo + (hi - lo) * torch.rand(10, generator=gen(3))
    which = torch.tensor([0, 2, 3, 5, 9])
    taps, reach = B.box_kernels(sigma[which])
    blur = torch.full((10,), -1)
    blur[which] = torch.arange(len(which))
    out = _photometric(x, blur=blur, taps=taps, reach=reach)
    ref = x.clone()
    ref[which] = B.gaussian_blur(x[which], sigma[which])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(out[blur < 0], x[blur < 0])


@needs_cpu_kernel
@pytest.mark.parametrize("height,width,size", [(32, 32, 32), (32, 32, 16), (20, 36, 12),
                                               (9, 9, 24)])
def test_kernel_crops_are_resized_crops(height, width, size):
    """Crops of several images (crop n of image n % B), mirrored or not, shrunk and enlarged,
    whole images and one-pixel boxes at the borders."""
    src = torch.rand(3, 3, height, width, generator=gen(7))
    boxes = sample_crop_boxes(12, height, width, (0.05, 1.0), generator=gen(8))
    boxes[0] = torch.tensor([0, 0, height, width])
    boxes[1] = torch.tensor([height - 1, width - 1, 1, 1])
    flip = torch.arange(12) % 3 == 1
    ref = B.resized_crops(src, boxes, size, flip=flip)
    out = _photometric(torch.empty(12, 3, size, size),
                       crop_from=(src, *B.crop_weights(boxes, 3, height, width, size, flip)))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("global_size,local_size,nlocal,src", [(32, 16, 6, 32), (24, 8, 3, 40)])
def test_kernel_and_ops_make_the_same_crops(monkeypatch, global_size, local_size, nlocal, src):
    """The whole recipe with the same generator state: the kernel's crops are the ops path's to
    float rounding (the random draws do not depend on the path)."""
    aug = BatchedDataAugmentationDINO(local_crops_number=nlocal, global_size=global_size,
                                      local_size=local_size)
    x = (images(16, src, seed=9) * 255).to(torch.uint8)
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "1")
    g = gen(4)
    fast = aug(x, g)
    after = torch.rand(3, generator=g)
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "0")
    g = gen(4)
    ref = aug(x, g)
    assert torch.equal(torch.rand(3, generator=g), after)  # the same draws
    for a, r in zip(fast, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype and a.is_contiguous()
        torch.testing.assert_close(a, r, atol=4e-5, rtol=0)  # normalised units (/ std ~ 0.23)


@needs_cpu_kernel
@pytest.mark.parametrize("threads", ["openmp", "python threads"])
def test_kernel_on_several_threads_makes_the_ops_crops(monkeypatch, threads):
    """Three threads of a few images each, on the OpenMP runtime and on Python threads."""
    if threads == "python threads":
        monkeypatch.setitem(cpu_kernels._state, "photometric_batch", None)
    elif cpu_kernels._state.get("photometric_batch") is None:
        pytest.skip("the kernel runs on Python threads here (no single OpenMP runtime)")
    monkeypatch.setattr(cpu_kernels, "MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    aug = BatchedDataAugmentationDINO(local_crops_number=2, global_size=16, local_size=8)
    x = (images(5, 24, seed=3) * 255).to(torch.uint8)
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "1")
    fast = aug(x, gen(7))
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "0")
    ref = aug(x, gen(7))
    for a, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, r, atol=4e-5, rtol=0)


def test_without_a_compiler_the_ops_make_the_crops(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DINO_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    aug = BatchedDataAugmentationDINO(local_crops_number=1, global_size=8, local_size=4)
    with pytest.warns(RuntimeWarning, match="could not be built.*batched augmentation"):
        crops = aug(images(4, 8), gen())
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert all(torch.equal(a, b) for a, b in zip(crops, aug(images(4, 8), gen()), strict=True))
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    with pytest.raises(RuntimeError, match="DINO_FAST_CPU_KERNEL=1 but the CPU kernels are "):
        aug(images(4, 8), gen())


def test_ops_path_runs_where_the_kernel_is_off(monkeypatch):
    monkeypatch.setenv("DINO_FAST_CPU_KERNEL", "0")
    monkeypatch.setattr(cpu_kernels, "photometric", lambda *a, **k: pytest.fail("kernel ran"))
    crops = BatchedDataAugmentationDINO(local_crops_number=1, global_size=8, local_size=4)(
        images(4, 8), gen())
    assert [tuple(c.shape) for c in crops] == [(4, 3, 8, 8)] * 2 + [(4, 3, 4, 4)]


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
