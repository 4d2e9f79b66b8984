"""The multi-crop augmentation of one batch: the official per-image PIL pipeline
(`DataAugmentationDINO` on each image, then `collate_crops`, as a DataLoader worker runs it) vs
`BatchedDataAugmentationDINO` on the uint8 batch (on the CPU: its compiled pass per crop, and
its PyTorch ops, a few tensor calls per operation over the batch).

CPU: B = 32 procedural images of 32 px, 2 + 4 crops of 32 / 16 px (the CIFAR-10 command's
shapes). CUDA: B = 64 images of 256 px, 2 + 10 crops of 224 / 96 px, the batched path on the GPU
(the PIL path always runs on the CPU, one core). Before timing, both paths must give the same
crop shapes and dtypes, and pixel means and standard deviations within 0.15 (normalised units,
pooled over the global and over the local crops): their random draws
differ, so the pixels cannot be compared one to one (tests/test_batch_augmentation.py compares
each operation exactly).
"""
import functools
import os

import pytest
import torch

from benchmarks.roofline import peak_memory, record, synchronized
from dino_fast import cpu_kernels
from dino_fast.augmentation import DataAugmentationDINO, collate_crops
from dino_fast.batch_augmentation import BatchedDataAugmentationDINO, to_uint8_tensor
from dino_fast.data import ProceduralShapes

CONFIGS = {
    "cpu": dict(batch=32, source=32, sizes=(32, 16), local_crops=4, rounds=10),
    "cuda": dict(batch=64, source=256, sizes=(224, 96), local_crops=10, rounds=3),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class _Setup:
    def __init__(self, device):
        cfg = CONFIGS[device]
        data = ProceduralShapes("train", num_samples=cfg["batch"], image_size=cfg["source"])
        self.pil_images = [data[i][0] for i in range(cfg["batch"])]
        self.uint8 = torch.stack([to_uint8_tensor(im) for im in self.pil_images]).to(device)
        kw = dict(local_crops_number=cfg["local_crops"], global_size=cfg["sizes"][0],
                  local_size=cfg["sizes"][1])
        self.pil = DataAugmentationDINO(**kw)
        self.batched = BatchedDataAugmentationDINO(**kw)
        self.generator = torch.Generator().manual_seed(0)
        self.cfg, self.device = cfg, device

    def run_pil(self):
        crops, _ = collate_crops([(self.pil(im), 0) for im in self.pil_images])
        return crops

    def run_batched(self):
        return self.batched(self.uint8, self.generator)

    def run_batched_ops(self):  # the batched augmentation without the CPU kernel
        before = os.environ.get(cpu_kernels.ENV)
        os.environ[cpu_kernels.ENV] = "0"
        try:
            return self.batched(self.uint8, self.generator)
        finally:
            if before is None:
                del os.environ[cpu_kernels.ENV]
            else:
                os.environ[cpu_kernels.ENV] = before


@functools.cache
def setup(device) -> _Setup:
    """One setup per device, shared by the paths compared on it."""
    return _Setup(device)


OPS = "dino_fast batched, PyTorch ops"  # the CPU's batched path without its kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["official (PIL, per image)", "dino_fast batched", OPS])
def test_multicrop_augmentation(benchmark, device, path):
    if path == OPS and device != "cpu":
        pytest.skip("the batched path runs on PyTorch ops on a GPU anyway")
    s = setup(device)
    cfg = s.cfg
    torch.manual_seed(0)
    run_batched = s.run_batched_ops if path == OPS else s.run_batched
    ref, out = s.run_pil(), run_batched()
    assert [(c.shape, c.dtype) for c in ref] == [(c.shape, c.dtype) for c in out]
    for crops in (slice(0, 2), slice(2, None)):  # pooled over the global, the local crops
        a = torch.cat(ref[crops]).float()
        b = torch.cat(out[crops]).float().cpu()
        assert abs(a.mean().item() - b.mean().item()) < 0.15
        assert abs(a.std().item() - b.std().item()) < 0.15

    batched = path.startswith("dino_fast")
    fn = synchronized(run_batched, device) if batched else s.run_pil
    benchmark.group = (f"multi-crop augmentation B={cfg['batch']} {cfg['source']}px -> "
                       f"2x{cfg['sizes'][0]} + {cfg['local_crops']}x{cfg['sizes'][1]} ({device})")
    peak = peak_memory(fn, device if batched else "cpu")
    benchmark.pedantic(fn, rounds=cfg["rounds"], iterations=1, warmup_rounds=1)
    extra = {}
    if benchmark.stats is not None:
        extra["images_per_s"] = round(cfg["batch"] / benchmark.stats.stats.median, 1)
    record(benchmark, path=path, device=torch.device(device if batched else "cpu"),
           peak_bytes=peak, **extra)
