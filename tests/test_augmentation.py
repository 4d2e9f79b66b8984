"""Multi-crop augmentation: crop count and sizes, the official recipe's probabilities, seeding,
normalisation, the crop-major collate, and the whole pipeline image -> crops -> logits -> loss."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

import dino_fast.augmentation as aug_mod
from dino_fast import DINOLoss
from dino_fast.augmentation import DataAugmentationDINO, collate_crops
from dino_fast.data import ProceduralShapes
from dino_fast.head import DINOHead
from dino_fast.models import MultiCropWrapper, build_vit


def random_image(w=40, h=30, seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize("global_size,local_size,nlocal", [(224, 96, 8), (32, 16, 6), (32, 16, 0)])
def test_crop_count_sizes_and_dtype(global_size, local_size, nlocal):
    aug = DataAugmentationDINO(local_crops_number=nlocal, global_size=global_size,
                               local_size=local_size)
    crops = aug(random_image(250 if global_size > 100 else 40, 200 if global_size > 100 else 30))
    assert len(crops) == 2 + nlocal == aug.ncrops
    assert [tuple(c.shape) for c in crops] == \
        [(3, global_size, global_size)] * 2 + [(3, local_size, local_size)] * nlocal
    assert all(c.dtype == torch.float32 for c in crops)


def test_crops_are_reproducible_under_a_torch_seed_and_differ_otherwise():
    aug = DataAugmentationDINO(local_crops_number=4, global_size=32, local_size=16)
    image = random_image()
    torch.manual_seed(3)
    a = aug(image)
    torch.manual_seed(3)
    b = aug(image)
    torch.manual_seed(4)
    c = aug(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[2], a[3])  # the local crops are independent draws


def test_normalisation_uses_the_given_statistics():
    image = random_image()
    plain = DataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8,
                                 mean=(0, 0, 0), std=(1, 1, 1))
    centred = DataAugmentationDINO(local_crops_number=1, global_size=16, local_size=8,
                                   mean=(0.5, 0.25, 0.5), std=(0.5, 0.5, 0.25))
    torch.manual_seed(0)
    x = plain(image)
    torch.manual_seed(0)
    y = centred(image)
    for a, b in zip(x, y):
        assert a.min() >= 0 and a.max() <= 1
        mean = torch.tensor([0.5, 0.25, 0.5]).view(3, 1, 1)
        std = torch.tensor([0.5, 0.5, 0.25]).view(3, 1, 1)
        torch.testing.assert_close(b, (a - mean) / std)


def test_default_statistics_are_imagenet_and_grayscale_input_becomes_rgb():
    aug = DataAugmentationDINO(local_crops_number=2, global_size=16, local_size=8)
    grey = Image.new("L", (20, 20), color=90)  # converted to RGB
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.manual_seed(0)
    for crop in aug(grey):
        # every op keeps a flat grey image flat and grey (jitter changes its level only), so
        # un-normalised with ImageNet's statistics all three channels hold one value
        pixels = crop * std + mean
        assert pixels.shape[0] == 3
        torch.testing.assert_close(pixels, torch.full_like(pixels, pixels[0, 0, 0].item()),
                                   rtol=0, atol=1e-5)


class Recorder:
    """Counts calls of the functional ops the augmentation uses, and records their arguments."""

    def __init__(self, monkeypatch):
        self.calls = {}
        self.crop_args = []
        self.radii = []
        F = aug_mod.F
        for name in ("horizontal_flip", "adjust_hue", "rgb_to_grayscale", "solarize"):
            monkeypatch.setattr(F, name, self._counting(name, getattr(F, name)))
        original_crop = F.resized_crop

        def resized_crop(img, top, left, h, w, size, **kw):
            self.crop_args.append((img.size, h, w, size, kw.get("interpolation")))
            return original_crop(img, top, left, h, w, size, **kw)
        monkeypatch.setattr(F, "resized_crop", resized_crop)
        recorder = self

        class Blur(ImageFilter.GaussianBlur):
            def __init__(self, radius):
                recorder.radii.append(radius)
                super().__init__(radius=radius)
        monkeypatch.setattr(aug_mod.ImageFilter, "GaussianBlur", Blur)

    def _counting(self, name, fn):
        def wrapped(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapped

    def rate(self, name, n):
        return self.calls.get(name, 0) / n


@pytest.mark.parametrize("which,blur_p,solarize_p", [("global_transfo1", 1.0, 0.0),
                                                     ("global_transfo2", 0.1, 0.2),
                                                     ("local_transfo", 0.5, 0.0)])
def test_each_crop_follows_the_official_recipe(monkeypatch, which, blur_p, solarize_p):
    aug = DataAugmentationDINO(global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                               global_size=16, local_size=8)
    transform = getattr(aug, which)
    image = random_image(100, 100)
    rec = Recorder(monkeypatch)
    n = 600
    torch.manual_seed(0)
    for _ in range(n):
        transform(image)
    # binomial standard deviations at n = 600 are <= 0.021: 4-sigma bands, fixed seed
    tol = 0.085
    assert rec.rate("horizontal_flip", n) == pytest.approx(0.5, abs=tol)
    assert rec.rate("adjust_hue", n) == pytest.approx(0.8, abs=tol)  # colour jitter applied
    assert rec.rate("rgb_to_grayscale", n) == pytest.approx(0.2, abs=tol)
    assert len(rec.radii) / n == pytest.approx(blur_p, abs=tol if blur_p < 1 else 0)
    assert rec.rate("solarize", n) == pytest.approx(solarize_p, abs=tol if solarize_p else 0)
    assert all(aug.blur_radius[0] <= r <= aug.blur_radius[1] for r in rec.radii)
    lo, hi = (0.4, 1.0) if which != "local_transfo" else (0.05, 0.4)
    size = 16 if which != "local_transfo" else 8
    for (img_size, h, w, out_size, interpolation) in rec.crop_args:
        assert out_size == [size, size]
        assert interpolation == aug_mod.F.InterpolationMode.BICUBIC
        assert lo - 0.02 <= h * w / (img_size[0] * img_size[1]) <= hi + 0.02


def test_blur_radius_is_the_official_range_at_224_and_scales_with_the_global_crop():
    assert DataAugmentationDINO().blur_radius == pytest.approx((0.1, 2.0))
    assert DataAugmentationDINO(global_size=32, local_size=16).blur_radius == \
        pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    assert DataAugmentationDINO(blur_radius=(0.5, 1.0)).blur_radius == (0.5, 1.0)


@pytest.mark.parametrize("kwargs", [dict(global_crops_scale=(0.5, 0.2)),
                                    dict(local_crops_scale=(0.0, 0.4)),
                                    dict(local_crops_number=-1), dict(global_size=0),
                                    dict(mean=(0.5, 0.5)), dict(std=(0.2, 0.0, 0.2)),
                                    dict(blur_radius=(2.0, 1.0))])
def test_bad_augmentation_arguments_raise(kwargs):
    with pytest.raises((ValueError, TypeError)):
        DataAugmentationDINO(**kwargs)


@pytest.mark.parametrize("name,value", [
    ("mean", "abc"), ("std", "rgb"), ("mean", 0.5), ("mean", (0.5, "a", 0.5)),
    ("std", (0.2, float("nan"), 0.2)), ("mean", (True, 0.5, 0.5))])
def test_mean_and_std_must_be_three_real_numbers(name, value):
    with pytest.raises(TypeError, match=f"{name} must be 3 finite real numbers"):
        DataAugmentationDINO(**{name: value})
    DataAugmentationDINO(mean=np.array([0.5, 0.5, 0.5]), std=[0.2, 0.2, 0.2])  # any sequence


def test_augmentation_rejects_non_images():
    with pytest.raises(TypeError, match="PIL image"):
        DataAugmentationDINO(global_size=16, local_size=8)(np.zeros((8, 8, 3)))


# ------------------------------------------------------------------------------------ collate

def test_collate_stacks_crop_major_with_labels():
    batch = [([torch.full((3, 4, 4), float(b)), torch.full((3, 4, 4), 10.0 + b),
               torch.full((3, 2, 2), 20.0 + b)], b % 2) for b in range(3)]
    crops, labels = collate_crops(batch)
    assert [tuple(c.shape) for c in crops] == [(3, 3, 4, 4), (3, 3, 4, 4), (3, 3, 2, 2)]
    for v, base in enumerate((0.0, 10.0, 20.0)):
        assert crops[v][:, 0, 0, 0].tolist() == [base, base + 1, base + 2]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 0]


def test_collate_rejects_inconsistent_samples():
    with pytest.raises(ValueError, match="empty"):
        collate_crops([])
    with pytest.raises(ValueError, match="sample 1 has 1 crops"):
        collate_crops([([torch.zeros(3, 2, 2)] * 2, 0), ([torch.zeros(3, 2, 2)], 1)])
    with pytest.raises(ValueError, match="crop 0 has different shapes"):
        collate_crops([([torch.zeros(3, 2, 2)], 0), ([torch.zeros(3, 4, 4)], 1)])


# ------------------------------------------------------------------------------------ pipeline

def test_pipeline_from_images_to_loss_rows_in_crop_major_layout():
    nlocal, B, out_dim = 4, 3, 48
    aug = DataAugmentationDINO(local_crops_number=nlocal, global_size=32, local_size=16)
    dataset = ProceduralShapes("train", num_samples=6, image_size=32, transform=aug)
    torch.manual_seed(0)
    crops, labels = next(iter(DataLoader(dataset, batch_size=B, collate_fn=collate_crops)))
    assert len(crops) == 2 + nlocal
    assert [tuple(c.shape) for c in crops] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * nlocal
    assert labels.tolist() == [0, 1, 2]

    torch.manual_seed(0)
    vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=32, num_heads=2)
    student = MultiCropWrapper(vit, DINOHead(32, out_dim, hidden_dim=32, bottleneck_dim=16))
    student.eval()  # no stochastic layers: rows can be recomputed one crop at a time
    logits = student(crops)
    assert logits.shape == ((2 + nlocal) * B, out_dim) and logits.dtype == torch.float32
    # row v*B + b is crop v of sample b
    for v in (0, 3):
        for b in range(B):
            torch.testing.assert_close(logits[v * B + b], student(crops[v][b:b + 1])[0],
                                       rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        teacher_logits = student(crops[:2])
    loss_fn = DINOLoss(out_dim, 2 + nlocal, 0.04, 0.04, 0, 5)
    loss = loss_fn(logits, teacher_logits, 0)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert vit.cls_token.grad is not None and torch.isfinite(vit.cls_token.grad).all()
