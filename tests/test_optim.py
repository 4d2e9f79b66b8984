import pytest
import torch
from torch import nn

from dino_fast.head import DINOHead
from dino_fast.optim import (
    LARS,
    apply_schedules,
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
)

from reference import official_clip_gradients


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3),
                         DINOHead(3, 5, hidden_dim=6, bottleneck_dim=4, nlayers=2))


def test_biases_and_1d_params_are_not_decayed_and_frozen_params_are_left_out():
    model = _model()
    groups = get_params_groups(model)
    decayed = {id(p) for p in groups[0]["params"]}
    plain = {id(p) for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:  # the normalised last layer's weight_g
            assert id(p) not in decayed | plain, name
        elif name.endswith(".bias") or p.ndim == 1:
            assert id(p) in plain, name
        else:
            assert id(p) in decayed, name
    assert any("weight_g" in n and not p.requires_grad for n, p in model.named_parameters())


def test_schedules_set_lr_everywhere_and_weight_decay_on_the_decayed_group_only():
    opt = build_optimizer("adamw", get_params_groups(_model()))
    apply_schedules(opt, lr=0.01, weight_decay=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def test_clip_gradients_equals_the_official_per_parameter_clipping_bit_for_bit():
    a, b = _model(), _model()
    x = torch.randn(16, 4)
    for m in (a, b):
        (m(x) * 10).pow(2).sum().backward()
    before = [p.grad.norm().item() for p in a.parameters() if p.grad is not None]
    clip = sorted(before)[len(before) // 2]  # about half the parameters are clipped
    assert min(before) < clip < max(before)
    norms = clip_gradients(a, clip)
    expected = official_clip_gradients(b, clip)
    assert torch.allclose(norms, torch.tensor(expected))
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.equal(pa.grad, pb.grad)
            assert pa.grad.norm() <= clip * (1 + 1e-5)


def test_last_layer_gradients_are_dropped_only_during_the_frozen_epochs():
    model = _model()
    model(torch.randn(2, 4)).sum().backward()
    cancel_gradients_last_layer(epoch=1, model=model, freeze_last_layer=1)
    assert model[3].last_layer.weight_v.grad is not None
    cancel_gradients_last_layer(epoch=0, model=model, freeze_last_layer=1)
    assert model[3].last_layer.weight_v.grad is None
    assert model[0].weight.grad is not None


def test_lars_step_matches_the_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, 2.0]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5, 0.5])
    opt = LARS([w, b], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    opt.step()
    g = torch.tensor([[0.0, 1.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # decayed gradient
    g = g * (0.001 * 5.0 / g.norm())  # trust ratio
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * g)
    # 1-D parameters: no weight decay, no trust ratio, plain momentum SGD
    assert torch.allclose(b.detach(), torch.tensor([0.95, 1.95]))
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()  # momentum buffer 0.9 * 0.5 + 0.5 = 0.95
    assert torch.allclose(b.detach(), torch.tensor([0.95 - 0.095, 1.95 - 0.095]))


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                                      ("lars", LARS)])
def test_build_optimizer(name, cls):
    opt = build_optimizer(name, get_params_groups(_model()))
    assert isinstance(opt, cls) and len(opt.param_groups) == 2


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("adam", get_params_groups(_model()))
