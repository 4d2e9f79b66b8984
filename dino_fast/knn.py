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
from dino_fast.checks import check_floating_tensor, check_int, check_positive
from dino_fast.train_args import train_args_from_checkpoint


def _check_device(device) -> torch.device:
    """A torch.device or what torch.device() takes ("cpu", "cuda", "cuda:1")."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device or a string such as 'cpu' or 'cuda', got "
                        f"{type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must name a device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from None


def _check_dataset(dataset, name: str) -> int:
    """A non-empty sized dataset; returns its length."""
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(f"{name} must be a dataset with a length (a map-style Dataset), got "
                        f"{type(dataset).__name__}") from None
    if n == 0:
        raise ValueError(f"{name} is empty: k-NN needs at least one image")
    return n


def _check_embedding_args(model, batch_size, num_workers, device, amp_dtype) -> torch.device:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_int(batch_size, "batch_size", 1)
    check_int(num_workers, "num_workers", 0)
    if amp_dtype is not None and not (isinstance(amp_dtype, torch.dtype)
                                      and amp_dtype.is_floating_point):
        raise TypeError(f"amp_dtype must be None or a floating torch.dtype (torch.bfloat16, "
                        f"torch.float16), got {amp_dtype!r}")
    return _check_device(device)


def _check_labels(labels: torch.Tensor, name: str, rows: Optional[int] = None,
                  rows_name: str = "") -> None:
    """A 1-D integer (class index) tensor, of `rows` entries when given."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices (e.g. int64), got dtype "
                        f"{labels.dtype}")
    if labels.dim() != 1 or (rows is not None and labels.shape[0] != rows):
        want = "(N,)" if rows is None else f"({rows},), one per row of {rows_name}"
        raise ValueError(f"{name} must have shape {want}, got {tuple(labels.shape)}")


@torch.no_grad()
def extract_features(model: nn.Module, dataset: Dataset, *, batch_size: int = 256,
                     num_workers: int = 0, device: torch.device = torch.device("cpu"),
                     amp_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) fp32 and labels (N,) int64 of a dataset, in dataset order.

    With a process group each rank embeds the indices rank, rank + world, ... and the pieces are
    gathered back into dataset order on every rank. `device` may be a string ("cpu", "cuda").
    """
    device = _check_embedding_args(model, batch_size, num_workers, device, amp_dtype)
    _check_dataset(dataset, "dataset")
    return _extract_features(model, dataset, "dataset", batch_size, num_workers, device,
                             amp_dtype)


@torch.no_grad()
def _extract_features(model: nn.Module, dataset: Dataset, name: str, batch_size: int,
                      num_workers: int, device: torch.device,
                      amp_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """extract_features with checked arguments; `name` is the dataset's in the messages."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model.forward(images)  # bypasses a compiled __call__ (graphs per batch size)
            targets = torch.as_tensor(targets)
            # attribute checks only, per batch: a 3-D output would be normalised along the wrong
            # dim, float labels would fail in scatter_add_
            if not isinstance(out, torch.Tensor) or out.dim() != 2 \
                    or out.shape[0] != images.shape[0]:
                got = (f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                       else type(out).__name__)
                raise ValueError(f"model must return (B, D) features for a batch of B images "
                                 f"of {name}, got {got} for B={images.shape[0]}")
            _check_labels(targets, f"the labels of {name}", images.shape[0], "the images")
            feats.append(F.normalize(out.float(), dim=1))
            labels.append(targets.to(device))
    finally:
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
    k (an integer >= 1) is capped at N; temperature > 0; N, M >= 1; all four on one device.
    """
    for t, arg in ((train_features, "train_features"), (test_features, "test_features")):
        check_floating_tensor(t, arg)
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{arg} must be a non-empty (rows, D) tensor, got shape "
                             f"{tuple(t.shape)}")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features has D={test_features.shape[1]} but train_features has "
                         f"D={train_features.shape[1]}; both must come from the same model")
    _check_labels(train_labels, "train_labels", train_features.shape[0], "train_features")
    _check_labels(test_labels, "test_labels", test_features.shape[0], "test_features")
    device = train_features.device
    for t, arg in ((train_labels, "train_labels"), (test_features, "test_features"),
                   (test_labels, "test_labels")):
        if t.device != device:
            raise ValueError(f"{arg} is on {t.device} but train_features is on {device}; all "
                             "four must be on one device")
    k = check_int(k, "k", 1)
    temperature = check_positive(temperature, "temperature")
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", 1)
    # the label range in one host sync (out of range, scatter_add_ fails; on CUDA, an assert)
    ranges = torch.stack([train_labels.min().long(), train_labels.max().long(),
                          test_labels.min().long(), test_labels.max().long()]).tolist()
    if num_classes is None:
        num_classes = max(ranges[1], ranges[3]) + 1
    for (lo, hi), arg in ((ranges[:2], "train_labels"), (ranges[2:], "test_labels")):
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{arg} must be class indices in [0, num_classes={num_classes}), "
                             f"got labels in [{lo}, {hi}]")
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
        k: number of neighbours (an integer >= 1; capped at the bank's size); temperature: T > 0
            of the exp(cosine / T) vote weights.
        batch_size, num_workers: of the embedding's DataLoader.
        device: where the model runs (a torch.device or a string: "cpu", "cuda");
            amp_dtype: autocast dtype of the embedding (None: fp32).

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
    # everything that needs no forward pass is checked before the (long) embedding
    k = check_int(k, "k", 1)
    temperature = check_positive(temperature, "temperature")
    device = _check_embedding_args(model, batch_size, num_workers, device, amp_dtype)
    n_train = _check_dataset(train_set, "train_set")
    n_test = _check_dataset(test_set, "test_set")
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, amp_dtype=amp_dtype)
    train_f, train_l = _extract_features(model, train_set, "train_set", **kw)
    test_f, test_l = _extract_features(model, test_set, "test_set", **kw)
    if test_f.shape[1] != train_f.shape[1]:  # a model whose output width depends on the input
        raise ValueError(f"model returned D={train_f.shape[1]} features for train_set but "
                         f"D={test_f.shape[1]} for test_set")
    top1, top5 = knn_classifier(train_f, train_l, test_f, test_l, k=k, temperature=temperature)
    return {"knn_top1": top1, "knn_top5": top5, "knn_k": k,
            "knn_train": n_train, "knn_test": n_test}


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
