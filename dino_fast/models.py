"""Backbones and wrappers: timm Vision Transformers with the official DINO settings, the multi-crop
wrapper, `torch.compile` of the backbone, `unwrap_model` and last-block attention maps.

The timm `VisionTransformer` has the same parameter names as the official DINO ViT
(`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}.*`, `norm.*`), so official checkpoints load without renaming. Differences from
the official ViT, none of which changes a key: the position embeddings of another resolution are
resampled by timm (bicubic, antialiased when shrinking) instead of the official bicubic
`scale_factor` interpolation, and the attention runs fused (scaled_dot_product_attention),
except for bf16 on the CPU on short sequences, where the explicit softmax is faster
(`Attention`).
Official checkpoints load with `dino_fast.checkpoint.load_official_checkpoint`.
"""
from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple, Optional, Union

import torch
from timm.layers import PatchEmbed, to_2tuple
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dino_fast.checks import check_floating_tensor, check_int

# (embed_dim, depth, num_heads) of the official DINO ViTs; mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6
VIT_ARCHS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}

# Arguments build_vit fixes because the rest of the library relies on them: the CLS token is the
# output feature (B, embed_dim) and any crop size runs (position embeddings resampled).
_FIXED_VIT_ARGS = {"num_classes": 0, "global_pool": "token", "class_token": True,
                   "dynamic_img_size": True}


PATCH_EMBEDS = ("linear", "conv")


def check_vit_args(arch: str, patch_size: int, img_size: int, drop_path_rate: float = 0.0,
                   embed_dim: int = 0, num_heads: int = 0,
                   names: Optional[Mapping[str, str]] = None, patch_embed: str = "linear",
                   mlp_ratio: float = 4.0) -> None:
    """Raise ValueError unless `build_vit` can build this ViT.

    Args:
        arch, patch_size, img_size, drop_path_rate, patch_embed: as `build_vit`.
        mlp_ratio: the blocks' MLP width over embed_dim (4 in every official ViT).
        embed_dim, num_heads: the overrides; 0 keeps the architecture's own.
        names: how the messages name each argument (the training script passes its flags,
            e.g. {"img_size": "--image_size"}); by default the argument names.
    """
    def n(name: str) -> str:
        return (names or {}).get(name, name)

    if arch not in VIT_ARCHS:
        raise ValueError(f"{n('arch')} must be one of {sorted(VIT_ARCHS)}, got {arch!r}")
    for name, value in (("patch_size", patch_size), ("img_size", img_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{n(name)} must be a positive integer, got {value!r}")
    if img_size % patch_size:
        raise ValueError(f"{n('img_size')}={img_size} must be a multiple of "
                         f"{n('patch_size')}={patch_size}")
    if patch_embed not in PATCH_EMBEDS:
        raise ValueError(f"{n('patch_embed')} must be one of {PATCH_EMBEDS}, got {patch_embed!r}")
    if patch_embed == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
        raise ValueError(f"{n('patch_embed')}=conv needs {n('patch_size')} a power of two (one "
                         f"stride-2 convolution per halving), got {patch_size}")
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"{n('drop_path_rate')} must be in [0, 1), got {drop_path_rate!r}")
    width = embed_dim or VIT_ARCHS[arch][0]
    heads = num_heads or VIT_ARCHS[arch][2]
    if width % heads:
        raise ValueError(f"{n('embed_dim')}={width} must be a multiple of "
                         f"{n('num_heads')}={heads}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or \
            not math.isfinite(mlp_ratio) or int(width * mlp_ratio) < 1:
        raise ValueError(f"{n('mlp_ratio')} must be a positive number with {n('embed_dim')} x "
                         f"{n('mlp_ratio')} >= 1 (the blocks' MLP width), got {mlp_ratio!r}")


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with its one-layer patchify (a patch_size-strided convolution) replaced
    by a convolutional stem, after Xiao et al. 2021 ("Early convolutions help transformers see
    better"): log2(patch_size) 3x3 stride-2 convolutions, each followed by a GELU, their widths
    doubling up to embed_dim (embed_dim / 4, / 2, 1 for patch 8), then a 1x1 convolution. Same
    token grid and output as PatchEmbed at any input size that patch_size divides; no
    normalisation layer, so no running statistics for the teacher to track. The module keys are
    `patch_embed.proj.{0,2,4,...}.*` (official DINO checkpoints hold a linear patch embedding)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.patch_size[0]
        if self.patch_size[1] != p or p < 2 or p & (p - 1):
            raise ValueError(f"the convolutional stem needs a square patch whose side is a power "
                             f"of two, got {self.patch_size}")
        halvings = p.bit_length() - 1
        width, channels = self.proj.out_channels, self.proj.in_channels
        bias = self.proj.bias is not None
        layers = []
        for i in range(halvings):
            out = max(1, width >> (halvings - 1 - i))
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=bias), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1, bias=bias))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On the CPU the convolutions run faster on channels-last images (oneDNN's own layout:
        # no reorder around each layer); the tokens (B, h, w, D) are then a view.
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's: a new image size re-derives the token grid. The stem's depth is fixed by its
        patch size, so unlike a patchify layer it cannot be resampled to another one."""
        if patch_size is not None and tuple(to_2tuple(patch_size)) != tuple(self.patch_size):
            raise ValueError(f"patch_size: the convolutional stem has {len(self.proj) // 2} "
                             f"stride-2 layers for patches of {self.patch_size[0]}; it cannot "
                             f"change to {patch_size} (build a model with that --patch_size)")
        super().set_input_size(img_size=img_size)


# Below these sequence lengths the explicit attention beats F.scaled_dot_product_attention for
# bf16 on the CPU: forward and backward on a 2-core AMD EPYC VM (torch 2.14.1, bf16, heads of
# 32), 128 x 3 heads x 17 tokens: 2.6 vs 21 ms; 5 tokens: 3.4 vs 12 ms; 65 tokens: 22 vs 56 ms;
# 129 tokens: 35 vs 65 ms; 197 tokens (heads of 64): 83 vs 103 ms. Forward only the explicit form
# wins up to 37 tokens (2.7 vs 3.3 ms) and loses from 65 (9.2 vs 5.9 ms); at 785 tokens the fused
# kernel wins both ways. A width-96 ViT/8 (4 blocks, conv stem) at 32 px, batch 64, forward and
# backward under bf16 autocast: 36.6 vs 72-74 ms. fp16 on the CPU is slow either way (about
# 0.7 s for that step, no difference measured); in fp32 and on CUDA the fused kernel is used at
# every length.
EXPLICIT_ATTENTION_MAX_TOKENS = 48
EXPLICIT_ATTENTION_MAX_TOKENS_WITH_GRAD = 256


def explicit_attention_faster(q: torch.Tensor) -> bool:
    """Whether `Attention` computes softmax(q k^T / sqrt(d)) v explicitly for this query tensor
    (B, heads, N, head_dim) instead of calling F.scaled_dot_product_attention: only bf16 on the
    CPU, where the fused kernel (above all its backward) is several times slower on short
    sequences; see EXPLICIT_ATTENTION_MAX_TOKENS(_WITH_GRAD)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    limit = (EXPLICIT_ATTENTION_MAX_TOKENS_WITH_GRAD if torch.is_grad_enabled() and q.requires_grad
             else EXPLICIT_ATTENTION_MAX_TOKENS)
    return q.shape[-2] <= limit


class Attention(nn.Module):
    """timm's multi-head self-attention (the same submodules, parameters and keys: `qkv`, `proj`)
    that picks its kernel per call: F.scaled_dot_product_attention, or the explicit
    softmax(q k^T / sqrt(d)) v with the softmax in fp32 where that is faster
    (`explicit_attention_faster`: bf16 on the CPU, short sequences). Both compute the same
    function; `build_vit` puts it in every block in place of timm's, taking over that module's
    layers (so the initialisation is timm's). Attention masks and causal attention go to the
    fused kernel."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop

    @staticmethod
    def replaces(attn: nn.Module) -> bool:
        """Whether `attn` (a timm Attention) computes exactly what this module computes: no
        normalisation of q, k or the output and no gate (timm's defaults, and DINO's ViT)."""
        plain = (nn.Identity, type(None))
        return (all(hasattr(attn, a) for a in ("num_heads", "head_dim", "scale", "qkv", "q_norm",
                                                "k_norm", "attn_drop", "proj", "proj_drop"))
                and isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
                and isinstance(getattr(attn, "norm", None), plain)
                and getattr(attn, "gate", None) is None
                and attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is None and not is_causal and explicit_attention_faster(q):
            scores = (q * self.scale) @ k.transpose(-2, -1)
            probs = self.attn_drop(torch.softmax(
                scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)))
            x = probs.to(v.dtype) @ v
        else:
            x = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class TokenVisionTransformer(VisionTransformer):
    """timm's VisionTransformer (same parameters and keys) with DINOv2's two additions: an
    optional learnable `mask_token` that replaces the embeddings of masked patches before the
    blocks, and the final-norm patch tokens as a second output.

    forward(x) is timm's: (B, embed_dim) CLS features. forward(x, masks=None,
    return_patch_tokens=True) returns (cls (B, D), patch_tokens (B, h*w, D)), patches in
    row-major order; `masks` (B, h*w) bool (True = masked) needs the mask token. The mask token
    is a (1, D) parameter initialised to zeros, as DINOv2's; it is added to the state dict (key
    `mask_token`) only when built with `mask_token=True`, so official DINO checkpoints still load
    into the ViT without one.
    """

    def __init__(self, *args, mask_token: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        else:
            self.register_parameter("mask_token", None)

    def forward(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None,
                return_patch_tokens: bool = False):
        if masks is None and not return_patch_tokens:
            return super().forward(x)
        tokens = self.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, h*w, D)
        if masks is not None:
            tokens = self._masked(tokens, masks)
        x = self.norm(self.blocks(self.norm_pre(self.patch_drop(self._pos_embed(tokens)))))
        cls = self.forward_head(x)
        return (cls, x[:, self.num_prefix_tokens:]) if return_patch_tokens else cls

    def _masked(self, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            raise ValueError("masks were given but this ViT has no mask token: build it with "
                             "build_vit(..., mask_token=True)")
        n_patches = tokens.shape[1:-1].numel()
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or \
                tuple(masks.shape) != (tokens.shape[0], n_patches):
            raise ValueError(f"masks must be a bool tensor of shape (images, patches) = "
                             f"({tokens.shape[0]}, {n_patches}) for these images, got "
                             + (f"{masks.dtype} {tuple(masks.shape)}"
                                if isinstance(masks, torch.Tensor) else type(masks).__name__))
        if masks.device != tokens.device:
            raise ValueError(f"masks are on {masks.device} but the images on {tokens.device}")
        token = self.mask_token.to(tokens.dtype).view(*[1] * (tokens.dim() - 1), -1)
        return torch.where(masks.view(*tokens.shape[:-1], 1), token, tokens)


def build_vit(arch: str = "vit_small", patch_size: int = 16, img_size: int = 224,
              drop_path_rate: float = 0.0, mask_token: bool = False, patch_embed: str = "linear",
              **overrides) -> nn.Module:
    """A timm VisionTransformer with the official DINO settings, randomly initialised.

    Args:
        arch: "vit_tiny" | "vit_small" | "vit_base" (the official names; 192/384/768 wide, 12
            deep).
        patch_size: 16 or 8 as the official models, or any size dividing img_size (e.g. 4 for
            32 px).
        img_size: the resolution the position embeddings are stored at (the global crop size);
            other sizes (the local crops) resample them on the fly (timm `dynamic_img_size`).
        drop_path_rate: stochastic depth, linearly increasing over the blocks (0.1 for the
            student).
        mask_token: add DINOv2's learnable mask token (for the iBOT masked-patch loss; see
            `TokenVisionTransformer`).
        patch_embed: "linear", the official ViT's patchify layer, or "conv", a small
            convolutional stem with the same token grid (`ConvStemPatchEmbed`; patch_size a
            power of two), for small images and short schedules.
        overrides: other VisionTransformer arguments, e.g. depth=2 (at least 1), embed_dim=64,
            num_heads=2 for a quick CPU model, mlp_ratio=2 (the blocks' MLP width over
            embed_dim; 4 in every official ViT), or reg_tokens=4. num_classes, global_pool,
            class_token and dynamic_img_size are fixed, and nothing is ever downloaded (no
            `pretrained`; use `dino_fast.checkpoint.load_official_checkpoint`).

    Returns:
        A `TokenVisionTransformer` (a timm VisionTransformer): forward(images (B, 3, H, W)) ->
        (B, embed_dim), the final-norm CLS token; forward(images, masks, return_patch_tokens=True)
        also gives the patch tokens. It
        exposes `.embed_dim`, `.num_prefix_tokens` (CLS + registers) and
        `.patch_embed.patch_size`. Initialisation as the official ViT: truncated-normal (std
        0.02) Linear weights, pos_embed and cls_token, zero biases, LayerNorm 1/0.

    Example:
        >>> vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=2)
        >>> vit(torch.randn(4, 3, 32, 32)).shape, vit(torch.randn(4, 3, 16, 16)).shape
        (torch.Size([4, 192]), torch.Size([4, 192]))
    """
    from timm.layers import LayerNorm

    check_vit_args(arch, patch_size, img_size, drop_path_rate,
                   overrides.get("embed_dim", 0), overrides.get("num_heads", 0),
                   patch_embed=patch_embed, mlp_ratio=overrides.get("mlp_ratio", 4.0))
    if "pretrained" in overrides:
        raise ValueError("build_vit never downloads weights (no `pretrained`); build the model and "
                         "call dino_fast.checkpoint.load_official_checkpoint(model, path) instead")
    fixed = sorted(set(overrides) & set(_FIXED_VIT_ARGS))
    if fixed:
        raise ValueError(f"build_vit fixes {fixed} (the CLS token is the output feature and any "
                         f"crop size runs); got overrides {fixed}")
    if "depth" in overrides:
        # no block: the CLS token never sees a patch, so the feature would not depend on the image
        # (the training script's --depth 0, "the architecture's depth", never reaches build_vit)
        overrides["depth"] = check_int(overrides["depth"], "depth", 1)
    embed_dim, depth, num_heads = VIT_ARCHS[arch]
    kwargs = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                  num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(LayerNorm, eps=1e-6), drop_path_rate=float(drop_path_rate))
    if patch_embed == "conv":
        kwargs["embed_layer"] = ConvStemPatchEmbed
    kwargs.update(overrides)
    kwargs.update(_FIXED_VIT_ARGS)
    vit = TokenVisionTransformer(mask_token=mask_token, **kwargs)
    for block in vit.blocks:
        if Attention.replaces(getattr(block, "attn", None)):
            block.attn = Attention(block.attn)
    # timm initialises the CLS token with std 1e-6; the official ViT uses the truncated normal
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    return vit


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under any nesting of DistributedDataParallel / DataParallel (`.module`) and
    torch.compile (`OptimizedModule._orig_mod`) wrappers: the one whose state_dict keys carry no
    `module.` or `_orig_mod.` prefix.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(torch.compile(net)) is net
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    # An OptimizedModule can only exist once torch._dynamo was imported: no import cost otherwise.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def _in_channels(backbone: nn.Module) -> Optional[int]:
    """The image channels the patch embedding of a `build_vit` backbone takes (its first
    convolution's), or None for a backbone without one."""
    proj = getattr(getattr(unwrap_model(backbone), "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Sequential) and len(proj):
        proj = proj[0]  # the convolutional stem
    return proj.in_channels if isinstance(proj, nn.Conv2d) else None


def _unwrap_vit(vit: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside a MultiCropWrapper or a torch.compile wrapper."""
    vit = unwrap_model(vit)
    if isinstance(vit, MultiCropWrapper):
        vit = unwrap_model(vit.backbone)
    for attr in ("patch_embed", "_pos_embed", "blocks", "num_prefix_tokens"):
        if not hasattr(vit, attr):
            raise TypeError(f"expected a timm VisionTransformer (as build_vit returns), got "
                            f"{type(vit).__name__} without `{attr}`")
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("the ViT has no CLS token, so it has no CLS attention map")
    return vit


def last_selfattention(vit: nn.Module, images: torch.Tensor
                       ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Softmax attention of the CLS token to every patch, per head, in the last block.

    Args:
        vit: a ViT from `build_vit` (or a MultiCropWrapper around one, compiled or not).
        images: (B, 3, H, W) floating point, H and W multiples of the patch size.

    Returns:
        (attn, (h, w)): attn (B, num_heads, h*w) in the compute dtype, patches in row-major
        order, so `attn.reshape(B, num_heads, h, w)` is the map. The softmax runs over all tokens
        (CLS, registers, patches) as in the forward pass and only the patch columns are
        returned, so each row sums to at most 1 (the rest is the CLS and register tokens' share).

    Example:
        >>> vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=2).eval()
        >>> with torch.no_grad():
        ...     attn, (h, w) = last_selfattention(vit, torch.randn(1, 3, 32, 32))
        >>> attn.shape, (h, w)
        (torch.Size([1, 3, 16]), (4, 4))

    Fused attention never forms the probabilities, so the blocks before the last run as usual and
    the last block's q (CLS row only) and k are recomputed explicitly. Runs in the current grad
    mode and train/eval mode: wrap in torch.no_grad() and call vit.eval() for visualisation.
    """
    vit = _unwrap_vit(vit)
    check_floating_tensor(images, "images")
    channels = _in_channels(vit)
    if images.dim() != 4 or (channels is not None and images.shape[1] != channels):
        raise ValueError(f"images must be a (B, {channels or 'C'}, H, W) tensor, got shape "
                         f"{tuple(images.shape)}")
    if len(vit.blocks) == 0:
        raise ValueError("the ViT has no transformer block, so it has no last-block attention")
    x = vit.patch_embed(images)
    grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(vit.patch_embed.grid_size)  # NHWC
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    attn = last.attn
    y = last.norm1(x)
    B, N, _ = y.shape
    H, Dh = attn.num_heads, attn.head_dim
    qkv = attn.qkv(y).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    q = attn.q_norm(qkv[0, :, :, :1])  # the CLS query only; it is token 0
    k = attn.k_norm(qkv[1])
    probs = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (B, H, 1, N)
    return probs[:, :, 0, vit.num_prefix_tokens:], (int(grid[0]), int(grid[1]))


class MultiCropOutput(NamedTuple):
    """What `MultiCropWrapper` returns when asked for more than the CLS logits.

    logits: (sum_v B, out_dim) head outputs of every crop's CLS token, crop-major.
    global_features: (n_global * B, embed_dim) backbone CLS features of the global crops (the
        first n_global crops), e.g. for KoLeo.
    patch_logits: (M, patch_out_dim) head outputs (the iBOT head's, or the shared head's) of the
        M selected patch tokens of the global crops, in the order of `select[select]`; None when
        no patches were selected.
    """
    logits: torch.Tensor
    global_features: torch.Tensor
    patch_logits: Optional[torch.Tensor]


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crop batches of different resolutions (official wrapper),
    with DINOv2's masked patch tokens as an option.

    forward(crops): crops is a list of (B, 3, h_v, w_v) tensors, crop-major (crops 0 and 1 the
    global ones); a single tensor is treated as a one-element list. The backbone runs once per
    run of consecutive crops with the same (h, w) on their concatenation, the features are
    concatenated and the head runs once. Returns (sum_v B, out_dim) with rows v*B..(v+1)*B-1 for
    crop v: the loss's crop-major layout. A backbone returning a tuple contributes its first item.

    forward(crops, masks=..., patch_select=..., structured=True) returns a `MultiCropOutput`.
    The global crops are the first `n_global` crops (n_global * B images, of one resolution):
    - masks (n_global * B, h*w) bool: their masked patches take the backbone's mask token (the
      student's input in DINOv2); the masked patch tokens are then also the selected ones;
    - patch_select (n_global * B, h*w) bool: which of their patch tokens (unmasked input: the
      teacher's) go through the patch head; or the same as (M,) int64 positions in the
      flattened (n_global * B * h*w) grid (`MaskBatch.indices`), which selects without the host
      sync of a boolean index on a GPU; with masks given too, it selects instead of them;
    the selected patch tokens go through `ibot_head` when the wrapper has one, else through
    `head` in the same call as the CLS tokens (DINOv2's shared head). The backbone must accept
    `masks=` and `return_patch_tokens=` (`build_vit`'s does).

    As the official wrapper, a Linear `fc` or `head` attribute of the backbone (a classifier) is
    replaced by nn.Identity, so the backbone outputs features.

    Args:
        backbone: images (B, 3, h, w) -> features (B, D), e.g. from `build_vit`.
        head: features (N, D) -> logits (N, out_dim), e.g. a `DINOHead`.
        ibot_head: an optional separate head for the patch tokens (DINOv2's `ibot_head`).

    Example:
        >>> from dino_fast.head import DINOHead
        >>> net = MultiCropWrapper(build_vit("vit_tiny", patch_size=8, img_size=32, depth=1),
        ...                        DINOHead(192, 1024))
        >>> crops = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 6
        >>> net(crops).shape
        torch.Size([32, 1024])
        >>> select = torch.zeros(8, 16, dtype=torch.bool); select[:, :3] = True
        >>> out = net(crops, patch_select=select)             # 24 patch tokens through the head
        >>> out.logits.shape, out.global_features.shape, out.patch_logits.shape
        (torch.Size([32, 1024]), torch.Size([8, 192]), torch.Size([24, 1024]))
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, ibot_head: Optional[nn.Module] = None):
        super().__init__()
        for name in ("fc", "head"):
            if isinstance(getattr(backbone, name, None), nn.Linear):
                setattr(backbone, name, nn.Identity())
        self.backbone = backbone
        self.head = head
        if ibot_head is not None:
            self.ibot_head = ibot_head

    def _check_crops(self, x) -> list:
        """The crops as a list, each checked against the first: a (B, C, H, W) floating-point
        tensor with the same B (the output rows are crop-major), the channels the backbone takes
        and the same device, the backbone's. Shapes, dtypes and devices only: no host sync, and
        it runs in eager Python outside the compiled backbone."""
        if isinstance(x, torch.Tensor):
            x = [x]
        if not isinstance(x, (list, tuple)) or len(x) == 0:
            raise TypeError(f"MultiCropWrapper expects a tensor or a non-empty list of crop "
                            f"batches, got {type(x).__name__}")
        first = x[0]
        check_floating_tensor(first, "crops[0]")
        channels = _in_channels(self.backbone)
        if first.dim() != 4 or first.shape[0] == 0 or \
                (channels is not None and first.shape[1] != channels):
            raise ValueError(f"crops[0] must be a (B, {channels or 'C'}, H, W) tensor with B >= 1"
                             f", got shape {tuple(first.shape)}")
        batch, channels, device = first.shape[0], first.shape[1], first.device
        param = next(self.backbone.parameters(), None)
        if param is not None and param.device != device:
            raise ValueError(f"crops[0] is on {device} but the backbone's parameters are on "
                             f"{param.device}")
        for v in range(1, len(x)):
            crop = x[v]
            check_floating_tensor(crop, f"crops[{v}]")
            if crop.dim() != 4 or crop.shape[0] != batch or crop.shape[1] != channels:
                raise ValueError(f"crops[{v}] must be a ({batch}, {channels}, H, W) tensor as "
                                 f"crops[0] (the same images, crop-major), got shape "
                                 f"{tuple(crop.shape)}")
            if crop.device != device:
                raise ValueError(f"crops[{v}] is on {crop.device} but crops[0] on {device}")
        return list(x)

    @staticmethod
    def _runs(crops: list) -> list[tuple[int, int]]:
        """[start, end) of each run of consecutive crops with the same resolution."""
        runs, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            runs.append((start, end))
            start = end
        return runs

    @staticmethod
    def _check_global(crops: list, runs: list, n_global, want_patches: bool,
                      masks: Optional[torch.Tensor], patch_select: Optional[torch.Tensor]) -> None:
        """1 <= n_global <= len(crops), the global crops of one resolution when their patch
        tokens are wanted, and masks / patch_select tensors on the crops' device (their shapes
        are checked against the patch tokens)."""
        n_global = check_int(n_global, "n_global", 1)
        if n_global > len(crops):
            raise ValueError(f"n_global must be in [1, {len(crops)}] (the global crops are the "
                             f"first n_global of the {len(crops)} crops), got {n_global}")
        if not want_patches:
            return
        end = runs[0][1]
        if n_global > end:
            raise ValueError(f"the n_global={n_global} global crops must have one resolution "
                             f"(their patch tokens are taken together), got crops[0] "
                             f"{tuple(crops[0].shape[-2:])} and crops[{end}] "
                             f"{tuple(crops[end].shape[-2:])}")
        device = crops[0].device
        for name, t in (("masks", masks), ("patch_select", patch_select)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but the crops on {device}")

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]],
                masks: Optional[torch.Tensor] = None, patch_select: Optional[torch.Tensor] = None,
                structured: bool = False, n_global: int = 2
                ) -> Union[torch.Tensor, MultiCropOutput]:
        crops = self._check_crops(x)
        runs = self._runs(crops)
        want_patches = masks is not None or patch_select is not None
        structured = structured or want_patches
        if structured:  # n_global says which rows are the global crops' features and patches
            self._check_global(crops, runs, n_global, want_patches, masks, patch_select)
        features, patch_tokens = [], None
        n_images = n_global * crops[0].shape[0]  # the global crops' images
        for i, (start, end) in enumerate(runs):
            batch = crops[start] if end - start == 1 else torch.cat(crops[start:end])
            if i == 0 and want_patches:
                # the global crops (local crops of the same size, if any, follow in the same
                # run: they get no mask and give no patch tokens)
                out, patch_tokens = self.backbone(batch[:n_images], masks=masks,
                                                  return_patch_tokens=True)
                features.append(out)
                if batch.shape[0] == n_images:
                    continue
                batch = batch[n_images:]
            out = self.backbone(batch)
            features.append(out[0] if isinstance(out, tuple) else out)
        cls = features[0] if len(features) == 1 else torch.cat(features)
        if not structured:
            return self.head(cls)
        select = patch_select if patch_select is not None else masks
        if select is None:
            return MultiCropOutput(self.head(cls), cls[:n_images], None)
        name = "patch_select" if patch_select is not None else "masks"
        if select.dtype == torch.int64 and select.dim() == 1:
            n = patch_tokens.shape[0] * patch_tokens.shape[1]
            if select.device.type == "cpu" and select.numel() and \
                    not (0 <= int(select.min()) and int(select.max()) < n):
                raise ValueError(f"{name} indices must lie in [0, {n}) (images x patches), got "
                                 f"{int(select.min())}..{int(select.max())}")
            selected = patch_tokens.flatten(0, 1).index_select(0, select)
        elif select.dtype == torch.bool and select.shape == patch_tokens.shape[:2]:
            selected = patch_tokens[select]
        else:
            raise ValueError(f"{name} must be a bool tensor of shape (images, patches) = "
                             f"{tuple(patch_tokens.shape[:2])} for the global crops (or int64 "
                             f"positions in its flattening), got {select.dtype} "
                             f"{tuple(select.shape)}")
        ibot_head = getattr(self, "ibot_head", None)
        if ibot_head is not None:
            return MultiCropOutput(self.head(cls), cls[:n_images], ibot_head(selected))
        both = self.head(torch.cat([cls, selected]))
        return MultiCropOutput(both[:cls.shape[0]], cls[:n_images], both[cls.shape[0]:])


def compile_backbone(module: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile the backbone in place with torch.compile; returns `module`.

    module: a MultiCropWrapper (its backbone is compiled, the head and the crop loop stay eager)
    or a backbone. Compilation uses `nn.Module.compile`, so parameter names and the state dict
    are unchanged (no `_orig_mod.` prefix) and the EMA and checkpoints see the same keys.
    compile_kwargs go to torch.compile; `dynamic` defaults to False: each crop resolution gets
    its own static graph (two for the student, one for the teacher), and later steps with the
    same shapes reuse them. A new batch size (keep drop_last=True) or a train/eval switch
    compiles another graph; for evaluation at other batch sizes call `backbone.forward(x)`,
    which bypasses the compiled call.
    """
    target = module.backbone if isinstance(module, MultiCropWrapper) else module
    compile_kwargs.setdefault("dynamic", False)
    target.compile(**compile_kwargs)
    return module
