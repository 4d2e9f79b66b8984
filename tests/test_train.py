"""The training script end to end, on a tiny ViT and the procedural images (CPU, seconds each)."""
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from dino_fast import knn, train, train_args
from dino_fast.checkpoint import load_checkpoint
from dino_fast.monitor import NonFiniteGuard, NonFiniteLoss, collapse_warning
from dino_fast.progress import ProgressBar
from dino_fast.training_loss import TrainingLoss

# 32 images / batch 8 = 4 steps per epoch; a 1-block, 32-wide ViT on 16 px crops
TINY = ["--arch", "vit_tiny", "--depth", "1", "--embed_dim", "32", "--num_heads", "2",
        "--patch_size", "4", "--image_size", "16", "--local_crop_size", "8", "--out_dim", "64",
        "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--local_crops_number", "2",
        "--batch_size_per_gpu", "8", "--train_samples", "32", "--knn_train_samples", "40",
        "--knn_test_samples", "20", "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0",
        "--log_freq", "2", "--attention_images", "2", "--device", "cpu", "--saveckp_freq", "1",
        "--freeze_last_layer", "1", "--momentum_teacher", "0.996", "--recipe", "dino",
        "--augmentation", "pil"]
STEPS_PER_EPOCH = 4


def run(output_dir, *extra):
    return train.run(TINY + ["--output_dir", str(output_dir), *extra])


def read_log(output_dir):
    with open(Path(output_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def state_tensors(ckpt):
    """Every tensor of a checkpoint that training changes, by a flat name."""
    out = {}
    for part in ("student", "teacher", "dino_loss", "ibot_loss"):
        out.update({f"{part}.{k}": v for k, v in (ckpt.get(part) or {}).items()})
    for pid, state in ckpt["optimizer"]["state"].items():
        out.update({f"optimizer.{pid}.{k}": v for k, v in state.items()})
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    result = run(out, "--knn_freq", "1")
    return out, result


def test_tiny_run_writes_checkpoints_log_knn_and_pictures(tiny_run):
    out, result = tiny_run
    for name in ("checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth", "log.jsonl"):
        assert (out / name).is_file(), name
    for name in ("training_curves.png", "attention_maps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    log = read_log(out)
    steps = [r for r in log if r["type"] == "step"]
    assert [r["it"] for r in steps] == [0, 2, 3, 4, 6, 7]  # every --log_freq steps + epoch ends
    for r in steps:
        assert {"loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy",
                "images_per_s"} <= set(r) and math.isfinite(r["loss"])
    assert steps[0]["lr"] == 0.0 and steps[0]["momentum"] == 0.996  # warm-up starts at 0
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [0, 1]
    assert [r["epochs_trained"] for r in log if r["type"] == "knn"] == [0, 1, 2]
    assert {"knn_before", "knn_after"} <= set(result)

    ckpt = load_checkpoint(out / "checkpoint.pth")  # weights_only: plain tensors and scalars
    assert ckpt["epoch"] == 2 and ckpt["args"]["out_dim"] == 64
    assert torch.isfinite(ckpt["dino_loss"]["center"]).all()
    assert ckpt["dino_loss"]["center"].abs().sum() > 0  # the center was updated
    moved = [k for k, v in ckpt["teacher"].items() if not torch.equal(v, ckpt["student"][k])]
    assert moved  # teacher (EMA) and student (gradient) differ after training
    # --freeze_last_layer 1: the output layer stays at its initial value (that the teacher
    # shares) through the first epoch, and trains in the second
    last = "head.last_layer.weight_v"
    first = load_checkpoint(out / "checkpoint0001.pth")
    assert torch.equal(first["student"][last], first["teacher"][last])
    assert not torch.equal(ckpt["student"][last], first["student"][last])


def test_knn_on_a_checkpoint_reproduces_the_final_figure_of_training(tiny_run):
    out, result = tiny_run
    alone = knn.run(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu"])
    assert alone["knn_top1"] == result["knn_after"]["knn_top1"]
    assert alone["knn_top5"] == result["knn_after"]["knn_top5"]


def test_a_conv_stem_run_trains_and_its_checkpoint_rebuilds_for_knn(tmp_path, capsys):
    result = run(tmp_path, "--patch_embed", "conv", "--epochs", "1", "--knn_before", "false",
                 "--attention_images", "1")
    assert "patch 4 (conv stem) at 16 px" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert "backbone.patch_embed.proj.0.weight" in ckpt["teacher"]
    alone = knn.run(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--device", "cpu"])
    assert alone["knn_top1"] == result["knn_after"]["knn_top1"]


@pytest.mark.parametrize("augmentation", ["pil", "batched"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, augmentation):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--num_workers", "1", "--knn_before", "false", "--attention_images", "0",
              "--augmentation", augmentation]
    uninterrupted = run(full, *common)
    # an interrupted run: what the first run held after its first epoch
    resumed.mkdir()
    shutil.copy(full / "checkpoint0001.pth", resumed / "checkpoint.pth")
    result = run(resumed, *common, "--resume")
    assert result["start_epoch"] == 1
    a = state_tensors(load_checkpoint(full / "checkpoint.pth"))
    b = state_tensors(load_checkpoint(resumed / "checkpoint.pth"))
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # and resuming changed something: the first epoch's state differs from the final one
    first = state_tensors(load_checkpoint(full / "checkpoint0001.pth"))
    assert not torch.equal(first["teacher.backbone.cls_token"], a["teacher.backbone.cls_token"])
    if augmentation == "batched":
        # without loader workers the images are decoded once and kept in memory (the training
        # set: the batched augmentation's uint8 images; the k-NN sets): the same run, bit for bit
        in_memory = tmp_path / "in_memory"
        kept = run(in_memory, *common, "--num_workers", "0")
        c = state_tensors(load_checkpoint(in_memory / "checkpoint.pth"))
        assert [k for k in a if not torch.equal(a[k], c[k])] == []
        assert kept["knn_after"] == uninterrupted["knn_after"]


def test_resume_with_the_other_augmentation_warns(tiny_run, tmp_path):
    out, _ = tiny_run
    shutil.copy(out / "checkpoint.pth", tmp_path / "checkpoint.pth")
    with pytest.warns(RuntimeWarning, match="trained with --augmentation pil and this run uses "
                                            "batched"):
        result = run(tmp_path, "--resume", "--augmentation", "batched", "--epochs", "3",
                     "--attention_images", "0")
    assert (result["start_epoch"], result["epochs_trained"]) == (2, 3)


def test_resume_with_other_model_settings_is_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    shutil.copy(out / "checkpoint.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="--out_dim 64 .checkpoint. vs 32"):
        run(tmp_path, "--resume", "--out_dim", "32")
    with pytest.raises(SystemExit, match="--mlp_ratio 4.0 .checkpoint. vs 2.0"):
        run(tmp_path, "--resume", "--mlp_ratio", "2")


class _DivergingLoss(TrainingLoss):
    """The real loss, made NaN from the second epoch on (what a too-high lr ends in)."""

    def forward(self, student, teacher, epoch, masks=None):
        loss, terms = super().forward(student, teacher, epoch, masks)
        return (loss * float("nan") if epoch >= 1 else loss), terms


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "TrainingLoss", _DivergingLoss)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--knn_before", "false", "--attention_images", "0")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert f"non-finite (NaN or inf) at step {STEPS_PER_EPOCH}" in err  # first step of epoch 2
    for hint in ("--lr", "fp32", "--clip_grad"):
        assert hint in err
    good = load_checkpoint(tmp_path / "checkpoint.pth")
    assert good["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state_tensors(good).values())
    assert (tmp_path / "checkpoint.pth").read_bytes() == \
        (tmp_path / "checkpoint0001.pth").read_bytes()
    assert not (tmp_path / "checkpoint0002.pth").exists()
    assert [r["epoch"] for r in read_log(tmp_path) if r["type"] == "epoch"] == [0]


@pytest.mark.parametrize("flags,message", [
    (["--data_path", "/nonexistent/images"], "does not exist"),
    (["--image_size", "18"], "multiple of --patch_size"),
    (["--warmup_epochs", "3"], "cannot exceed --epochs"),
    (["--num_heads", "3"], "--embed_dim=32 must be a multiple of --num_heads=3"),
    (["--global_crops_scale", "0.8", "0.3"], "0 < min <= max <= 1"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--mlp_ratio", "0"], "--mlp_ratio must be a positive number with --embed_dim x --mlp_ratio"),
    (["--resume"], "no checkpoint at"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--epochs", "auto"], "--epochs auto sizes the run to --max_train_minutes"),
    (["--epochs", "three"], "--epochs: expected a whole number or 'auto', got 'three'"),
    (["--patch_embed", "conv", "--patch_size", "6", "--image_size", "18", "--local_crop_size",
      "6"], "--patch_embed=conv needs --patch_size a power of two"),
])
def test_bad_flags_are_rejected_before_any_work(tmp_path, capsys, flags, message):
    assert_rejected_before_any_work(tmp_path / "out", flags, message, capsys)


def assert_rejected_before_any_work(out, flags, message, capsys):
    """The run exits with status 2, `message` in stderr, and nothing was started in `out`."""
    with pytest.raises(SystemExit) as exc:
        run(out, *flags)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def losses(output_dir):
    return [r["loss"] for r in read_log(output_dir) if r["type"] == "step"]


def test_fp16_with_its_gradient_scaler_trains_and_resumes_bit_for_bit(tmp_path, tiny_run):
    """The fp16 path (autocast, GradScaler, the scaler in the checkpoint) runs the same on the
    CPU as on CUDA."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--precision", "fp16", "--knn_before", "false", "--attention_images", "0"]
    result = run(full, *common)
    assert math.isfinite(result["knn_after"]["knn_top1"])
    ckpt = load_checkpoint(full / "checkpoint.pth")
    assert ckpt["scaler"] is not None
    assert all(torch.isfinite(v).all() for v in state_tensors(ckpt).values())
    assert all(v.dtype == torch.float32 for v in ckpt["student"].values()
               if v.is_floating_point())  # autocast: fp32 master weights
    # the same crops as the fp32 run: the first loss (before any update) agrees to fp16
    # precision, not exactly; then the scaler starts at 2^16, finds inf gradients, skips those
    # steps and backs off, as on CUDA, so the runs part
    fp16, fp32 = losses(full), losses(tiny_run[0])
    assert fp16[0] == pytest.approx(fp32[0], rel=1e-2) and fp16[0] != fp32[0]
    assert ckpt["scaler"]["scale"] < 2.0 ** 16

    resumed.mkdir()
    shutil.copy(full / "checkpoint0001.pth", resumed / "checkpoint.pth")
    assert run(resumed, *common, "--resume")["start_epoch"] == 1
    b = load_checkpoint(resumed / "checkpoint.pth")
    assert b["scaler"] == ckpt["scaler"]
    a, b = state_tensors(ckpt), state_tensors(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []

    # an fp32 checkpoint has no scaler state: resuming it in fp16 says so
    other = tmp_path / "other"
    run(other, "--epochs", "1", "--warmup_epochs", "0", "--knn_before", "false",
        "--attention_images", "0")
    with pytest.raises(SystemExit, match="--precision fp16, whose gradient scaler .* "
                                         "trained with --precision auto"):
        run(other, *common, "--resume")


def test_bf16_autocast_training_follows_the_fp32_run(tmp_path, tiny_run):
    out = tmp_path / "bf16"
    result = run(out, "--precision", "bf16", "--attention_images", "0")
    assert load_checkpoint(out / "checkpoint.pth")["scaler"] is None  # bf16 needs no scaler
    assert math.isfinite(result["knn_after"]["knn_top1"])
    # same seed, same crops: every logged loss of the two epochs stays within a few bf16
    # roundings (8 mantissa bits; 2.1 % apart at most after 8 steps) of fp32's, and the first
    # differs from it (autocast was on)
    bf16, fp32 = losses(out), losses(tiny_run[0])
    assert bf16 == pytest.approx(fp32, rel=5e-2) and bf16[0] != fp32[0]


def test_compiled_vits_train_with_one_graph_per_resolution(tmp_path, tiny_run, monkeypatch):
    """--compile (the CUDA default) on the CPU, with dynamo's aot_eager backend (forward and
    backward graphs through AOTAutograd) so the test does not wait for inductor's code
    generation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from dino_fast import models
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(train, "compile_backbone",
                        lambda m: models.compile_backbone(m, backend=counter))
    torch._dynamo.reset()
    out = tmp_path / "compiled"
    run(out, "--compile", "--attention_images", "2", "--knn_before", "false")
    # student: global and local crops; teacher: global crops; k-NN and the attention maps
    # bypass the compiled call, so two epochs add no recompilation
    assert counter.frame_count == 3
    ckpt = load_checkpoint(out / "checkpoint.pth")
    eager = load_checkpoint(tiny_run[0] / "checkpoint.pth")
    assert list(ckpt["student"]) == list(eager["student"])  # no `_orig_mod.` in the names
    assert losses(out) == pytest.approx(losses(tiny_run[0]), rel=1e-4)
    torch._dynamo.reset()


def test_an_earlier_run_is_not_overwritten_without_resume(tiny_run, capsys):
    out, _ = tiny_run
    with pytest.raises(SystemExit):
        run(out)
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_triton_backend_on_cpu_needs_the_interpreter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_args, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(train_args, "triton_available", lambda: True)
    with pytest.raises(SystemExit):
        run(tmp_path / "out", "--backend", "triton")
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_two_processes_on_gloo_train_and_only_rank_0_speaks(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dino_fast.train", *TINY, "--output_dir", str(out), "--attention_images", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("k-NN (before training)") == 1  # rank 1 is quiet
    assert "2 process(es)" in proc.stdout
    assert "2 steps per epoch" in proc.stdout  # 32 images, 8 per process and step, 2 processes
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state_tensors(ckpt).values())
    steps = [r["it"] for r in read_log(out) if r["type"] == "step"]
    assert steps == sorted(set(steps))  # one writer: no duplicated records
    # both ranks hold the same teacher: the features they embed and gather give the figure a
    # single process gets from the checkpoint
    final = re.search(r"k-NN \(after 2 epochs\): top-1 ([\d.]+)%", proc.stdout).group(1)
    alone = knn.run(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu"])
    assert float(final) == pytest.approx(alone["knn_top1"], abs=0.01)


def test_two_processes_agree_on_the_epochs_auto_chooses(tmp_path):
    out = tmp_path / "ddp_auto"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dino_fast.train", *TINY, "--output_dir", str(out), "--attention_images", "0",
           "--epochs", "auto", "--max_train_minutes", "0.02", "--knn_freq", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a rank that chose otherwise would hang
    chosen = re.findall(r"epochs: (\d+) fit in --max_train_minutes 0.02", proc.stdout)
    assert len(chosen) == 1  # said by rank 0 only
    assert load_checkpoint(out / "checkpoint.pth")["args"]["epochs"] == int(chosen[0])


def _budget_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    if rank == 1:  # this rank's clock runs 10,000x fast: after one epoch its budget is spent
        real = train.time.perf_counter
        train.time.perf_counter = lambda: 1e4 * real()
    results = train.run([*TINY, "--output_dir", out, "--attention_images", "0",
                         "--epochs", "3", "--max_train_minutes", "1"])
    torch.save(results["epochs_trained"], f"{out}.{rank}")


def test_ranks_stop_together_when_one_ranks_clock_runs_out(tmp_path):
    """The time budget is judged on each rank's clock; a rank that stopped alone would leave the
    others waiting in the next epoch's collectives."""
    import torch.multiprocessing as mp
    from helpers import free_port
    out = str(tmp_path / "run")
    ctx = mp.start_processes(_budget_worker, args=(2, free_port(), out), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # (join returns as each process ends)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 240 s (a rank stopped alone?)")
    assert [torch.load(f"{out}.{rank}") for rank in range(2)] == [1, 1]


def test_num_workers_defaults_to_the_training_process_on_a_cpu(tmp_path, monkeypatch):
    assert train.default_num_workers(torch.device("cpu")) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    # the CPUs this process may use (affinity), where the platform says
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.default_num_workers(torch.device("cuda", 0)) == 10  # the official default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.default_num_workers(torch.device("cuda", 3)) == 8  # 64 CPUs / 8 processes
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert train.default_num_workers(torch.device("cuda", 3)) == 1
    # a run without the flag records the number it used, so a checkpoint says how it ran
    i = TINY.index("--num_workers")
    flags = TINY[:i] + TINY[i + 2:] + ["--epochs", "2", "--warmup_epochs", "0", "--knn_before",
                                       "false", "--attention_images", "0"]
    train.run(flags + ["--output_dir", str(tmp_path / "a"), "--max_train_minutes", "1e-6"])
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pth")["args"]["num_workers"] == 0
    # a resume without the flag keeps the checkpoint's (a run of an older default, say)
    (tmp_path / "b").mkdir()
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    ckpt["args"]["num_workers"] = 1
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pth")
    train.run(flags + ["--output_dir", str(tmp_path / "b"), "--resume"])
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pth")["args"]["num_workers"] == 1


def test_progress_bar_draws_in_place_and_stays_silent_when_disabled():
    buf = io.StringIO()
    bar = ProgressBar(10, desc="epoch 1/2", enabled=True, file=buf, min_interval=0)
    bar.update(5, loss=3.25, lr=1.5e-4, **{"img/s": 120})
    bar.update(10, loss=3.0)
    bar.close()
    text = buf.getvalue()
    draws = text.split("\r")[1:]  # every redraw starts at the line's beginning
    assert len(draws) >= 2 and text.endswith("\n") and text.count("\n") == 1
    assert any("epoch 1/2" in d and "5/10" in d and "loss 3.25 lr 1.500e-04 img/s 120" in d
               for d in draws)
    assert "10/10" in draws[-1] and "loss 3" in draws[-1]
    quiet = io.StringIO()  # not a terminal: nothing drawn
    bar = ProgressBar(10, file=quiet)
    bar.update(5, loss=1.0)
    bar.close()
    assert quiet.getvalue() == ""


def test_collapse_warnings():
    k = 64
    assert collapse_warning(0.99 * math.log(k), 0.99 * math.log(k), math.log(k), k) \
        .startswith("possible collapse to a uniform output")
    assert collapse_warning(0.01, 0.01, 0.02, k).startswith("possible collapse to one dimension")
    assert collapse_warning(3.0, 1.0, 3.5, k) is None  # sharp per image, many prototypes used
    # a loss near ln(K) with a teacher far from uniform is a student still catching up (the
    # CIFAR-10 runs' epochs 2-5); the stalled run's figures do warn
    assert collapse_warning(0.91 * math.log(k), 0.84 * math.log(k), 0.92 * math.log(k), k) is None
    for teacher in (0.91, 0.88):  # the stalled run, and a margin below it
        assert collapse_warning(0.955 * math.log(k), teacher * math.log(k), 0.95 * math.log(k),
                                k).startswith("possible collapse to a uniform output")
    # the first epoch starts at ln(K): only the one-dimension test applies
    assert collapse_warning(math.log(k), 4.0, 4.1, k, check_uniform=False) is None
    # the README's Sinkhorn-Knopp CIFAR-10 command after epoch 2 (K = 1024): near ln(K) with a
    # teacher at 0.88 ln(K), but the loss fell by 3% of ln(K) since epoch 1: no warning; the
    # same figures with a loss that fell by less than 0.5% of ln(K), or rose, do warn
    ln_k = math.log(1024)
    cifar = dict(epoch_loss=6.7262, teacher_entropy=6.107, marginal_entropy=6.931, out_dim=1024)
    assert collapse_warning(**cifar) is not None  # the figures alone look like collapse
    assert collapse_warning(**cifar, previous_loss=6.9345) is None
    assert collapse_warning(**cifar, previous_loss=6.7262 + 0.0051 * ln_k) is None
    for before in (6.7262 + 0.0049 * ln_k, 6.7262, 6.70):
        message = collapse_warning(**cifar, previous_loss=before)
        assert message.startswith("possible collapse to a uniform output: the loss 6.726 "
                                  f"({before:.3f} the epoch before) is stuck")
    # a falling loss does not hide a collapse to one dimension
    assert collapse_warning(6.0, 0.01, 0.02, 1024, previous_loss=6.9).startswith(
        "possible collapse to one dimension")


def test_non_finite_guard_names_the_first_bad_step():
    guard = NonFiniteGuard(torch.device("cpu"))
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 1.0]):
        guard.record(torch.tensor(value), step)
    with pytest.raises(NonFiniteLoss, match="at step 2 "):
        guard.check()
    fine = NonFiniteGuard(torch.device("cpu"))
    fine.record(torch.tensor(1.0), 0)
    fine.check()


def test_time_budget_stops_between_epochs_and_the_run_can_be_resumed(tmp_path, capsys,
                                                                   monkeypatch):
    judged = []  # the collapse test's arguments, epoch by epoch

    def recording_collapse_warning(*args, **kwargs):
        judged.append((args[0], kwargs["previous_loss"]))
        return collapse_warning(*args, **kwargs)

    monkeypatch.setattr(train, "collapse_warning", recording_collapse_warning)
    result = run(tmp_path, "--max_train_minutes", "1e-6", "--knn_before", "false",
                 "--attention_images", "0", "--knn_freq", "1")
    assert result["epochs_trained"] == 1  # the first epoch always runs
    out = capsys.readouterr().out
    assert "stopping before epoch 2" in out
    # stdout is not a terminal: no progress bar, one summary line for the epoch
    assert "\r" not in out and out.count("epoch 1/2") == 1 and "epoch 1/2: loss " in out
    # epoch 1's evaluation is the final figure: not computed a second time
    assert out.count("k-NN (after") == 1
    knn = [r for r in read_log(tmp_path) if r["type"] == "knn"]
    assert [r["epochs_trained"] for r in knn] == [1]
    assert result["knn_after"]["knn_top1"] == knn[0]["knn_top1"]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 1
    resumed = run(tmp_path, "--resume", "--knn_before", "false", "--attention_images", "0")
    assert (resumed["start_epoch"], resumed["epochs_trained"]) == (1, 2)
    # the collapse test compares each epoch's DINO loss with the epoch before's, across the
    # resume too (read back from the log)
    epochs = [r for r in read_log(tmp_path) if r["type"] == "epoch"]
    assert judged == [(epochs[0]["dino_loss"], None),
                      (epochs[1]["dino_loss"], epochs[0]["dino_loss"])]


@pytest.mark.parametrize("flags", [[], ["--recipe", "dinov2", "--augmentation", "batched"]],
                         ids=["dino_pil", "dinov2_batched"])
def test_epochs_auto_is_the_run_with_the_number_it_chose(tmp_path, monkeypatch, capsys, flags):
    """--epochs auto times real training steps (which it undoes) and gives their speed and the
    k-NN time to epochs_for_budget; the run then equals an explicit --epochs run bit for bit."""
    seen = {}

    def fit(budget_s, epoch_s, knn_s, knn_freq):  # the tiny run is too fast to size itself
        seen.update(budget_s=budget_s, epoch_s=epoch_s, knn_s=knn_s, knn_freq=knn_freq)
        return 2

    monkeypatch.setattr(train, "epochs_for_budget", fit)
    common = [*flags, "--attention_images", "0", "--knn_freq", "5", "--epochs"]
    auto = run(tmp_path / "auto", *common, "auto", "--max_train_minutes", "30")
    assert seen["budget_s"] == 1800 and seen["knn_freq"] == 5
    assert 0 < seen["epoch_s"] < 60 and 0 < seen["knn_s"] < 60
    out = capsys.readouterr().out
    assert re.search(r"epochs: 2 fit in --max_train_minutes 30 \(calibration: \d+ img/s, about "
                     r"\d+ s per epoch, k-NN \d+ s every 5 epochs\)", out)
    assert "epoch 2/2: loss" in out and auto["epochs_trained"] == 2
    explicit = run(tmp_path / "explicit", *common, "2")
    assert explicit["knn_after"] == auto["knn_after"]
    a = load_checkpoint(tmp_path / "auto" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "explicit" / "checkpoint.pth")
    assert a["args"]["epochs"] == 2  # the number, so that a resume keeps the schedule
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys() and [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    steps = lambda d: [(r["it"], r["loss"], r["lr"], r["wd"], r["momentum"])  # noqa: E731
                       for r in read_log(d) if r["type"] == "step"]
    assert steps(tmp_path / "auto") == steps(tmp_path / "explicit")  # no calibration steps

    # a resume keeps the checkpoint's number of epochs (no new calibration)
    monkeypatch.setattr(train, "calibrate_speed", lambda *a, **k: pytest.fail("calibrated"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "auto" / "checkpoint0001.pth", resumed / "checkpoint.pth")
    result = run(resumed, *common, "auto", "--max_train_minutes", "30", "--resume")
    assert (result["start_epoch"], result["epochs_trained"]) == (1, 2)
    tr = state_tensors(load_checkpoint(resumed / "checkpoint.pth"))
    assert [k for k in ta if not torch.equal(ta[k], tr[k])] == []


def test_epochs_for_budget_counts_epochs_and_evaluations():
    fit = train.epochs_for_budget
    assert fit(100, 10, margin=0) == 10
    assert fit(100, 10) == 9  # the margin: 94 s usable
    assert fit(100, 10, knn_s=5, knn_freq=2, margin=0) == 8  # 8 epochs + 3 evaluations = 95 s
    assert fit(100, 10, knn_s=5, knn_freq=0, margin=0) == 10  # no evaluations during training
    assert fit(5, 10) == 1  # the first epoch always runs
    # a fast machine gets proportionally more: 21 epochs of 75 s in 29 min, 13 of 120 s
    assert (fit(29 * 60, 75), fit(29 * 60, 120)) == (21, 13)


def test_epochs_auto_that_cannot_fit_the_warm_up_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "epochs_for_budget", lambda *a, **k: 1)
    with pytest.raises(SystemExit, match=r"--epochs auto: 1 epoch\(s\) of about \d+ s fit in "
                                         r"--max_train_minutes 1, fewer than --warmup_epochs "
                                         r"\(2\)"):
        run(tmp_path, "--epochs", "auto", "--max_train_minutes", "1", "--warmup_epochs", "2",
            "--knn_before", "false", "--attention_images", "0")
    assert not (tmp_path / "checkpoint.pth").exists()


def test_batched_augmentation_needs_images_of_one_size(tmp_path, capsys):
    root = tmp_path / "images"
    for i, size in enumerate([(16, 16), (16, 16), (20, 12)]):
        folder = root / "train" / f"c{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", size).save(folder / "0.png")
    (root / "test").mkdir()
    shutil.copytree(root / "train" / "c0", root / "test" / "c0")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run(out, "--data_path", str(root), "--augmentation", "batched")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--augmentation batched needs training images of one size" in err
    assert "16x16, 20x12" in err
    assert not out.exists()


def test_defaults_depend_on_the_data_set_and_flags_win(tmp_path):
    parser = train_args.get_args_parser()
    demo = parser.parse_args(["--output_dir", str(tmp_path / "a")])
    train_args.validate_args(demo, parser)
    assert (demo.embed_dim, demo.num_heads, demo.epochs) == (96, 3, 20)  # the quick CPU demo
    assert (demo.train_samples, demo.knn_train_samples, demo.knn_test_samples) == (2000, 2000, 1000)
    assert (demo.recipe, demo.augmentation, demo.centering, demo.ibot_loss_weight) == \
        ("dinov2", "batched", "sinkhorn_knopp", 1.0)
    folder = tmp_path / "images" / "cls"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    real = parser.parse_args(["--output_dir", str(tmp_path / "b"),
                              "--data_path", str(tmp_path / "images")])
    train_args.validate_args(real, parser)
    assert (real.embed_dim, real.num_heads, real.epochs, real.train_samples) == (0, 0, 10, 0)
    assert (real.recipe, real.augmentation, real.centering, real.ibot_loss_weight) == \
        ("dino", "pil", "centering", 0.0)
    chosen = parser.parse_args(["--output_dir", str(tmp_path / "c"), "--embed_dim", "0",
                                "--num_heads", "0", "--epochs", "5"])
    train_args.validate_args(chosen, parser)
    assert (chosen.embed_dim, chosen.num_heads, chosen.epochs) == (0, 0, 5)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, monkeypatch, native):
    monkeypatch.setattr(train_args, "cpu_has_native_bf16", lambda: native)
    parser = train_args.get_args_parser()
    for precision in ("bf16", "fp32", "auto"):
        args = parser.parse_args(["--output_dir", str(tmp_path), "--device", "cpu",
                                  "--precision", precision])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_args.validate_args(args, parser)
        slow = [w for w in caught if "no native bf16" in str(w.message)]
        assert len(slow) == (precision == "bf16" and not native)
        if slow:
            assert "--precision fp32" in str(slow[0].message)


def test_cpu_has_native_bf16_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(train_args.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True),
                                       (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert train_args.cpu_has_native_bf16() is expected
    monkeypatch.setattr(train_args.platform, "machine", lambda: "aarch64")
    assert train_args.cpu_has_native_bf16()
