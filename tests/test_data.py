"""Datasets: the procedural shapes (determinism, balance, disjoint splits, nuisances independent of
the class), build_dataset's choices, image folders (written here, and a CIFAR-10 image folder when
named by DINO_FAST_CIFAR10_FOLDER) and clear errors on bad data."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from dino_fast.augmentation import eval_transform
from dino_fast.batch_augmentation import to_uint8_tensor
from dino_fast.data import (
    SHAPES,
    InMemoryDataset,
    ProceduralShapes,
    build_dataset,
    cache_in_memory,
)

# a CIFAR-10 folder in ImageFolder layout (train/ with 2,000 images per class, the full test/)
CIFAR10_FOLDER = os.environ.get("DINO_FAST_CIFAR10_FOLDER", "")


def digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------ procedural

@pytest.mark.parametrize("size", [32, 64])
def test_procedural_images_are_rgb_of_the_requested_size(size):
    ds = ProceduralShapes("train", num_samples=20, image_size=size)
    image, label = ds[7]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (size, size)
    assert isinstance(label, int) and label == 7
    pixels = np.asarray(image)
    assert pixels.std() > 10  # not a blank image


def test_procedural_images_depend_only_on_seed_split_and_index():
    a = ProceduralShapes("train", num_samples=50, seed=1)
    b = ProceduralShapes("train", num_samples=50, seed=1, cache=True)
    order = [31, 2, 17, 2]
    assert [digest(a[i][0]) for i in order] == [digest(b[i][0]) for i in order]
    assert digest(b[2][0]) == digest(b[2][0])  # from the cache
    other_seed = ProceduralShapes("train", num_samples=50, seed=2)
    assert digest(a[5][0]) != digest(other_seed[5][0])
    assert digest(a[-1][0]) == digest(a[49][0])
    # a longer dataset has the same first images
    longer = ProceduralShapes("train", num_samples=500, seed=1)
    assert digest(longer[31][0]) == digest(a[31][0])


def test_procedural_train_and_test_splits_share_no_image():
    train = {digest(ProceduralShapes("train", num_samples=300)[i][0]) for i in range(300)}
    test = {digest(ProceduralShapes("test", num_samples=300)[i][0]) for i in range(300)}
    assert len(train) == 300 and len(test) == 300  # no repeats within a split either
    assert not train & test


@pytest.mark.parametrize("num_samples,num_classes", [(1000, 10), (1003, 10), (50, 12), (9, 2)])
def test_procedural_classes_are_balanced(num_samples, num_classes):
    ds = ProceduralShapes("test", num_samples=num_samples, num_classes=num_classes)
    counts = np.bincount(ds.targets, minlength=num_classes)
    assert len(counts) == num_classes
    assert counts.max() - counts.min() <= 1 and counts.sum() == num_samples
    assert ds.classes == list(SHAPES[:num_classes])
    assert [ds[i][1] for i in range(0, num_samples, 7)] == ds.targets[::7]


def test_procedural_nuisances_do_not_give_the_class_away():
    """The mean colour of an image (background and foreground colours) is independent of its
    class: per-class averages agree within a few standard errors, while images within a class
    vary a lot."""
    ds = ProceduralShapes("train", num_samples=600)
    means = np.stack([np.asarray(ds[i][0], dtype=np.float64).mean(axis=(0, 1)) / 255
                      for i in range(600)])
    labels = np.array(ds.targets)
    per_class = np.stack([means[labels == c].mean(0) for c in range(10)])
    within = np.mean([means[labels == c].std(0).mean() for c in range(10)])
    assert within > 0.1  # colour varies inside a class
    assert np.abs(per_class - means.mean(0)).max() < 0.1  # ... and not across classes


def test_procedural_shapes_stand_out_from_a_muted_background():
    """Each image: the shape copies far brighter or darker than the background (both polarities
    occur), colours close to grey (the tint is at most 0.1 a channel, plus noise)."""
    ds = ProceduralShapes("train", num_samples=40)
    polarities = set()
    for i in range(40):
        rgb = np.asarray(ds[i][0], dtype=np.float64) / 255
        lum = rgb @ np.array([0.299, 0.587, 0.114])
        lo, hi = np.percentile(lum, [10, 90])
        assert hi - lo > 0.3, i
        assert np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() < 0.12, i
        # the shapes cover less than half the image: the minority brightness is the shape's
        polarities.add(bool(np.mean(lum > (lo + hi) / 2) < 0.5))
    assert polarities == {True, False}


def test_procedural_applies_the_transform_and_rejects_bad_arguments():
    ds = ProceduralShapes("train", num_samples=4, transform=lambda im: np.asarray(im).shape)
    assert ds[0] == ((32, 32, 3), 0)
    with pytest.raises(IndexError):
        ds[4]
    for kwargs in (dict(split="val"), dict(num_classes=13), dict(num_classes=1),
                   dict(num_samples=0), dict(image_size=4), dict(seed=-1)):
        with pytest.raises(ValueError):
            ProceduralShapes(**kwargs)


# ------------------------------------------------------------------------------------ build_dataset

def test_build_dataset_procedural_by_default():
    ds = build_dataset(split="test", image_size=64, num_samples=30)
    assert isinstance(ds, ProceduralShapes) and ds.split == "test" and len(ds) == 30
    assert ds[0][0].size == (64, 64)
    assert len(build_dataset("procedural", "train")) == 10_000


def write_folder(root: Path, classes=("cat", "dog"), per_class=2, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_image_folder_with_split_subfolders(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "test", per_class=1)
    # a grayscale and an RGBA image load as RGB
    Image.new("L", (8, 8), 100).save(tmp_path / "train" / "dog" / "grey.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "train" / "cat" / "alpha.png")
    train = build_dataset(str(tmp_path), "train", transform=None)
    test = build_dataset(tmp_path, "test", transform=lambda im: im.size)
    assert train.classes == ["cat", "dog"] and len(train) == 8 and len(test) == 2
    modes = {train[i][0].mode for i in range(len(train))}
    assert modes == {"RGB"}
    assert sorted(label for _, label in test) == [0, 1]
    assert test[0][0] == (12, 10)


def test_image_folder_without_split_subfolders_is_used_as_is(tmp_path):
    write_folder(tmp_path, classes=("a", "b", "c"), per_class=1)
    ds = build_dataset(str(tmp_path), "train", transform=None)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 3


def test_bad_data_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(str(missing), "train", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build_dataset(str(empty), "train", None)
    no_images = tmp_path / "noimages"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="noimages"):
        build_dataset(str(no_images), "train", None)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        build_dataset(str(a_file), "train", None)
    only_train = tmp_path / "splits"
    write_folder(only_train / "train", per_class=1)
    with pytest.raises(FileNotFoundError, match="test/"):
        build_dataset(str(only_train), "test", None)


def test_unreadable_image_raises_naming_the_file(tmp_path):
    write_folder(tmp_path, classes=("a",), per_class=1)
    (tmp_path / "a" / "broken.png").write_bytes(b"this is not a png")
    ds = build_dataset(str(tmp_path), "train", None)
    index = [Path(p).name for p, _ in ds.samples].index("broken.png")
    with pytest.raises(OSError, match="broken.png"):
        ds[index]


def test_cifar10_without_files_explains_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*download=True"):
        build_dataset(f"cifar10:{tmp_path}", "train", None)
    with pytest.raises(ValueError, match="splits"):
        build_dataset(f"cifar10:{tmp_path}", "val", None)
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


@pytest.mark.skipif(not CIFAR10_FOLDER or not Path(CIFAR10_FOLDER).is_dir(),
                    reason="set DINO_FAST_CIFAR10_FOLDER to a CIFAR-10 image folder")
def test_a_cifar10_image_folder_reads_as_cifar10():
    train = build_dataset(CIFAR10_FOLDER, "train", None)
    test = build_dataset(CIFAR10_FOLDER, "test", None)
    assert len(train.classes) == 10 and train.classes == test.classes
    assert len(train) == 20_000 and len(test) == 10_000
    assert np.bincount(train.targets).tolist() == [2000] * 10
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (32, 32) and label == 0


# ------------------------------------------------------------------------------ in memory

@pytest.mark.parametrize("transform", [to_uint8_tensor, eval_transform(32)],
                         ids=["uint8", "evaluation"])
def test_cache_in_memory_holds_the_same_items(transform):
    ds = ProceduralShapes("test", num_samples=23, transform=transform)
    cached = cache_in_memory(ds)
    assert isinstance(cached, InMemoryDataset) and len(cached) == 23
    for i in (0, 1, 22):
        (a, la), (b, lb) = ds[i], cached[i]
        assert torch.equal(a, b) and a.dtype == b.dtype and la == lb and type(lb) is int


class _Items(Dataset):
    def __init__(self, items):
        self.items, self.reads = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.reads += 1
        return self.items[i]


def test_cache_in_memory_keeps_the_dataset_when_it_cannot_hold_it():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)  # 48 bytes
    big = _Items([(image, 0)] * 10)
    assert cache_in_memory(big, max_bytes=479) is big and big.reads == 1  # only the first read
    assert isinstance(cache_in_memory(big, max_bytes=480), InMemoryDataset)
    for odd in (torch.zeros(3, 4, 5, dtype=torch.uint8), image.float(), "a path"):
        items = _Items([(image, 0), (image, 1), (odd, 2), (image, 3)])
        assert cache_in_memory(items) is items and items.reads == 3  # stopped at the odd one
    pil = _Items([(Image.new("RGB", (4, 4)), 0)] * 3)
    assert cache_in_memory(pil) is pil and pil.reads == 1
    empty = _Items([])
    assert cache_in_memory(empty) is empty
