"""Weighted k-nearest-neighbour evaluation of frozen features, as the official DINO `eval_knn`.

Every training image and every test image goes through the backbone once (CLS feature), features
are L2-normalised, and each test image is classified by its k most cosine-similar training
images, each voting for its label with weight exp(similarity / T). Defaults k = 20, T = 0.07.

Runs inside training (teacher features, every `--knn_freq` epochs and at the end) and on its own:

    python -m dino_fast.knn --checkpoint out/checkpoint.pth [--data_path DIR] [--key teacher]
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dino_fast import distributed
from dino_fast.builders import build_backbone, build_knn_datasets
from dino_fast.checkpoint import load_checkpoint
from dino_fast.train_args import train_args_from_checkpoint


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
                     num_workers: int = 0, device: torch.device = torch.device("cpu"),
                     amp_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) fp32 and labels (N,) int64 of a dataset, in dataset order.

    With a process group each rank embeds the indices rank, rank + world, ... and the pieces are
    gathered back into dataset order on every rank.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model.forward(images)  # bypasses a compiled __call__ (graphs are per batch size)
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(torch.as_tensor(targets).to(device))
    model.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:  # rank r holds rows r, r+world, ...: interleave the gathered pieces back
        order = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)]).to(device)
        gathered_f = distributed.all_gather_cat(feats)
        gathered_l = distributed.all_gather_cat(labels)
        feats = torch.empty_like(gathered_f)
        feats[order] = gathered_f
        labels = torch.empty_like(gathered_l)
        labels[order] = gathered_l
    return feats, labels


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor,
                   test_features: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                   temperature: float = 0.07, num_classes: Optional[int] = None,
                   chunk_size: int = 1024) -> tuple[float, float]:
    """Weighted k-NN top-1 and top-5 accuracy in percent.

    Features must already be L2-normalised (so the dot product is the cosine similarity).
    train_features (N, D), test_features (M, D), labels int64 in [0, num_classes). Test images are
    processed in chunks of `chunk_size` so the (chunk, N) similarity matrix stays bounded.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max()).item()) + 1
    k = min(k, train_features.shape[0])
    train_t = train_features.t()
    correct1 = correct5 = 0
    for start in range(0, test_features.shape[0], chunk_size):
        feats = test_features[start:start + chunk_size]
        targets = test_labels[start:start + chunk_size]
        sims, idx = (feats @ train_t).topk(k, dim=1)             # (b, k) most similar bank images
        weights = (sims / temperature).exp()
        votes = torch.zeros(feats.shape[0], num_classes, device=feats.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[idx], weights)        # sum of weights per class
        top = votes.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(dim=1).sum().item()
    n = test_features.shape[0]
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def knn_accuracy(model: nn.Module, train_set: Dataset, test_set: Dataset, *, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256, num_workers: int = 0,
                 device: torch.device = torch.device("cpu"),
                 amp_dtype: Optional[torch.dtype] = None) -> dict:
    """Weighted k-NN accuracy of a frozen feature extractor, as the official `eval_knn`.

    Args:
        model: images (B, 3, H, W) -> features (B, D), e.g. a ViT backbone from `build_vit`
            (put in eval mode during the embedding, then restored).
        train_set / test_set: datasets of (image tensor, label): the bank and the queries.
        k: number of neighbours; temperature: T of the exp(cosine / T) vote weights.
        batch_size, num_workers: of the embedding's DataLoader.
        device: where the model runs; amp_dtype: autocast dtype of the embedding (None: fp32).

    Returns:
        {"knn_top1": %, "knn_top5": %, "knn_k": k, "knn_train": N, "knn_test": M}.

    Example:
        >>> from dino_fast import ProceduralShapes, build_vit, knn_accuracy
        >>> from dino_fast.augmentation import eval_transform
        >>> bank = ProceduralShapes("train", num_samples=200, transform=eval_transform(32))
        >>> queries = ProceduralShapes("test", num_samples=100, transform=eval_transform(32))
        >>> vit = build_vit("vit_tiny", patch_size=8, img_size=32, depth=2)
        >>> knn_accuracy(vit, bank, queries)["knn_top1"]  # doctest: +SKIP
        21.0
    """
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, amp_dtype=amp_dtype)
    train_f, train_l = extract_features(model, train_set, **kw)
    test_f, test_l = extract_features(model, test_set, **kw)
    top1, top5 = knn_classifier(train_f, train_l, test_f, test_l, k=k, temperature=temperature)
    return {"knn_top1": top1, "knn_top5": top5, "knn_k": k,
            "knn_train": len(train_set), "knn_test": len(test_set)}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "python -m dino_fast.knn",
        description="Weighted k-NN accuracy of a dino_fast checkpoint's frozen features.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pth written by dino_fast.train")
    p.add_argument("--key", default="teacher", choices=("teacher", "student"),
                   help="which network's backbone to evaluate; DINO reports the teacher")
    p.add_argument("--data_path", default=None,
                   help="dataset to evaluate on (default: the one the checkpoint was trained on); "
                        "'procedural', a folder with train/ and test/ (or val/) class folders, or "
                        "'cifar10[:root]'")
    p.add_argument("--nb_knn", default=20, type=int, help="number of neighbours k (official: 20)")
    p.add_argument("--temperature", default=0.07, type=float,
                   help="temperature T of the exp(similarity / T) vote weights (official: 0.07)")
    p.add_argument("--knn_train_samples", default=None, type=int,
                   help="use a fixed random subset of this many bank images (0: all; default: "
                        "as in training)")
    p.add_argument("--knn_test_samples", default=None, type=int,
                   help="use a fixed random subset of this many test images (0: all)")
    p.add_argument("--batch_size", default=256, type=int, help="images per forward pass")
    p.add_argument("--num_workers", default=0, type=int, help="data loading processes")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    return p


def main(argv=None) -> None:
    """Command-line entry point (`python -m dino_fast.knn`, `dino-fast-knn`)."""
    run(argv)


def run(argv=None) -> dict:
    """Evaluate a checkpoint; returns knn_accuracy's dict."""
    args = get_args_parser().parse_args(argv)
    # the model and the datasets are built exactly as the training run built them
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    targs = train_args_from_checkpoint(ckpt)
    for name in ("data_path", "knn_train_samples", "knn_test_samples"):
        if getattr(args, name) is not None:
            setattr(targs, name, getattr(args, name))
    device = distributed.pick_device(args.device)
    backbone = build_backbone(targs, teacher=True)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in ckpt[args.key].items()
                              if k.startswith(prefix)})
    backbone.to(device)
    train_set, test_set = build_knn_datasets(targs)
    result = knn_accuracy(backbone, train_set, test_set, k=args.nb_knn,
                          temperature=args.temperature, batch_size=args.batch_size,
                          num_workers=args.num_workers, device=device)
    print(f"{args.checkpoint} ({args.key}, epoch {ckpt['epoch']}): weighted {args.nb_knn}-NN "
          f"top-1 {result['knn_top1']:.2f}%  top-5 {result['knn_top5']:.2f}%  "
          f"({result['knn_train']} bank / {result['knn_test']} test images, {targs.data_path})")
    return result


if __name__ == "__main__":
    main()
