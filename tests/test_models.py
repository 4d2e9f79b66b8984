"""Models: the official ViT shapes, the DINO head against the official construction, the multi-crop
wrapper, last-block attention, official checkpoints, and torch.compile (graph counts)."""
import argparse
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.checkpoint import load_official_checkpoint
from dino_fast.head import DINOHead, WeightNormLinear
from dino_fast.models import MultiCropWrapper, build_vit, compile_backbone, last_selfattention


def tiny_vit(**kw):
    args = dict(patch_size=4, img_size=16, depth=2, embed_dim=32, num_heads=2)
    args.update(kw)
    return build_vit("vit_tiny", **args)


def official_vit_param_count(embed_dim, depth, patch_size, img_size):
    """Parameters of the official DINO ViT, counted from its definition."""
    D, n_patches = embed_dim, (img_size // patch_size) ** 2
    block = 12 * D * D + 13 * D  # norm1, qkv (bias), proj, norm2, fc1 (4D), fc2
    return 3 * patch_size ** 2 * D + D + D + (n_patches + 1) * D + depth * block + 2 * D


# ------------------------------------------------------------------------------------ backbone

@pytest.mark.parametrize("arch,dims", [("vit_tiny", (192, 3)), ("vit_small", (384, 6)),
                                       ("vit_base", (768, 12))])
@pytest.mark.parametrize("patch_size", [16, 8])
def test_build_vit_has_the_official_architecture(arch, dims, patch_size):
    vit = build_vit(arch, patch_size=patch_size, device="meta")  # structure only, no memory
    embed_dim, heads = dims
    assert vit.embed_dim == embed_dim
    assert len(vit.blocks) == 12
    assert vit.blocks[0].attn.num_heads == heads
    assert vit.blocks[0].attn.qkv.bias is not None
    assert vit.blocks[0].mlp.fc1.out_features == 4 * embed_dim
    assert vit.norm.eps == 1e-6 and vit.blocks[-1].norm1.eps == 1e-6
    assert vit.patch_embed.patch_size == (patch_size, patch_size)
    assert sum(p.numel() for p in vit.parameters()) == \
        official_vit_param_count(embed_dim, 12, patch_size, 224)


def test_vit_outputs_the_cls_feature_at_global_and_local_resolutions():
    vit = tiny_vit().eval()
    for size in (16, 8, 12):  # 12: a grid (3x3) the position embeddings were not stored at
        out = vit(torch.randn(3, 3, size, size))
        assert out.shape == (3, 32) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    # the CLS token after the final norm, not a pooled average
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.forward_features(x)
    torch.testing.assert_close(vit(x), tokens[:, 0])


def test_vit_drop_path_rate_reaches_the_blocks_and_is_random_only_in_training():
    vit = tiny_vit(depth=3, drop_path_rate=0.2)
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0
             for blk in vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    x = torch.randn(4, 3, 16, 16)
    vit.eval()
    torch.testing.assert_close(vit(x), vit(x))
    vit.train()
    torch.manual_seed(1)
    a = vit(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, vit(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="vit_huge"), "arch must be one of"),
    (dict(pretrained=True), "never downloads"),
    (dict(num_classes=10), "fixes"),
    (dict(img_size=30, patch_size=4), "multiple of patch_size"),
    (dict(embed_dim=30, num_heads=4), "multiple of num_heads"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(patch_embed="patchify"), "patch_embed must be one of"),
    (dict(patch_embed="conv", patch_size=6, img_size=24), "power of two"),
    (dict(patch_embed="conv", patch_size=1), "power of two"),
    (dict(mlp_ratio=0), "mlp_ratio must be a positive number"),
    (dict(mlp_ratio=0.001), "embed_dim x mlp_ratio >= 1"),
    (dict(mlp_ratio=float("inf")), "mlp_ratio must be a positive number"),
    (dict(depth=0), "depth must be >= 1"),  # no block: the CLS feature ignores the image
])
def test_build_vit_rejects_bad_arguments(kwargs, match):
    args = dict(arch="vit_tiny", patch_size=4, img_size=16, depth=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_vit(**args)


def test_the_training_scripts_depth_0_still_means_the_architectures_depth():
    from dino_fast.builders import build_backbone
    args = argparse.Namespace(arch="vit_tiny", patch_size=8, image_size=16, drop_path_rate=0.0,
                              depth=0, embed_dim=0, num_heads=0, mlp_ratio=4.0)
    assert len(build_backbone(args).blocks) == 12


def test_mlp_ratio_sets_the_blocks_mlp_width_and_nothing_else():
    official = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2)
    narrow = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2, mlp_ratio=2)
    assert official.blocks[0].mlp.fc1.out_features == 4 * 192
    for block in narrow.blocks:
        assert (block.mlp.fc1.out_features, block.mlp.fc2.in_features) == (384, 384)
    shapes = {k: v.shape for k, v in official.state_dict().items() if ".mlp." not in k}
    assert shapes == {k: v.shape for k, v in narrow.state_dict().items() if ".mlp." not in k}
    assert narrow(torch.randn(2, 3, 16, 16)).shape == (2, 192)


def test_conv_stem_gives_the_patchify_grid_at_every_resolution_and_learns():
    torch.manual_seed(0)
    vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=96, num_heads=3,
                    patch_embed="conv", mask_token=True)
    linear = build_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=96, num_heads=3)
    stem = vit.patch_embed.proj
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    # 3 stride-2 3x3 convolutions 3 -> 24 -> 48 -> 96, then 1x1 96 -> 96
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 24, (3, 3), (2, 2)), (24, 48, (3, 3), (2, 2)), (48, 96, (3, 3), (2, 2)),
        (96, 96, (1, 1), (1, 1))]
    assert "patch_embed.proj.0.weight" in vit.state_dict()
    for size, n in ((32, 16), (16, 4)):
        x = torch.randn(2, 3, size, size)
        cls, patches = vit(x, return_patch_tokens=True)
        _, lin_patches = linear(x, return_patch_tokens=True)
        assert cls.shape == (2, 96) and patches.shape == lin_patches.shape == (2, n, 96)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 3] = True
    cls, _ = vit(torch.randn(2, 3, 32, 32), masks=masks, return_patch_tokens=True)
    cls.square().sum().backward()
    assert convs[0].weight.grad.abs().sum() > 0 and vit.mask_token.grad.abs().sum() > 0
    attn, grid = last_selfattention(vit.eval(), torch.randn(1, 3, 32, 32))
    assert grid == (4, 4) and attn.shape[-1] == 16


def test_conv_stem_on_channels_last_images_is_the_stem_on_the_images():
    # the CPU path converts the images to channels-last; values and gradients stay those of
    # the plain convolution stack (within rounding) and the tokens come out in row-major order
    torch.manual_seed(0)
    embed = build_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=96, num_heads=3,
                      patch_embed="conv").patch_embed
    layouts = []
    embed.proj[0].register_forward_pre_hook(lambda m, inp: layouts.append(
        inp[0].is_contiguous(memory_format=torch.channels_last)))
    for size in (32, 16):
        x = torch.randn(3, 3, size, size, requires_grad=True)
        tokens = embed(x)
        assert layouts.pop() is True
        assert tokens.shape == (3, size // 8, size // 8, 96)
        expected = embed.proj(x.detach().clone().requires_grad_()).permute(0, 2, 3, 1)
        torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(tokens.square().sum(), [x, *embed.parameters()])
        x2 = x.detach().clone().requires_grad_()
        plain = embed.proj(x2).permute(0, 2, 3, 1)
        for got, want in zip(grads, torch.autograd.grad(plain.square().sum(),
                                                        [x2, *embed.parameters()])):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_conv_stem_follows_a_new_image_size_and_refuses_a_new_patch_size():
    vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=96, num_heads=3,
                    patch_embed="conv")
    stem = [p.clone() for p in vit.patch_embed.parameters()]
    vit.set_input_size(img_size=64)  # timm's API: the grid and the position embedding follow
    assert vit.patch_embed.grid_size == (8, 8) and vit.pos_embed.shape[1] == 1 + 64
    assert vit(torch.randn(1, 3, 64, 64)).shape == (1, 96)
    with pytest.raises(ValueError, match=r"patch_size: the convolutional stem has 3 stride-2 "
                                         r"layers for patches of 8; it cannot change to 4"):
        vit.set_input_size(patch_size=4)
    vit.set_input_size(patch_size=8)  # the same patch size is no change
    assert vit.patch_embed.grid_size == (8, 8)
    assert all(torch.equal(a, b) for a, b in zip(stem, vit.patch_embed.parameters()))


def _vit_outputs_and_grads(vit, x, dtype):
    vit.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
        out = vit(x)
    out.double().square().sum().backward()
    return out.detach().double(), [p.grad.clone() for p in vit.parameters() if p.grad is not None]


def test_build_vit_blocks_use_the_attention_that_picks_its_kernel_with_timms_keys():
    from timm.models.vision_transformer import VisionTransformer

    from dino_fast.models import Attention
    vit = tiny_vit()
    plain = VisionTransformer(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                              qkv_bias=True, num_classes=0, dynamic_img_size=True)
    assert all(type(b.attn) is Attention for b in vit.blocks)
    assert list(vit.state_dict()) == list(plain.state_dict())
    # a ViT whose attention normalises q and k keeps timm's module (Attention computes no norm)
    normed = tiny_vit(qk_norm=True)
    assert all(type(b.attn) is not Attention for b in normed.blocks)


@pytest.mark.parametrize("size", [16, 8])
def test_explicit_and_fused_attention_agree_in_values_and_gradients(monkeypatch, size):
    import dino_fast.models as models
    torch.manual_seed(0)
    vit = tiny_vit(drop_path_rate=0.0)
    x = torch.randn(6, 3, size, size)
    results = {}
    for explicit in (False, True):
        monkeypatch.setattr(models, "explicit_attention_faster", lambda q, e=explicit: e)
        results[explicit, torch.float64] = _vit_outputs_and_grads(vit.double(), x.double(),
                                                                  torch.float64)
        results[explicit, torch.bfloat16] = _vit_outputs_and_grads(vit.float(), x, torch.bfloat16)
    ref_out, ref_grads = results[False, torch.float64]
    out, grads = results[True, torch.float64]
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    for explicit in (False, True):  # bf16 either way: within bf16's rounding of the exact result
        out, grads = results[explicit, torch.bfloat16]
        torch.testing.assert_close(out.double(), ref_out, rtol=0.05, atol=0.05)
        for g, r in zip(grads, ref_grads):
            assert (g.double() - r).norm() <= 0.03 * r.norm() + 1e-6


def test_explicit_attention_only_for_bf16_on_the_cpu_on_short_sequences():
    from dino_fast.models import (
        EXPLICIT_ATTENTION_MAX_TOKENS,
        EXPLICIT_ATTENTION_MAX_TOKENS_WITH_GRAD,
        explicit_attention_faster,
    )

    def q(n, dtype=torch.bfloat16, grad=False):
        return torch.zeros(2, 3, n, 8, dtype=dtype, requires_grad=grad)
    assert explicit_attention_faster(q(17)) and explicit_attention_faster(q(17, grad=True))
    assert not explicit_attention_faster(q(17, torch.float32))
    assert not explicit_attention_faster(q(17, torch.float16))
    assert not explicit_attention_faster(q(EXPLICIT_ATTENTION_MAX_TOKENS + 1))
    assert explicit_attention_faster(q(EXPLICIT_ATTENTION_MAX_TOKENS + 1, grad=True))
    with torch.no_grad():
        assert not explicit_attention_faster(q(EXPLICIT_ATTENTION_MAX_TOKENS + 1, grad=True))
    assert not explicit_attention_faster(q(EXPLICIT_ATTENTION_MAX_TOKENS_WITH_GRAD + 1, grad=True))
    assert not explicit_attention_faster(q(17).to("meta"))


def test_bf16_vit_on_the_cpu_skips_the_fused_kernel_and_fp32_uses_it(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or sdpa(*a, **k))
    vit = tiny_vit()
    _vit_outputs_and_grads(vit, torch.randn(2, 3, 16, 16), torch.bfloat16)
    assert calls == []
    _vit_outputs_and_grads(vit, torch.randn(2, 3, 16, 16), torch.float32)
    assert calls == [torch.float32] * len(vit.blocks)


# ------------------------------------------------------------------------------------ head

def official_head(in_dim, out_dim, use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck_dim):
    """The official DINOHead construction, with the deprecated torch weight_norm helper."""
    nlayers = max(nlayers, 1)
    if nlayers == 1:
        mlp = nn.Linear(in_dim, bottleneck_dim)
    else:
        layers = [nn.Linear(in_dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        for _ in range(nlayers - 2):
            layers.append(nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        mlp = nn.Sequential(*layers)
    head = nn.Module()
    head.mlp = mlp
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            nn.init.constant_(m.bias, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    head.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
        head.last_layer.weight_g.requires_grad = False
    head.forward = lambda x: head.last_layer(F.normalize(head.mlp(x), dim=-1, p=2))
    return head


@pytest.mark.parametrize("use_bn,norm_last_layer,nlayers", [
    (False, True, 3), (True, False, 3), (False, True, 1), (True, True, 4)])
def test_head_matches_the_official_construction_weights_outputs_and_gradients(
        use_bn, norm_last_layer, nlayers):
    args = (12, 37, use_bn, norm_last_layer, nlayers, 24, 8)
    torch.manual_seed(5)
    ref = official_head(*args)
    torch.manual_seed(5)
    ours = DINOHead(*args)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for k in ref_sd:
        torch.testing.assert_close(our_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    assert our_sd["last_layer.weight_g"].shape == (37, 1)
    assert our_sd["last_layer.weight_v"].shape == (37, 8)
    assert torch.equal(our_sd["last_layer.weight_g"], torch.ones(37, 1))
    assert ours.last_layer.weight_g.requires_grad == (not norm_last_layer)

    # fp64: with BatchNorm some gradients are exactly zero in theory, rounding noise in fp32
    x = torch.randn(6, 12, dtype=torch.float64)
    ref.double().train(), ours.double().train()
    out_ref, out = ref(x), ours(x)
    torch.testing.assert_close(out, out_ref)
    out_ref.pow(2).sum().backward()
    out.pow(2).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-9, atol=1e-9,
                                       msg=name)


def test_head_logits_are_cosines_when_the_last_layer_is_normalised():
    head = DINOHead(16, 50, hidden_dim=32, bottleneck_dim=8)
    out = head(torch.randn(20, 16) * 100)
    assert out.shape == (20, 50)
    assert out.abs().max() <= 1 + 1e-5
    # each row of the effective weight has unit norm, so the logit of a bottleneck vector equal
    # to a weight row's direction is exactly 1
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(50))


def test_weight_norm_linear_tracks_g_and_v():
    layer = WeightNormLinear(4, 3)
    with torch.no_grad():
        layer.weight_v.copy_(torch.tensor([[3.0, 4, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]]))
        layer.weight_g.copy_(torch.tensor([[10.0], [2.0], [1.0]]))
    expected = torch.tensor([[6.0, 8, 0, 0], [0, 0, 2, 0], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(layer.weight, expected)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x), x @ expected.T)


@pytest.mark.parametrize("kwargs", [dict(in_dim=0, out_dim=4), dict(in_dim=4, out_dim=4, nlayers=0),
                                    dict(in_dim=4, out_dim=2.5)])
def test_head_rejects_bad_sizes(kwargs):
    with pytest.raises((ValueError, TypeError)):
        DINOHead(**kwargs)


def test_head_checks_its_input_width_and_dtype():
    head = DINOHead(32, 8, hidden_dim=16, bottleneck_dim=4)
    with pytest.raises(ValueError, match=r"x must be a \(N, in_dim=32\) tensor of features, "
                                         r"got shape \(3, 16\)"):
        head(torch.randn(3, 16))
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*int64"):
        head(torch.ones(3, 32, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head([[0.0] * 32])
    assert head(torch.randn(3, 32)).shape == (3, 8)


# ------------------------------------------------------------------------------------ wrapper

class RecordingBackbone(nn.Module):
    """Per-sample features (mean over pixels, times the width) and a log of the batch shapes."""

    def __init__(self, as_tuple=False):
        super().__init__()
        self.calls = []
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.as_tuple = as_tuple

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        out = x.mean(dim=(2, 3)) * self.scale * x.shape[-1]
        return (out, "extra") if self.as_tuple else out


def test_wrapper_runs_the_backbone_once_per_run_of_equal_resolutions_in_crop_major_order():
    backbone = RecordingBackbone()
    head = nn.Linear(3, 5)
    wrapper = MultiCropWrapper(backbone, head)
    B = 4
    crops = [torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8), torch.randn(B, 3, 4, 4),
             torch.randn(B, 3, 4, 4), torch.randn(B, 3, 4, 4), torch.randn(B, 3, 8, 8)]
    out = wrapper(crops)
    assert backbone.calls == [(2 * B, 3, 8, 8), (3 * B, 3, 4, 4), (B, 3, 8, 8)]
    assert out.shape == (6 * B, 5)
    expected = head(torch.cat([c.mean(dim=(2, 3)) * 2 * c.shape[-1] for c in crops]))
    torch.testing.assert_close(out, expected)


def test_wrapper_treats_a_tensor_as_one_crop_and_takes_the_first_item_of_a_tuple():
    backbone = RecordingBackbone(as_tuple=True)
    wrapper = MultiCropWrapper(backbone, nn.Identity())
    x = torch.randn(3, 3, 8, 8)
    out = wrapper(x)
    assert backbone.calls == [(3, 3, 8, 8)]
    torch.testing.assert_close(out, x.mean(dim=(2, 3)) * 16)


def test_wrapper_strips_a_classifier_as_the_official_wrapper():
    backbone = nn.Module()
    backbone.head = nn.Linear(4, 10)
    backbone.fc = nn.Linear(4, 10)
    MultiCropWrapper(backbone, nn.Identity())
    assert isinstance(backbone.head, nn.Identity) and isinstance(backbone.fc, nn.Identity)


@pytest.mark.parametrize("crops", [[], "images", [torch.randn(2, 3, 8)]])
def test_wrapper_rejects_bad_crop_lists(crops):
    with pytest.raises((TypeError, ValueError)):
        MultiCropWrapper(RecordingBackbone(), nn.Identity())(crops)


def _g(b=2, c=3, size=16, **kw):
    return torch.randn(b, c, size, size, **kw)


@pytest.mark.parametrize("crops,error,match", [
    ([_g(), _g(), _g(b=3, size=8)], ValueError,
     r"crops\[2\] must be a \(2, 3, H, W\) tensor as crops\[0\].*got shape \(3, 3, 8, 8\)"),
    ([_g(), _g(c=1)], ValueError, r"crops\[1\] must be a \(2, 3, H, W\)"),
    ([(_g() * 50).to(torch.uint8)], TypeError,
     r"crops\[0\] must be a floating-point tensor.*uint8"),
    ([_g(), _g().long()], TypeError, r"crops\[1\] must be a floating-point tensor"),
    ([_g(), "images"], TypeError, r"crops\[1\] must be a torch.Tensor"),
    ([_g(b=0)], ValueError, r"crops\[0\] must be a \(B, C, H, W\) tensor with B >= 1"),
    ([_g(), _g(device="meta")], ValueError, r"crops\[1\] is on meta but crops\[0\] on cpu"),
    ([_g(device="meta")], ValueError,
     r"crops\[0\] is on meta but the backbone's parameters are on cpu"),
])
def test_wrapper_checks_every_crop_before_running_the_backbone(crops, error, match):
    backbone = RecordingBackbone()
    with pytest.raises(error, match=match):
        MultiCropWrapper(backbone, nn.Identity())(crops)
    assert backbone.calls == []  # nothing ran


def test_wrapper_checks_the_channels_the_vit_takes():
    wrapper = MultiCropWrapper(tiny_vit(depth=1), nn.Identity())
    with pytest.raises(ValueError, match=r"crops\[0\] must be a \(B, 3, H, W\) tensor.*"
                                         r"\(2, 4, 16, 16\)"):
        wrapper([_g(c=4)])
    conv = MultiCropWrapper(tiny_vit(depth=1, patch_embed="conv"), nn.Identity())
    with pytest.raises(ValueError, match=r"crops\[0\] must be a \(B, 3, H, W\)"):
        conv([_g(c=1)])
    assert conv([_g(), _g()]).shape == (4, 32)


def test_wrapper_checks_n_global_and_the_patch_selections_device():
    backbone = tiny_vit(depth=1, mask_token=True)
    wrapper = MultiCropWrapper(backbone, nn.Identity())
    g, select = [_g(), _g()], torch.zeros(4, 16, dtype=torch.bool)
    for n_global in (0, -1):
        with pytest.raises(ValueError, match="n_global must be >= 1"):
            wrapper(g, patch_select=select, n_global=n_global)
    with pytest.raises(TypeError, match="n_global must be an integer"):
        wrapper(g, structured=True, n_global=2.0)
    with pytest.raises(ValueError, match=r"n_global must be in \[1, 2\].*got 3"):
        wrapper(g, patch_select=select, n_global=3)
    with pytest.raises(ValueError, match=r"n_global must be in \[1, 2\].*got 3"):
        wrapper(g, structured=True, n_global=3)  # global_features only
    with pytest.raises(ValueError, match=r"the n_global=2 global crops must have one resolution"
                                         r".*crops\[1\] \(8, 8\)"):
        wrapper([_g(), _g(size=8)], patch_select=select)
    with pytest.raises(ValueError, match="patch_select is on meta but the crops on cpu"):
        wrapper(g, patch_select=select.to("meta"))
    with pytest.raises(ValueError, match="masks is on meta but the crops on cpu"):
        wrapper(g, masks=select.to("meta"))
    with pytest.raises(TypeError, match="patch_select must be a torch.Tensor, got list"):
        wrapper(g, patch_select=[0, 1])
    # n_global only matters for a structured output; the plain call ignores it, as before
    assert wrapper(g, n_global=0).shape == (4, 32)
    out = wrapper(g + [_g(size=8)], patch_select=select[:2], n_global=1)
    assert out.global_features.shape == (2, 32) and out.patch_logits.shape == (0, 32)


def test_vit_wrapper_and_head_give_one_row_per_crop_sample():
    vit = tiny_vit().eval()
    wrapper = MultiCropWrapper(vit, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))
    crops = [torch.randn(3, 3, 16, 16) for _ in range(2)] + [torch.randn(3, 3, 8, 8)
                                                               for _ in range(4)]
    out = wrapper(crops)
    assert out.shape == (6 * 3, 64) and out.dtype == torch.float32
    # row block v is crop v: the teacher (global crops only) gives the first 2B rows
    torch.testing.assert_close(wrapper(crops[:2]), out[:6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wrapper(crops[4]), out[12:15], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ attention

def reference_attention(vit, images):
    """(B, H, N, N) softmax attention of the last block, via torch's multi-head attention."""
    captured = {}
    handle = vit.blocks[-1].norm1.register_forward_hook(
        lambda m, i, o: captured.setdefault("y", o))
    vit(images)
    handle.remove()
    y = captured["y"].transpose(0, 1)  # (N, B, D)
    attn = vit.blocks[-1].attn
    _, weights = F.multi_head_attention_forward(
        y, y, y, vit.embed_dim, attn.num_heads, attn.qkv.weight, attn.qkv.bias, None, None,
        False, 0.0, attn.proj.weight, attn.proj.bias, training=False, need_weights=True,
        average_attn_weights=False)
    return weights


@pytest.mark.parametrize("reg_tokens,size", [(0, 16), (0, 12), (3, 8)])
def test_last_selfattention_is_the_cls_row_of_the_last_block_over_patches(reg_tokens, size):
    vit = tiny_vit(reg_tokens=reg_tokens).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        attn, grid = last_selfattention(vit, images)
        ref = reference_attention(vit, images)
    prefix = 1 + reg_tokens
    assert grid == (size // 4, size // 4)
    assert attn.shape == (2, 2, grid[0] * grid[1])
    torch.testing.assert_close(attn, ref[:, :, 0, prefix:], rtol=1e-5, atol=1e-6)
    sums = attn.sum(-1)
    assert (sums <= 1 + 1e-6).all() and (sums < 1).all()  # CLS and registers take the rest
    torch.testing.assert_close(sums + ref[:, :, 0, :prefix].sum(-1), torch.ones(2, 2))
    assert attn.reshape(2, 2, *grid).shape == (2, 2, size // 4, size // 4)


def test_last_selfattention_accepts_a_wrapper_and_rejects_other_modules():
    vit = tiny_vit().eval()
    images = torch.randn(1, 3, 16, 16)
    wrapper = MultiCropWrapper(vit, nn.Identity())
    torch.testing.assert_close(last_selfattention(wrapper, images)[0],
                               last_selfattention(vit, images)[0])
    with pytest.raises(TypeError, match="VisionTransformer"):
        last_selfattention(nn.Linear(3, 3), images)


def test_last_selfattention_checks_the_images_and_the_blocks():
    vit = tiny_vit(depth=1).eval()
    with pytest.raises(TypeError, match="images must be a floating-point tensor.*uint8"):
        last_selfattention(vit, torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images must be a \(B, 3, H, W\) tensor, got shape "
                                         r"\(1, 1, 16, 16\)"):
        last_selfattention(vit, torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"images must be a \(B, 3, H, W\)"):
        last_selfattention(vit, torch.randn(3, 16, 16))
    vit.blocks = nn.Sequential()  # a block-less ViT (build_vit refuses depth=0)
    with pytest.raises(ValueError, match="no transformer block"):
        last_selfattention(vit, torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------------------------ checkpoints

def official_checkpoint(student, teacher):
    """A main_dino.py checkpoint: DDP student (`module.` keys), plain teacher, args, optimizer."""
    return {
        "student": {f"module.{k}": v.clone() for k, v in student.state_dict().items()},
        "teacher": {k: v.clone() for k, v in teacher.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=4, out_dim=64),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


def make_pair(seed):
    torch.manual_seed(seed)
    head_args = dict(hidden_dim=32, bottleneck_dim=16)
    student = MultiCropWrapper(tiny_vit(depth=1), DINOHead(32, 64, **head_args))
    teacher = MultiCropWrapper(tiny_vit(depth=1), DINOHead(32, 64, **head_args))
    return student, teacher


def test_our_keys_are_the_official_keys():
    student, _ = make_pair(0)
    official = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        official |= {f"blocks.0.{part}.weight", f"blocks.0.{part}.bias"}
    official = {f"backbone.{k}" for k in official}
    official |= {f"head.mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    official |= {"head.last_layer.weight_g", "head.last_layer.weight_v"}
    assert set(student.state_dict()) == official


def test_official_checkpoint_round_trip_into_wrapper_backbone_and_head(tmp_path):
    student, teacher = make_pair(0)
    path = tmp_path / "checkpoint.pth"
    torch.save(official_checkpoint(student, teacher), path)
    assert "module.backbone.blocks.0.attn.qkv.weight" in torch.load(path, weights_only=False)[
        "student"]

    new_student, new_teacher = make_pair(1)
    load_official_checkpoint(new_student, path, key="student")
    load_official_checkpoint(new_teacher, path)  # default entry: the teacher
    for new, old in ((new_student, student), (new_teacher, teacher)):
        for (k, a), b in zip(new.state_dict().items(), old.state_dict().values()):
            assert torch.equal(a, b), k

    vit = tiny_vit(depth=1)
    result = load_official_checkpoint(vit, path, key="student")  # head keys left out
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(vit.blocks[0].attn.qkv.weight, student.backbone.blocks[0].attn.qkv.weight)
    head = DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)
    load_official_checkpoint(head, path, key="student")
    assert torch.equal(head.last_layer.weight_v, student.head.last_layer.weight_v)
    images = [torch.randn(2, 3, 16, 16)] * 2
    student.eval(), new_student.eval()
    torch.testing.assert_close(new_student(images), student(images))


def test_released_backbone_weights_load_and_resample_pos_embed():
    torch.manual_seed(0)
    source = tiny_vit(depth=1)  # stored at 16 px: a 4x4 grid
    released = {k: v.clone() for k, v in source.state_dict().items()}  # no prefix at all
    target = tiny_vit(depth=1, img_size=32)  # an 8x8 grid
    load_official_checkpoint(target, released)
    assert target.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(target.pos_embed[:, 0], source.pos_embed[:, 0])  # CLS kept
    assert torch.equal(target.blocks[0].mlp.fc2.weight, source.blocks[0].mlp.fc2.weight)


def test_checkpoint_errors_name_the_problem(tmp_path):
    vit = tiny_vit(depth=1)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_checkpoint(vit, tmp_path / "missing.pth")
    student, teacher = make_pair(0)
    ckpt = official_checkpoint(student, teacher)
    with pytest.raises(KeyError, match="'model_ema'"):
        load_official_checkpoint(vit, ckpt, key="model_ema")
    with pytest.raises(ValueError, match="no key"):
        load_official_checkpoint(vit, {"something.else": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_official_checkpoint(tiny_vit(depth=1, embed_dim=64), ckpt)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_official_checkpoint(tiny_vit(depth=2), ckpt)  # a deeper model than the checkpoint
    with pytest.raises(ValueError, match="holds a linear patch embedding but the ViT has a conv "
                                         "one.*--patch_embed linear"):
        load_official_checkpoint(tiny_vit(depth=1, patch_embed="conv"), ckpt)
    conv = tiny_vit(depth=1, patch_embed="conv")
    with pytest.raises(ValueError, match="holds a conv patch embedding.*--patch_embed conv"):
        load_official_checkpoint(tiny_vit(depth=1), {"model": conv.state_dict()}, key="model")


# ------------------------------------------------------------------------------------ compile

def test_compiled_student_matches_eager_with_one_graph_per_resolution():
    """Three training steps with two crop resolutions: outputs and gradients agree with eager,
    and dynamo compiled exactly two frames (no recompilation). The aot_eager backend traces
    forward and backward as inductor does, without the minute of C++ compilation on CPU;
    inductor's code is checked in the next test."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MultiCropWrapper(tiny_vit(depth=1),
                             DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8))
    compiled = MultiCropWrapper(tiny_vit(depth=1), DINOHead(32, 16, hidden_dim=32,
                                                            bottleneck_dim=8))
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    assert compile_backbone(compiled, backend=counter) is compiled
    assert list(compiled.state_dict()) == keys  # no `_orig_mod.` in the names
    for _ in range(3):
        crops = [torch.randn(2, 3, 16, 16) for _ in range(2)] + [torch.randn(2, 3, 8, 8)
                                                                  for _ in range(2)]
        out_c, out_e = compiled(crops), eager(crops)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
        out_c.square().sum().backward()
        out_e.square().sum().backward()
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert counter.frame_count == 2


@pytest.mark.slow
def test_inductor_compiled_backbone_matches_eager():
    """The default backend (inductor, C++ on CPU): one resolution, tiny model, no gradient, so a
    single graph is compiled (about half a minute on 2 busy cores with a cold cache)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    vit = tiny_vit(depth=1).eval()
    compiled = tiny_vit(depth=1).eval()
    compiled.load_state_dict(vit.state_dict())
    counter = CompileCounterWithBackend("inductor")
    compile_backbone(compiled, backend=counter)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(4, 3, 16, 16)
            torch.testing.assert_close(compiled(x), vit(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_compiled_teacher_on_global_crops_compiles_once():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    teacher = MultiCropWrapper(tiny_vit(depth=1), nn.Identity())
    counter = CompileCounter()
    compile_backbone(teacher, backend=counter)
    with torch.no_grad():
        for _ in range(4):
            out = teacher([torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)])
    assert out.shape == (6, 32)
    assert counter.frame_count == 1
    # the eager escape hatch for other batch sizes does not compile
    teacher.backbone.forward(torch.randn(5, 3, 16, 16))
    assert counter.frame_count == 1
    # static graphs (dynamic=False): every new batch size is its own graph, where automatic
    # dynamic shapes would have reused one symbolic graph from the third size on
    with torch.no_grad():
        teacher([torch.randn(4, 3, 16, 16)])
        teacher([torch.randn(7, 3, 16, 16)])
    assert counter.frame_count == 3
