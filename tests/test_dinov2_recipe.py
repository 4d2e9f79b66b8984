"""The DINOv2 recipe in the training script: block masks, the mask token, patch tokens through the
heads, the combined loss against DINOv2's SSLMetaArch written out with the official formulas,
and tiny training runs (every term logged, exact resume, two gloo processes, flag checks)."""
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from test_train import TINY, assert_rejected_before_any_work, read_log, state_tensors

from dino_fast import knn, train
from dino_fast.checkpoint import load_checkpoint
from dino_fast.head import DINOHead
from dino_fast.masking import BlockMaskGenerator, MaskBatch, mask_weights, sample_masks
from dino_fast.models import MultiCropOutput, MultiCropWrapper, build_vit
from dino_fast.train_args import RECIPES, get_args_parser, validate_args
from dino_fast.training_loss import TrainingLoss

from dinov_reference import (
    official_dinov2_dino_forward,
    official_ibot_forward_masked,
    official_koleo,
    official_masks_weight,
    official_sinkhorn_knopp,
    official_softmax_center,
)

# ------------------------------------------------------------------------ the official masks


def official_block_mask(height, width, num_masking_patches, rng, min_num_patches=4,
                        max_num_patches=None, min_aspect=0.3):
    """DINOv2's MaskingGenerator.__call__, written out, drawing from `rng`."""
    max_num_patches = 0.5 * height * width if max_num_patches is None else max_num_patches
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_num_patches)
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_num_patches, budget)
            aspect_ratio = math.exp(rng.uniform(*log_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - num_masked <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def official_collate_masks(B, height, width, ratio, probability, rng):
    """The masks of DINOv2's collate_data_and_cast, written out."""
    N = height * width
    n_samples_masked = int(B * probability)
    probs = torch.linspace(*ratio, n_samples_masked + 1)
    masks = []
    for i in range(n_samples_masked):
        masks.append(torch.BoolTensor(official_block_mask(
            height, width, int(N * rng.uniform(probs[i], probs[i + 1])), rng)))
    for _ in range(n_samples_masked, B):
        masks.append(torch.BoolTensor(official_block_mask(height, width, 0, rng)))
    rng.shuffle(masks)
    collated = torch.stack(masks).flatten(1)
    return collated, official_masks_weight(collated)


@pytest.mark.parametrize("grid,B,ratio,p", [((4, 4), 16, (0.1, 0.5), 0.5),
                                            ((14, 14), 8, (0.1, 0.5), 0.5),
                                            ((3, 5), 7, (0.0, 1.0), 1.0),
                                            ((8, 8), 5, (0.3, 0.3), 0.4)])
def test_masks_are_dinov2s_draw_for_draw(grid, B, ratio, p):
    for seed in range(5):
        ours = sample_masks(B, grid, ratio, p, random.Random(seed))
        masks, weights = official_collate_masks(B, *grid, ratio, p, random.Random(seed))
        assert torch.equal(ours.masks, masks)
        assert torch.allclose(ours.weights, weights.float())


def test_block_masks_stay_within_the_count_and_weights_sum_to_one_per_image():
    gen = BlockMaskGenerator((14, 14))
    rng = random.Random(0)
    exact = 0
    for n in range(0, 99):
        m = gen(n, rng)
        assert m.shape == (14, 14) and m.sum() <= n
        exact += int(m.sum() == n)
    assert exact >= 80  # rectangles reach the count almost always (DINOv2 may fall short)
    batch = sample_masks(16, 4, (0.1, 0.5), 0.5, random.Random(1))
    assert batch.masks.shape == (16, 16) and int(batch.masks.any(1).sum()) == 8
    per_image = torch.zeros(16).index_add_(0, batch.masks.nonzero()[:, 0], batch.weights)
    assert torch.allclose(per_image[batch.masks.any(1)], torch.ones(8))
    assert torch.equal(mask_weights(batch.masks), batch.weights)
    assert not torch.equal(batch.masks, sample_masks(16, 4, (0.1, 0.5), 0.5,
                                                     random.Random(2)).masks)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(ratio_min_max=(-0.1, 0.5)), ValueError, "mask_ratio_min_max must lie in"),
    (dict(ratio_min_max=(0.1, 1.5)), ValueError, "mask_ratio_min_max must lie in"),
    (dict(ratio_min_max=(0.6, 0.5)), ValueError, "min must be <= max"),
    (dict(ratio_min_max=(0.1,)), TypeError, "two numbers"),
    (dict(probability=1.5), ValueError, "mask_sample_probability must be in"),
    (dict(n_images=0), ValueError, "n_images must be >= 1"),
])
def test_bad_mask_arguments_name_the_argument(kwargs, error, message):
    args = dict(n_images=4, grid=4, ratio_min_max=(0.1, 0.5), probability=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sample_masks(**args, rng=random.Random(0))


# ---------------------------------------------------------------- mask token and patch tokens

def tiny_vit(mask_token=True, seed=0):
    torch.manual_seed(seed)
    vit = build_vit("vit_tiny", patch_size=4, img_size=16, depth=1, embed_dim=32, num_heads=2,
                    mask_token=mask_token)
    with torch.no_grad():
        if mask_token:
            vit.mask_token.normal_()
    return vit


def test_masked_positions_are_exactly_the_mask_token(monkeypatch):
    vit = tiny_vit()
    x = torch.randn(3, 3, 16, 16)
    masks = torch.rand(3, 16) < 0.4
    seen = {}
    original = vit._pos_embed

    def spy(tokens):
        seen["tokens"] = tokens.clone()
        return original(tokens)
    monkeypatch.setattr(vit, "_pos_embed", spy)
    cls, patches = vit(x, masks=masks, return_patch_tokens=True)
    tokens = seen["tokens"].reshape(3, 16, 32)
    embedded = vit.patch_embed(x).reshape(3, 16, 32)
    assert torch.equal(tokens[masks], vit.mask_token.expand(int(masks.sum()), 32))
    assert torch.equal(tokens[~masks], embedded[~masks])
    assert cls.shape == (3, 32) and patches.shape == (3, 16, 32)
    # unmasked: the CLS output is timm's forward
    cls_plain, _ = vit(x, return_patch_tokens=True)
    assert torch.allclose(cls_plain, vit(x), atol=1e-6)
    assert not torch.allclose(cls, cls_plain)


def test_mask_token_gets_a_gradient_and_exists_only_when_asked():
    vit = tiny_vit()
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3:7] = True
    cls, patches = vit(torch.randn(2, 3, 16, 16), masks=masks, return_patch_tokens=True)
    (cls.sum() + patches.sum()).backward()
    assert vit.mask_token.grad is not None and vit.mask_token.grad.abs().sum() > 0
    assert "mask_token" in vit.state_dict()
    plain = tiny_vit(mask_token=False)
    assert "mask_token" not in plain.state_dict()
    with pytest.raises(ValueError, match="no mask token"):
        plain(torch.randn(2, 3, 16, 16), masks=masks)
    with pytest.raises(ValueError, match=r"masks must be a bool tensor of shape .* \(2, 16\)"):
        vit(torch.randn(2, 3, 16, 16), masks=masks[:, :8])
    with pytest.raises(ValueError, match="masks must be a bool tensor"):
        vit(torch.randn(2, 3, 16, 16), masks=masks.float())


@pytest.mark.parametrize("separate", [False, True])
def test_wrapper_sends_the_selected_patch_tokens_through_the_right_head(separate):
    vit = tiny_vit()
    torch.manual_seed(1)
    head, ibot_head = DINOHead(32, 24, hidden_dim=16, bottleneck_dim=8), None
    if separate:
        ibot_head = DINOHead(32, 40, hidden_dim=16, bottleneck_dim=8)
    net = MultiCropWrapper(vit, head, ibot_head)
    crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8)] * 2
    masks = sample_masks(4, 4, (0.2, 0.5), 1.0, random.Random(0)).masks
    out = net(crops, masks=masks)
    assert isinstance(out, MultiCropOutput)
    cls_g, patches = vit(torch.cat(crops[:2]), masks=masks, return_patch_tokens=True)
    cls_l = vit(torch.cat(crops[2:]))
    patch_head = ibot_head if separate else head
    assert torch.allclose(out.logits, head(torch.cat([cls_g, cls_l])), atol=1e-5)
    assert torch.allclose(out.patch_logits, patch_head(patches[masks]), atol=1e-5)
    assert torch.equal(out.global_features, cls_g)
    # the teacher: unmasked input, the same positions selected
    t = net(crops[:2], patch_select=masks)
    _, t_patches = vit(torch.cat(crops[:2]), return_patch_tokens=True)
    assert torch.allclose(t.patch_logits, patch_head(t_patches[masks]), atol=1e-5)
    plain = head(torch.cat([vit(torch.cat(crops[:2])), cls_l]))
    assert torch.allclose(net(crops), plain, atol=1e-5)  # the plain call: CLS logits only
    with pytest.raises(ValueError, match="patch_select must be a bool tensor"):
        net(crops[:2], patch_select=masks[:3])
    # CPU-computed positions (MaskBatch.indices) select the same tokens as the boolean masks
    batch = sample_masks(4, 4, (0.2, 0.5), 1.0, random.Random(0))
    assert torch.equal(batch.indices, batch.masks.flatten().nonzero().squeeze(1))
    assert torch.equal(batch.select, batch.indices)
    by_index = net(crops, masks=batch.masks, patch_select=batch.indices)
    assert torch.equal(by_index.patch_logits, out.patch_logits)
    assert torch.equal(net(crops[:2], patch_select=batch.indices).patch_logits,
                       net(crops[:2], patch_select=batch.masks).patch_logits)
    with pytest.raises(ValueError, match=r"patch_select indices must lie in \[0, 64\)"):
        net(crops[:2], patch_select=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="or int64 positions"):
        net(crops[:2], patch_select=batch.indices.int())
    # local crops as large as the global ones: one resolution run, masks on the global crops only
    same = crops[:2] + [torch.randn(2, 3, 16, 16)]
    out = net(same, masks=masks)
    cls_local = vit(same[2])
    assert torch.allclose(out.logits, head(torch.cat([cls_g, cls_local])), atol=1e-5)
    assert torch.equal(out.global_features, cls_g)


# ------------------------------------------------------- the loss against DINOv2's SSLMetaArch

def official_ssl_loss(s, t, masks, n_local, centering, temp, centers, weights, B):
    """DINOv2's SSLMetaArch.forward_backward loss, written out with the official formulas
    (fp64). s / t: dicts of student / teacher tensors; centers: [dino (1, K), ibot (1, 1, K)]
    updated in place as the official classes do (momentum 0.9)."""
    dino_w, ibot_w, koleo_w = weights
    n_terms = 2 + 2 * n_local  # n_global_crops_loss_terms + n_local_crops_loss_terms
    t_cls = t["logits"].chunk(2)
    t_cls = torch.cat((t_cls[1], t_cls[0]))  # reversed: A is matched to B
    if centering == "centering":
        q = official_softmax_center(t_cls, centers[0], temp).view(2, B, -1)
        q_patch = official_softmax_center(t["patch_logits"].unsqueeze(0), centers[1],
                                          temp).squeeze(0)
    else:
        q = official_sinkhorn_knopp(t_cls, temp).view(2, B, -1)
        q_patch = official_sinkhorn_knopp(t["patch_logits"], temp)
    local = s["logits"][2 * B:].chunk(n_local)
    glob = s["logits"][:2 * B]
    dino_local = official_dinov2_dino_forward(local, q) / n_terms
    dino_global = official_dinov2_dino_forward([glob], [q.flatten(0, 1)]) * 2 / n_terms
    koleo = koleo_w * sum(official_koleo(p) for p in s["global_features"].chunk(2))
    ibot = official_ibot_forward_masked(s["patch_logits"], q_patch, masks.masks,
                                        n_masked_patches=masks.n_masked,
                                        masks_weight=masks.weights.double()) * 2 * 0.5
    loss = dino_w * dino_local + dino_w * dino_global + koleo + ibot_w * ibot
    if centering == "centering":  # the updates the next step's softmax_center_teacher applies
        centers[0].mul_(0.9).add_(0.1 * t["logits"].sum(0, keepdim=True) / t["logits"].shape[0])
        centers[1].mul_(0.9).add_(0.1 * t["patch_logits"].mean(0).view(1, 1, -1))
    return loss, dict(dino_loss=dino_local + dino_global, koleo_loss=koleo / koleo_w,
                      ibot_loss=ibot)


def random_outputs(B, n_local, K, D, M, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = dict(logits=torch.randn((2 + n_local) * B, K, generator=g) * scale,
             global_features=torch.randn(2 * B, D, generator=g),
             patch_logits=torch.randn(M, K, generator=g) * scale)
    t = dict(logits=torch.randn(2 * B, K, generator=g) * scale,
             global_features=torch.randn(2 * B, D, generator=g),
             patch_logits=torch.randn(M, K, generator=g) * scale)
    return s, t


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_training_loss_is_dinov2s_objective_values_gradients_and_centers(centering):
    B, n_local, K, D = 4, 3, 37, 8
    masks = sample_masks(2 * B, 4, (0.1, 0.5), 0.5, random.Random(0))
    fn = TrainingLoss(K, 2 + n_local, 0.04, 0.07, 2, 4, centering=centering,
                      ibot_loss_weight=0.7, koleo_loss_weight=0.1, backend="eager")
    centers = [torch.zeros(1, K, dtype=torch.float64), torch.zeros(1, 1, K, dtype=torch.float64)]
    for step, epoch in enumerate((0, 1, 3)):
        s, t = random_outputs(B, n_local, K, D, masks.n_masked, seed=step)
        s = {k: v.requires_grad_() for k, v in s.items()}
        loss, terms = fn(MultiCropOutput(**s), MultiCropOutput(**t), epoch, masks)
        s64 = {k: v.detach().double().requires_grad_() for k, v in s.items()}
        t64 = {k: v.double() for k, v in t.items()}
        temp = float(fn.dino.teacher_temp_schedule[epoch])
        ref, ref_terms = official_ssl_loss(s64, t64, masks, n_local, centering, temp, centers,
                                           (1.0, 0.7, 0.1), B)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        for name, value in ref_terms.items():
            assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name
        loss.backward()
        ref.backward()
        for k in s:
            assert torch.allclose(s[k].grad.double(), s64[k].grad, rtol=1e-4, atol=1e-6), k
        fn.synchronize()
        assert torch.allclose(fn.dino.center.double(), centers[0], atol=1e-6)
        assert torch.allclose(fn.ibot.center.double(), centers[1], atol=1e-6)


def test_training_loss_without_masked_patches_and_bad_input():
    B, K = 2, 16
    fn = TrainingLoss(K, 2, 0.04, 0.04, 0, 1, ibot_loss_weight=1.0)
    empty = MaskBatch(torch.zeros(2 * B, 16, dtype=torch.bool), torch.zeros(0))
    s, t = random_outputs(B, 0, K, 4, 0, seed=0)
    s["patch_logits"].requires_grad_()
    loss, terms = fn(MultiCropOutput(**s), MultiCropOutput(**t), 0, empty)
    assert terms["ibot_loss"].item() == 0.0 and torch.isfinite(loss)
    with pytest.raises(TypeError, match="needs the batch's masks"):
        fn(MultiCropOutput(**s), MultiCropOutput(**t), 0, None)
    with pytest.raises(ValueError, match="needs the teacher's patch tokens"):
        fn(MultiCropOutput(**s), MultiCropOutput(**{**t, "patch_logits": None}), 0, empty)
    masks = sample_masks(2 * B, 4, (0.3, 0.5), 1.0, random.Random(0))
    with pytest.raises(ValueError, match=r"student.patch_logits must have shape \(\d+, 16\)"):
        fn(MultiCropOutput(**s), MultiCropOutput(**t), 0, masks)
    with pytest.raises(ValueError, match="epoch must be in"):
        fn(MultiCropOutput(**s), MultiCropOutput(**t), 1, empty)
    with pytest.raises(ValueError, match="centering must be one of"):
        TrainingLoss(K, 2, 0.04, 0.04, 0, 1, centering="sk")
    with pytest.raises(ValueError, match="koleo_loss_weight must be a positive"):
        TrainingLoss(K, 2, 0.04, 0.04, 0, 1, koleo_loss_weight=-1.0)


def _empty_rank_worker(rank, world, port, centering, result_path):
    """Rank 0 draws no masked patch, rank 1 some: both must get through two steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        B, K = 2, 16
        fn = TrainingLoss(K, 2, 0.04, 0.04, 0, 2, centering=centering, ibot_loss_weight=1.0,
                          backend="eager")
        if rank == 0:
            masks = MaskBatch(torch.zeros(2 * B, 16, dtype=torch.bool), torch.zeros(0))
        else:
            masks = sample_masks(2 * B, 4, (0.3, 0.5), 1.0, random.Random(0))
        out = {}
        for step in range(2):
            s, t = random_outputs(B, 0, K, 4, masks.n_masked, seed=10 * rank + step)
            _, terms = fn(MultiCropOutput(**s), MultiCropOutput(**t), 0, masks)
            out[f"ibot_{step}"] = terms["ibot_loss"]
            out[f"teacher_{step}"] = t["patch_logits"]
        fn.synchronize()
        out["center"] = fn.ibot.center.clone()
        out["n_masked"] = masks.n_masked
        torch.save(out, f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_a_rank_without_masked_patches_joins_the_collectives(tmp_path, centering):
    result = str(tmp_path / "out")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_empty_rank_worker,
                         args=(rank, 2, port, centering, result))
             for port in [free_port()] for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    hung = [proc.pid for proc in procs if proc.is_alive()]
    for proc in procs:
        proc.kill() if proc.is_alive() else None
    assert not hung, "a rank waited forever for a collective"
    assert all(proc.exitcode == 0 for proc in procs)
    empty, full = torch.load(f"{result}.0"), torch.load(f"{result}.1")
    assert empty["n_masked"] == 0 and full["n_masked"] > 0
    assert empty["ibot_0"].item() == 0.0 and empty["ibot_1"].item() == 0.0
    # both ranks hold the same center; rank 1's loss is the loss on its patches alone
    assert torch.equal(empty["center"], full["center"])
    masks = sample_masks(4, 4, (0.3, 0.5), 1.0, random.Random(0))
    K = 16
    if centering == "sinkhorn_knopp":  # rank 0 adds nothing to the column sums
        alone = TrainingLoss(K, 2, 0.04, 0.04, 0, 2, centering=centering, ibot_loss_weight=1.0,
                             backend="eager")
        s, t = random_outputs(2, 0, K, 4, masks.n_masked, seed=10)
        _, terms = alone(MultiCropOutput(**s), MultiCropOutput(**t), 0, masks)
        assert terms["ibot_loss"].item() == pytest.approx(full["ibot_0"].item(), rel=1e-6)
    else:  # rank 0's share of each update keeps the center: c <- 0.9 c + 0.1 (c + mean_1) / 2
        c = torch.zeros(1, 1, K, dtype=torch.float64)
        for step in range(2):
            batch = full[f"teacher_{step}"].double().mean(0).view(1, 1, K)
            c = 0.9 * c + 0.1 * (c + batch) / 2
        torch.testing.assert_close(full["center"].double(), c, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- training runs

DINOV2 = ["--recipe", "dinov2", "--knn_before", "false", "--attention_images", "0"]


def run(output_dir, *extra):
    return train.run(TINY + ["--output_dir", str(output_dir), *extra])


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_tiny_dinov2_run_logs_every_term_and_trains_the_mask_token(tmp_path, centering):
    result = run(tmp_path, *DINOV2, "--centering", centering, "--ibot_separate_head",
                 str(centering == "sinkhorn_knopp"))
    assert result["epochs_trained"] == 2
    steps = [r for r in read_log(tmp_path) if r["type"] == "step"]
    assert len(steps) >= 4
    for r in steps:
        for term in ("loss", "dino_loss", "ibot_loss", "koleo_loss"):
            assert math.isfinite(r[term]), (term, r)
        assert r["loss"] == pytest.approx(r["dino_loss"] + r["ibot_loss"]
                                          + 0.1 * r["koleo_loss"], rel=1e-5)
    epochs = [r for r in read_log(tmp_path) if r["type"] == "epoch"]
    assert epochs[-1]["terms"] == ["dino_loss", "koleo_loss", "ibot_loss"]
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["student"]["backbone.mask_token"].abs().sum() > 0  # trained from zeros
    assert ckpt["teacher"]["backbone.mask_token"].abs().sum() > 0  # and followed by the EMA
    assert ("ibot_head.last_layer.weight_v" in ckpt["student"]) == (centering == "sinkhorn_knopp")
    ibot_center = ckpt["ibot_loss"]["center"]
    assert ibot_center.shape == (1, 1, 64)
    assert (ibot_center.abs().sum() > 0) == (centering == "centering")
    # the k-NN tool rebuilds the backbone with its mask token from the checkpoint
    alone = knn.run(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--device", "cpu"])
    assert alone["knn_top1"] == result["knn_after"]["knn_top1"]


def test_dinov2_resume_with_masks_is_bit_exact(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = [*DINOV2, "--centering", "centering", "--num_workers", "1"]
    run(full, *common)
    resumed.mkdir()
    shutil.copy(full / "checkpoint0001.pth", resumed / "checkpoint.pth")
    assert run(resumed, *common, "--resume")["start_epoch"] == 1
    a = state_tensors(load_checkpoint(full / "checkpoint.pth"))
    b = state_tensors(load_checkpoint(resumed / "checkpoint.pth"))
    assert "ibot_loss.center" in a and "student.backbone.mask_token" in a
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # and a DINO-recipe run cannot resume it (no mask token, no iBOT head)
    with pytest.raises(SystemExit, match="mask token"):
        run(resumed, "--resume", "--knn_before", "false", "--epochs", "3")


def test_resume_checks_checkpoints_from_before_the_recipe_flags(tmp_path):
    from dino_fast.train_args import LEGACY_ARGS
    first = ["--epochs", "2", "--knn_before", "false", "--attention_images", "0"]
    assert run(tmp_path, *first, "--max_train_minutes", "0.0001")["epochs_trained"] == 1
    path = tmp_path / "checkpoint.pth"
    ckpt = load_checkpoint(path)
    for key in LEGACY_ARGS:  # what a checkpoint of a run before the recipe flags holds
        del ckpt["args"][key]
    torch.save(ckpt, path)
    # the demo's default is now the DINOv2 recipe: a clear refusal, not a state-dict traceback
    with pytest.raises(SystemExit, match=r"mask token .*False \(checkpoint\) vs True .*"
                                         r"pass --recipe dino"):
        run(tmp_path, *first, "--recipe", "dinov2", "--resume")
    # the same networks with another objective: trains on, with a warning naming the flag
    with pytest.warns(RuntimeWarning, match=r"another objective: --koleo_loss_weight 0 "
                                            r"\(checkpoint\) vs 0.1 \(now\)"):
        result = run(tmp_path, *first, "--koleo_loss_weight", "0.1", "--resume")
    assert (result["start_epoch"], result["epochs_trained"]) == (1, 2)


def test_dinov2_on_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dino_fast.train", *TINY, "--output_dir", str(out), *DINOV2,
           "--centering", "centering"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "iBOT" in proc.stdout
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state_tensors(ckpt).values())
    assert ckpt["ibot_loss"]["center"].abs().sum() > 0
    steps = [r for r in read_log(out) if r["type"] == "step"]
    assert steps and all(math.isfinite(r["ibot_loss"]) for r in steps)


def parse(*flags):
    parser = get_args_parser()
    args = parser.parse_args(list(TINY) + ["--output_dir", "/tmp/dino_fast_unused", *flags])
    validate_args(args, parser)
    return args


def test_recipe_presets_and_explicit_flags_win():
    dino = parse()
    assert (dino.centering, dino.ibot_loss_weight, dino.koleo_loss_weight) == \
        ("centering", 0.0, 0.0)
    assert dino.use_mask_token is False and dino.ibot_separate_head is False
    v2 = parse("--recipe", "dinov2")
    for name, value in RECIPES["dinov2"].items():
        assert getattr(v2, name) == value
    assert v2.use_mask_token and v2.ibot_out_dim == v2.out_dim
    mixed = parse("--recipe", "dinov2", "--koleo_loss_weight", "0", "--centering", "centering",
                  "--ibot_out_dim", "48")
    assert (mixed.koleo_loss_weight, mixed.centering, mixed.ibot_out_dim) == \
        (0.0, "centering", 48)
    assert parse("--ibot_loss_weight", "0.5").ibot_separate_head is False  # dino: shared head


@pytest.mark.parametrize("flags,message", [
    (["--mask_ratio_min_max", "-0.1", "0.5"], "--mask_ratio_min_max must lie in [0, 1]"),
    (["--mask_ratio_min_max", "0.6", "0.2"], "--mask_ratio_min_max: min must be <= max"),
    (["--mask_sample_probability", "1.2"], "--mask_sample_probability must be in [0, 1]"),
    (["--recipe", "dinov2", "--mask_sample_probability", "0"], "needs masked patches"),
    (["--recipe", "dinov2", "--mask_ratio_min_max", "0", "0"], "needs masked patches"),
    (["--ibot_loss_weight", "1", "--ibot_out_dim", "32"], "needs --ibot_separate_head true"),
    (["--ibot_loss_weight", "-1"], "--ibot_loss_weight must be a finite number >= 0"),
    (["--recipe", "dinov2", "--patch_size", "16", "--image_size", "16", "--local_crop_size",
      "16"], "needs patch tokens to mask"),
    (["--koleo_loss_weight", "0.1", "--batch_size_per_gpu", "1"], "--batch_size_per_gpu >= 2"),
    (["--recipe", "dinov2", "--mask_ratio_min_max", "0", "0.05"], "masks no patch of the 4x4"),
    (["--centering", "sk"], "invalid choice"),
])
def test_bad_recipe_flags_are_rejected_before_any_work(tmp_path, capsys, flags, message):
    assert_rejected_before_any_work(tmp_path / "out", flags, message, capsys)


def test_masks_feed_the_loss_with_dinov2s_weights():
    """The step's masks: 2 x B global crops, int(2B * p) of them masked, weights 1 / count."""
    args = parse("--recipe", "dinov2")
    masks_of = train.make_masks_fn(args, seed=0, device=torch.device("cpu"))
    batch = masks_of(16)
    assert batch.masks.shape == (16, (args.image_size // args.patch_size) ** 2)
    assert int(batch.masks.any(1).sum()) == int(16 * args.mask_sample_probability)
    assert torch.equal(batch.weights, official_masks_weight(batch.masks).float())
    again = train.make_masks_fn(args, seed=0, device=torch.device("cpu"))(16)
    assert torch.equal(again.masks, batch.masks)  # seeded per epoch: resume draws the same
    assert train.make_masks_fn(parse(), seed=0, device=torch.device("cpu")) is None
