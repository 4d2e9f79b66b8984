"""Optimisation pieces of the DINO recipe: parameter groups, AdamW / SGD / LARS, gradient clipping,
and the frozen last layer.

Learning rate and weight decay are not set here: the training loop writes them into the groups at
every step from the per-iteration schedules (`apply_schedules`). Group 0 is the regularised group
(weight decay follows its schedule), group 1 never has weight decay.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

OPTIMIZERS = ("adamw", "sgd", "lars")


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two parameter groups, as the official script: [decayed, not decayed].

    Biases and every 1-D parameter (LayerNorm / BatchNorm scales and shifts, the CLS token is 3-D
    and stays decayed as in the official code) go to the group without weight decay. Parameters
    that do not require a gradient (the frozen weight_g of a normalised last layer) are left out.
    """
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by DINO.

    For each parameter p with gradient g (weight decay and the trust ratio only for p.ndim > 1, so
    biases and norms are plain SGD with momentum):
        g <- g + weight_decay * p
        g <- g * eta * ||p|| / ||g||      (when both norms are positive)
        mu <- momentum * mu + g;   p <- p - lr * mu
    Everything stays on the device: the trust ratio is a `torch.where`, never a host-side branch.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["eta"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


def build_optimizer(name: str, params_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (default, recommended for ViTs), SGD with momentum 0.9, or LARS (for convnets).

    lr and weight decay start at 0: the schedules overwrite them before the first step.
    """
    if name == "adamw":
        return torch.optim.AdamW(params_groups, lr=0.0, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    if name == "lars":
        return LARS(params_groups, lr=0.0, weight_decay=0.0)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's lr in every group and its weight decay in group 0 (the decayed group) only.

    Values are stored as Python floats (a numpy scalar from a schedule array would make the
    optimizer's state_dict, hence the checkpoint, unloadable with weights_only=True).
    """
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(lr)
        if i == 0:
            group["weight_decay"] = float(weight_decay)


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> Optional[torch.Tensor]:
    """Clip each parameter's gradient to L2 norm <= `clip`, independently, as the official script.

    The official loop read every norm back to the host (one sync per parameter); here the norms
    come from one `torch._foreach_norm`, the factors min(1, clip / (norm + 1e-6)) are computed on
    the device and applied with one `torch._foreach_mul_`. A factor of exactly 1 leaves a gradient
    bit-identical, so the result equals the official per-parameter branch. Returns the (P,) tensor
    of norms before clipping (on the device; None when no parameter has a gradient).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads)).float()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [f.to(g.dtype) for f, g in zip(factors.unbind(), grads)])
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's `last_layer` during the first `freeze_last_layer` epochs.

    Keeping the output layer fixed for the first epoch helps the student not to collapse; a
    parameter with `grad = None` is skipped entirely by the optimizer (no weight decay either).
    """
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None

