"""The DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised linear.

Same architecture, initialisation order and state-dict keys as the official `DINOHead`, so an
official checkpoint loads unchanged (`mlp.0.weight`, ..., `last_layer.weight_g`,
`last_layer.weight_v`). The last layer is our own `WeightNormLinear` rather than
`torch.nn.utils.weight_norm` (deprecated) or `torch.nn.utils.parametrizations.weight_norm` (which
renames the keys to `parametrizations.weight.original0/1` and breaks official checkpoints).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dino_fast.checks import check_floating_tensor, check_int


class WeightNormLinear(nn.Module):
    """y = x W^T with W = g * v / ||v||, the norm taken per output row; no bias.

    Parameters `weight_g` (out_features, 1) and `weight_v` (out_features, in_features): the
    names and shapes `torch.nn.utils.weight_norm(nn.Linear(...), dim=0)` gives, hence the same
    state-dict keys. `v` starts as an `nn.Linear` weight would (consuming the random stream
    identically) and `g` starts at ||v||, so the initial W is the plain Linear weight.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        v = torch.empty(self.out_features, self.in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default initialisation
        # g registered before v, as weight_norm does: the parameter order (which optimizer
        # states are indexed by) and the state-dict order match the official head
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=1, keepdim=True))
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out_features, in_features) weight g * v / ||v||."""
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(
            self.weight_v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """The official DINO head: (in_dim) -> MLP -> (bottleneck_dim) -> L2 normalise -> (out_dim).

    The MLP has `nlayers` Linear layers (in_dim -> hidden_dim -> ... -> bottleneck_dim) with GELU
    between them, and BatchNorm1d after each hidden Linear when `use_bn`; nlayers=1 is a single
    Linear (in_dim -> bottleneck_dim). Linear weights are truncated-normal (std 0.02), biases 0.
    The last layer is weight-normalised without bias; its `weight_g` is filled with 1, and with
    `norm_last_layer` frozen (requires_grad=False), so the logits are cosines in [-1, 1].

    Args:
        in_dim: the backbone's feature width (`embed_dim`).
        out_dim: the number of prototypes K (65536 in the paper).
        use_bn: BatchNorm1d after each hidden Linear (false for ViTs).
        norm_last_layer: freeze the last layer's weight norm at 1 (more stable training).
        nlayers, hidden_dim, bottleneck_dim: the MLP's depth and widths (official: 3, 2048, 256).

    forward: (N, in_dim) -> (N, out_dim), in the input's dtype; x must be a floating-point
    tensor whose last dimension is in_dim (TypeError / ValueError otherwise).

    Example:
        >>> head = DINOHead(384, 65536)
        >>> head(torch.randn(8, 384)).shape
        torch.Size([8, 65536])
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        in_dim = check_int(in_dim, "in_dim", 1)
        out_dim = check_int(out_dim, "out_dim", 1)
        nlayers = check_int(nlayers, "nlayers", 1)
        hidden_dim = check_int(hidden_dim, "hidden_dim", 1)
        bottleneck_dim = check_int(bottleneck_dim, "bottleneck_dim", 1)
        self.in_dim = in_dim
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
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
            self.mlp = nn.Sequential(*layers)
        # The official order: initialise the MLP, then build the last layer (its default init
        # draws from the random stream after the MLP's), so a seed gives the official weights.
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)  # truncated at +-2 (absolute), as official
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating_tensor(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.in_dim:
            raise ValueError(f"x must be a (N, in_dim={self.in_dim}) tensor of features, got "
                             f"shape {tuple(x.shape)}")
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
