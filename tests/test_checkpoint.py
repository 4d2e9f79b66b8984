import os

import pytest
import torch
from torch import nn

from dino_fast.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    restore_training_state,
    training_state,
)
from dino_fast.loss import DINOLoss


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")  # a failure in the middle of writing


def test_a_failed_save_leaves_the_previous_checkpoint_intact_and_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    atomic_torch_save({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert torch.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def _objects(seed):
    torch.manual_seed(seed)
    student, teacher = nn.Linear(3, 4), nn.Linear(3, 4)
    opt = torch.optim.AdamW(student.parameters(), lr=0.1)
    loss = DINOLoss(4, 2, 0.04, 0.04, 0, 2)
    student(torch.randn(2, 3)).sum().backward()
    opt.step()
    loss.center.normal_()
    return student, teacher, opt, loss


def test_training_state_round_trips_through_a_file(tmp_path):
    student, teacher, opt, loss = _objects(0)
    state = training_state(epoch=3, student=student, teacher=teacher, optimizer=opt,
                           dino_loss=loss, scaler=None, args={"lr": 0.1})
    atomic_torch_save(state, tmp_path / "c.pth")
    ckpt = load_checkpoint(tmp_path / "c.pth")  # weights_only: plain tensors and scalars
    s2, t2, o2, l2 = _objects(1)
    assert restore_training_state(ckpt, student=s2, teacher=t2, optimizer=o2, dino_loss=l2,
                                  scaler=None) == 3
    for a, b in [(student, s2), (teacher, t2)]:
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(pa, pb)
    assert torch.equal(loss.center, l2.center)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"],
                       o2.state_dict()["state"][0]["exp_avg"])
    assert ckpt["args"] == {"lr": 0.1}


def test_missing_or_foreign_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a dino_fast training checkpoint"):
        load_checkpoint(tmp_path / "other.pth")



def test_a_checkpoint_holding_python_objects_is_refused_with_a_clear_error(tmp_path):
    import argparse
    torch.save({"epoch": 1, "student": {}, "teacher": {}, "args": argparse.Namespace(lr=1)},
               tmp_path / "official.pth")
    with pytest.raises(ValueError, match="holds Python objects"):
        load_checkpoint(tmp_path / "official.pth")


# ------------------------------------------------------------------------- official checkpoints

def _tiny_vit(**kw):
    from dino_fast.models import build_vit
    return build_vit("vit_tiny", patch_size=8, img_size=16, depth=1, **kw)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("strict", [True, False])
def test_official_load_with_a_size_mismatch_loads_nothing(strict):
    from dino_fast.checkpoint import load_official_checkpoint
    torch.manual_seed(0)
    source = {k: v + 1 for k, v in _tiny_vit().state_dict().items()}
    source["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    target = _tiny_vit()
    before = _snapshot(target)
    with pytest.raises(RuntimeError, match=r"nothing was loaded: size mismatch for "
                                           r"blocks\.0\.attn\.qkv\.weight: the checkpoint has "
                                           r"\(3, 3\), the module \(576, 192\)"):
        load_official_checkpoint(target, source, strict=strict)
    assert _unchanged(target, before)


def test_official_load_with_missing_or_unexpected_keys_loads_nothing_when_strict():
    from dino_fast.checkpoint import load_official_checkpoint
    torch.manual_seed(0)
    source = {f"module.backbone.{k}": v + 1 for k, v in _tiny_vit().state_dict().items()}
    del source["module.backbone.norm.bias"]
    source["module.backbone.extra.weight"] = torch.zeros(2)
    target = _tiny_vit()
    before = _snapshot(target)
    with pytest.raises(RuntimeError, match=r"nothing was loaded: Missing key\(s\) in the "
                                           r"checkpoint: norm\.bias; Unexpected key\(s\) in the "
                                           r"checkpoint: extra\.weight"):
        load_official_checkpoint(target, source)  # the key mapping applies before the check
    assert _unchanged(target, before)
    # strict=False loads the matching keys, as nn.Module.load_state_dict
    result = load_official_checkpoint(target, source, strict=False)
    assert result.missing_keys == ["norm.bias"] and result.unexpected_keys == ["extra.weight"]
    assert torch.equal(target.norm.weight, before["norm.weight"] + 1)
    assert torch.equal(target.norm.bias, before["norm.bias"])


def test_official_load_keeps_torchs_tolerance_of_a_missing_batchnorm_counter():
    from dino_fast.checkpoint import load_official_checkpoint
    from dino_fast.head import DINOHead
    source = DINOHead(8, 4, use_bn=True, hidden_dim=8, bottleneck_dim=4)
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    target = DINOHead(8, 4, use_bn=True, hidden_dim=8, bottleneck_dim=4)
    load_official_checkpoint(target, state)
    assert torch.equal(target.last_layer.weight_v, source.last_layer.weight_v)
