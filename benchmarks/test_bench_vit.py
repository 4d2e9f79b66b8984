"""ViT forward + backward at both crop resolutions: eager vs torch.compile.

The compile time is measured once per resolution (the first call, which traces and compiles)
and reported in `extra_info["compile_s"]`, never inside the timed loop. CPU: a small ViT at
32/16 px (the built-in dataset's crops); CUDA: ViT-S/16 at 224/96 px in bf16 autocast, B = 64.
"""
import copy
import time

import pytest
import torch

from benchmarks.roofline import peak_memory, record, synchronized
from dino_fast.models import build_vit, compile_backbone

CONFIGS = {
    "cpu": dict(arch="vit_tiny", patch_size=4, img_size=32, local_size=16, batch=32,
                overrides=dict(depth=4)),
    "cuda": dict(arch="vit_small", patch_size=16, img_size=224, local_size=96, batch=64,
                 overrides={}),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class _Models:
    """An eager ViT and a compiled copy with the same weights, with each resolution's compile
    time measured on the first call."""

    def __init__(self, device: str):
        cfg = CONFIGS[device]
        torch.manual_seed(0)
        self.device, self.cfg = device, cfg
        self.eager = build_vit(cfg["arch"], cfg["patch_size"], cfg["img_size"],
                               **cfg["overrides"]).to(device)
        self.compiled = compile_backbone(copy.deepcopy(self.eager))
        self.compile_s = {}
        self.images = {}
        for res_name, size in (("global", cfg["img_size"]), ("local", cfg["local_size"])):
            self.images[res_name] = torch.randn(cfg["batch"], 3, size, size, device=device)
            start = time.perf_counter()
            synchronized(lambda name=res_name: self.step(self.compiled, name), device)()
            self.compile_s[res_name] = round(time.perf_counter() - start, 2)

    def step(self, model, res_name):
        """One forward + backward; returns the output features (detached)."""
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.device == "cuda")
        with autocast:
            out = model(self.images[res_name])
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return out.detach()


@pytest.fixture(scope="module")
def models(request):
    cache = {}

    def get(device):
        if device not in cache:
            cache[device] = _Models(device)
        return cache[device]
    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resolution", ["global", "local"])
@pytest.mark.parametrize("path", ["eager (not compiled)", "torch.compile"])
def test_vit_forward_backward(benchmark, models, device, resolution, path):
    m = models(device)
    cfg = m.cfg
    model = m.compiled if path == "torch.compile" else m.eager
    # the compared paths agree before anything is timed
    ref, out = m.step(m.eager, resolution), m.step(m.compiled, resolution)
    tol = 5e-2 if device == "cuda" else 1e-4  # bf16 autocast on CUDA, fp32 on CPU
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)

    size = cfg["img_size"] if resolution == "global" else cfg["local_size"]
    benchmark.group = (f"ViT fwd+bwd {cfg['arch']}/{cfg['patch_size']} {resolution} crop "
                       f"{size}px B={cfg['batch']} ({device})")
    fn = synchronized(lambda: m.step(model, resolution), device)
    peak = peak_memory(fn, device)
    benchmark.pedantic(fn, rounds=5 if device == "cpu" else 20, iterations=1, warmup_rounds=1)
    extra = {}
    if benchmark.stats is not None:  # None under --benchmark-disable
        extra["images_per_s"] = round(cfg["batch"] / benchmark.stats.stats.median, 1)
    if path == "torch.compile":
        extra["compile_s"] = m.compile_s[resolution]
    record(benchmark, path=path, device=torch.device(device), peak_bytes=peak, **extra)


# ----------------------------------------------------------------------- bf16 attention on CPU

class _Bf16Vit:
    """The CIFAR-10 command's ViT (width 96, 4 blocks, patch 8, conv stem) under bf16 autocast on
    the CPU, and a batch per resolution: 64 global crops (17 tokens), 320 local crops (5)."""

    def __init__(self):
        torch.manual_seed(0)
        self.vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=4, embed_dim=96,
                             num_heads=3, patch_embed="conv")
        self.images = {"global": torch.randn(64, 3, 32, 32), "local": torch.randn(320, 3, 16, 16)}

    def step(self, res_name):
        with torch.autocast("cpu", torch.bfloat16):
            out = self.vit(self.images[res_name])
        out.float().square().mean().backward()
        self.vit.zero_grad(set_to_none=True)
        return out.detach().float()


@pytest.fixture(scope="module")
def bf16_vit():
    return _Bf16Vit()


@pytest.mark.parametrize("resolution", ["global", "local"])
@pytest.mark.parametrize("path", ["explicit softmax (dino_fast)", "fused sdpa"])
def test_vit_bf16_attention_on_cpu(benchmark, bf16_vit, monkeypatch, resolution, path):
    """dino_fast's `Attention` computes bf16 CPU attention on short sequences explicitly; the
    baseline forces F.scaled_dot_product_attention (what timm's Attention calls)."""
    import dino_fast.models as models
    ref = bf16_vit.step(resolution)
    with monkeypatch.context() as m:
        m.setattr(models, "explicit_attention_faster", lambda q: False)
        fused = bf16_vit.step(resolution)
    torch.testing.assert_close(ref, fused, rtol=5e-2, atol=5e-2)  # bf16 rounding apart
    if path == "fused sdpa":
        monkeypatch.setattr(models, "explicit_attention_faster", lambda q: False)
    n = bf16_vit.images[resolution].shape[0]
    benchmark.group = f"ViT fwd+bwd width 96/8 conv stem, bf16, {resolution} crops B={n} (cpu)"
    fn = lambda: bf16_vit.step(resolution)  # noqa: E731
    benchmark.pedantic(fn, rounds=8, iterations=1, warmup_rounds=2)
    extra = {}
    if benchmark.stats is not None:
        extra["images_per_s"] = round(n / benchmark.stats.stats.median, 1)
    record(benchmark, path=path, device=torch.device("cpu"), peak_bytes=None, **extra)
