"""Pictures of a training run (PNG): the loss / k-NN curves and last-layer attention maps.

Rendered with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dino_fast.data import IMAGENET_MEAN, IMAGENET_STD


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_training_curves(records: Sequence[dict], path) -> None:
    """Two panels from the JSON-lines log: the loss per logged step (and the epoch means), and the
    k-NN top-1 of the teacher per epoch (epoch 0 = before training)."""
    plt = _pyplot()
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    knn = [r for r in records if "knn_top1" in r]
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["it"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6,
                     label="logged steps")
    if epochs:
        ax_loss.plot([r["it"] for r in epochs], [r["loss"] for r in epochs], "o-",
                     label="epoch mean")
    terms = [t for t in ("dino_loss", "ibot_loss", "koleo_loss") if any(t in r for r in steps)]
    if len(terms) > 1:  # the DINOv2 recipe: each term of the loss, unweighted
        for term in terms:
            logged = [r for r in steps if term in r]
            ax_loss.plot([r["it"] for r in logged], [r[term] for r in logged], lw=0.8,
                         label=term.replace("_loss", ""))
    ax_loss.set(xlabel="iteration", ylabel="loss" if len(terms) > 1 else "DINO loss",
                title="training loss")
    ax_loss.grid(alpha=0.3)
    if steps or epochs:
        ax_loss.legend()
    if knn:
        ax_knn.plot([r["epochs_trained"] for r in knn], [r["knn_top1"] for r in knn], "o-",
                    color="C2")
        for r in knn:
            ax_knn.annotate(f"{r['knn_top1']:.1f}", (r["epochs_trained"], r["knn_top1"]),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax_knn.xaxis.get_major_locator().set_params(integer=True)
    ax_knn.set(xlabel="epoch (0 = before training)", ylabel="top-1 (%)",
               title="weighted 20-NN accuracy, teacher features")
    ax_knn.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def threshold_attention(attn: torch.Tensor, keep_mass: float = 0.6) -> torch.Tensor:
    """Boolean mask of the patches holding the top `keep_mass` of each map's attention mass.

    attn (..., P) non-negative. As the official visualisation: sort each map's values, normalise
    to sum 1, and keep the largest values whose cumulative share reaches `keep_mass`.
    """
    values, order = attn.sort(dim=-1)
    share = values / values.sum(dim=-1, keepdim=True)
    keep_sorted = share.cumsum(dim=-1) > (1 - keep_mass)
    return keep_sorted.gather(-1, order.argsort(dim=-1))


@torch.no_grad()
def save_attention_maps(backbone: torch.nn.Module, images: torch.Tensor, path,
                        mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, keep_mass: float = 0.6) -> None:
    """Save a PNG with one row per image: the image, then the CLS-token attention of each head of
    the last block, with the region holding `keep_mass` of the attention outlined (the official
    threshold: 0.6).

    Args:
        backbone: a ViT from `dino_fast.models.build_vit` (evaluated in eval mode, then restored).
        images: (B, 3, H, W), normalised with mean / std (un-normalised for display).
        path: the PNG file to write.
        mean, std: the normalisation statistics of `images` (ImageNet's by default).
        keep_mass: the share of each map's attention mass the outline encloses.
    """
    from dino_fast.models import last_selfattention

    plt = _pyplot()
    was_training = backbone.training
    backbone.eval()
    attn, (h, w) = last_selfattention(backbone, images)
    backbone.train(was_training)
    attn = attn.float().cpu()
    B, heads = attn.shape[:2]
    masks = threshold_attention(attn, keep_mass).reshape(B, heads, h, w)
    maps = attn.reshape(B, heads, h, w)
    pixels = images.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) \
        + torch.tensor(mean).view(1, 3, 1, 1)
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    H, W = images.shape[-2:]
    fig, axes = plt.subplots(B, heads + 1, figsize=(1.8 * (heads + 1), 1.8 * B), squeeze=False)
    extent = (0, W, H, 0)  # y grows downwards, as in the image
    # the kept region, upsampled to pixels and padded so that its outline closes at the border
    cell = np.ones((H // h, W // w))
    coords_x, coords_y = np.arange(W + 2) - 0.5, np.arange(H + 2) - 0.5  # pixel centres
    for b in range(B):
        axes[b, 0].imshow(pixels[b], extent=extent)
        for head in range(heads):
            ax = axes[b, head + 1]
            ax.imshow(maps[b, head].numpy(), cmap="inferno", interpolation="nearest",
                      extent=extent)
            kept = np.pad(np.kron(masks[b, head].numpy().astype(float), cell), 1)
            ax.contour(coords_x, coords_y, kept, levels=[0.5], colors="cyan", linewidths=1.0)
            ax.set_xlim(0, W)
            ax.set_ylim(H, 0)
            if b == 0:
                ax.set_title(f"head {head}", fontsize=9)
        if b == 0:
            axes[b, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"last-layer CLS attention; outline: top {keep_mass:.0%} of the attention mass",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(Path(path), dpi=100)
    plt.close(fig)
