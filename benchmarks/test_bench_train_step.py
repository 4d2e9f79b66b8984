"""One whole DINO training step, the official way vs the dino_fast way.

A step: teacher forward on the 2 global crops, student forward on every crop, loss (with the
center update), backward, per-parameter gradient clipping, optimizer step, teacher EMA.

- official: the official script's pieces, literally: the double-loop loss with its center
  update, `clip_gradients` with one host sync per parameter, the per-parameter EMA loop, the
  backbone not compiled.
- dino_fast: `DINOLoss` (fused Triton on CUDA, eager on CPU), `clip_gradients` without host syncs,
  `TeacherEMA` (one Triton launch on CUDA, foreach on CPU), the backbone compiled on CUDA (on CPU
  the training script does not compile by default, so neither does this benchmark).

CPU: a 2-block ViT-Tiny/4 at 32/16 px, 2 + 6 crops, B = 16, K = 4096. CUDA: ViT-S/16 at 224/96,
2 + 10 crops, B = 64, K = 65536, bf16 autocast. Before timing, both ways take one step from the
same state on the same images and must agree on the loss and the updated teacher.
"""
import copy
import math

import pytest
import torch

from benchmarks import load_test_reference
from benchmarks.roofline import peak_memory, record, synchronized
from dino_fast import DINOLoss, TeacherEMA
from dino_fast.head import DINOHead
from dino_fast.models import MultiCropWrapper, build_vit, compile_backbone
from dino_fast.optim import clip_gradients, get_params_groups

CONFIGS = {
    "cpu": dict(arch="vit_tiny", patch_size=4, sizes=(32, 16), local_crops=6, batch=16,
                out_dim=4096, overrides=dict(depth=2), compile=False, amp=None, rounds=3),
    "cuda": dict(arch="vit_small", patch_size=16, sizes=(224, 96), local_crops=10, batch=64,
                 out_dim=65536, overrides={}, compile=True, amp=torch.bfloat16, rounds=10),
}
reference = load_test_reference()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
LR, MOMENTUM, CLIP, TOTAL_STEPS = 1e-4, 0.996, 3.0, 10_000


class OfficialDINOLoss(torch.nn.Module):
    """The official script's loss module (single process), literally."""

    def __init__(self, out_dim, ncrops, teacher_temp=0.04, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum, self.ncrops = center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        total_loss = reference.official_dino_loss(student_output, teacher_output, self.center,
                                                  self.ncrops, self.student_temp,
                                                  self.teacher_temp)
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class _Trainer:
    """Student, teacher, loss, optimizer and EMA of one way, from a shared initial state."""

    def __init__(self, way, student0, cfg, device):
        self.way, self.cfg = way, cfg
        self.student = copy.deepcopy(student0)
        self.teacher = copy.deepcopy(student0)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        ncrops = 2 + cfg["local_crops"]
        if way == "official":
            self.loss = OfficialDINOLoss(cfg["out_dim"], ncrops).to(device)
        else:
            self.loss = DINOLoss(cfg["out_dim"], ncrops, 0.04, 0.04, 0, 100).to(device)
            self.ema = TeacherEMA(self.student, self.teacher, MOMENTUM, 1.0,
                                  total_steps=TOTAL_STEPS)
            if cfg["compile"]:
                compile_backbone(self.student)
                compile_backbone(self.teacher)
        self.optimizer = torch.optim.AdamW(get_params_groups(self.student), lr=LR)
        self.it = 0

    def step(self, images):
        amp = self.cfg["amp"]
        device_type = images[0].device.type
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            with torch.no_grad():
                teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            if self.way == "official":
                loss = self.loss(student_output, teacher_output)
            else:
                loss = self.loss(student_output, teacher_output, 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.way == "official":
            reference.official_clip_gradients(self.student, CLIP)
            self.optimizer.step()
            m = 1 - (1 - MOMENTUM) * (math.cos(math.pi * self.it / TOTAL_STEPS) + 1) / 2
            reference.official_ema_loop(self.teacher.parameters(),
                                        self.student.parameters(), m)
        else:
            clip_gradients(self.student, CLIP)
            self.optimizer.step()
            self.ema.update(self.it)
        self.it += 1
        return loss.detach()


@pytest.fixture(scope="module")
def setups():
    cache = {}

    def get(device):
        if device not in cache:
            cfg = CONFIGS[device]
            torch.manual_seed(0)
            backbone = build_vit(cfg["arch"], cfg["patch_size"], cfg["sizes"][0],
                                 **cfg["overrides"])
            student0 = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, cfg["out_dim"]))
            student0 = student0.to(device)
            g, loc = cfg["sizes"]
            images = ([torch.randn(cfg["batch"], 3, g, g, device=device) for _ in range(2)]
                      + [torch.randn(cfg["batch"], 3, loc, loc, device=device)
                         for _ in range(cfg["local_crops"])])
            trainers = {way: _Trainer(way, student0, cfg, device)
                        for way in ("official", "dino_fast")}
            # both ways agree on one step from the same state (before anything is timed)
            losses = {way: t.step(images) for way, t in trainers.items()}
            tol = 2e-2 if cfg["amp"] is not None else 1e-4
            torch.testing.assert_close(losses["dino_fast"].float(), losses["official"].float(),
                                       rtol=tol, atol=tol)
            for (name, a), b in zip(trainers["official"].teacher.named_parameters(),
                                    trainers["dino_fast"].teacher.parameters()):
                # AdamW moves a parameter by at most ~lr per step; the EMA passes (1 - m) of it
                torch.testing.assert_close(b, a, rtol=0, atol=2 * LR * (1 - MOMENTUM) + 1e-6,
                                           msg=lambda m, name=name: f"teacher {name}: {m}")
            cache[device] = (cfg, images, trainers)
        return cache[device]
    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("way", ["official", "dino_fast"])
def test_training_step(benchmark, setups, device, way):
    cfg, images, trainers = setups(device)
    trainer = trainers[way]
    fn = synchronized(lambda: trainer.step(images), device)
    fn()  # warm-up (compilation on CUDA)
    peak = peak_memory(fn, device)
    benchmark.group = (f"training step {cfg['arch']}/{cfg['patch_size']} 2+{cfg['local_crops']} "
                       f"crops B={cfg['batch']} K={cfg['out_dim']} ({device})")
    benchmark.pedantic(fn, rounds=cfg["rounds"], iterations=1, warmup_rounds=1)
    extra = {}
    if benchmark.stats is not None:  # None under --benchmark-disable
        extra["images_per_s"] = round(cfg["batch"] / benchmark.stats.stats.median, 1)
    record(benchmark, path=way if way == "dino_fast" else "official script's step",
           device=torch.device(device), peak_bytes=peak, **extra)
