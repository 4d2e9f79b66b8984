import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dino_fast.knn import extract_features, knn_accuracy, knn_classifier


def _official_style_knn(train_f, train_l, test_f, test_l, k, T, num_classes):
    """A literal per-image reference: top-k cosine neighbours, exp(sim / T) weighted votes."""
    top1 = top5 = 0
    for f, y in zip(test_f, test_l):
        sims = train_f @ f
        s, idx = sims.topk(k)
        votes = torch.zeros(num_classes)
        for sim, i in zip(s, idx):
            votes[train_l[i]] += torch.exp(sim / T)
        order = votes.argsort(descending=True)
        top1 += int(order[0] == y)
        top5 += int(y in order[:5])
    return 100 * top1 / len(test_l), 100 * top5 / len(test_l)


def test_knn_matches_a_literal_per_image_vote():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(7, 16, generator=g)
    train_l = torch.randint(0, 7, (300,), generator=g)
    test_l = torch.randint(0, 7, (101,), generator=g)
    train_f = F.normalize(centers[train_l] + 1.5 * torch.randn(300, 16, generator=g), dim=1)
    test_f = F.normalize(centers[test_l] + 1.5 * torch.randn(101, 16, generator=g), dim=1)
    got = knn_classifier(train_f, train_l, test_f, test_l, k=20, temperature=0.07,
                         chunk_size=13)  # several chunks, the last one partial
    want = _official_style_knn(train_f, train_l, test_f, test_l, 20, 0.07, 7)
    assert got == pytest.approx(want)
    assert 20 < got[0] < 100  # a non-trivial case: neither chance nor perfect


def test_vote_weights_favour_the_closest_neighbour_over_the_majority():
    # two bank images of class 0 at cosine 0.5, one of class 1 at cosine 0.99
    train_f = F.normalize(torch.tensor([[0.5, 0.866], [0.5, -0.866], [0.99, 0.141]]), dim=1)
    train_l = torch.tensor([0, 0, 1])
    test_f, test_l = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert knn_classifier(train_f, train_l, test_f, test_l, k=3, temperature=0.07)[0] == 100.0
    # with a high temperature the weights flatten and the majority wins
    assert knn_classifier(train_f, train_l, test_f, test_l, k=3, temperature=100.0)[0] == 0.0


def test_k_larger_than_the_bank_uses_the_whole_bank():
    f = F.normalize(torch.randn(5, 4), dim=1)
    labels = torch.arange(5)
    assert knn_classifier(f, labels, f, labels, k=20, temperature=0.07)[0] == 100.0


def test_extract_features_are_l2_normalised_and_in_dataset_order():
    images = torch.randn(10, 3, 2, 2)
    labels = torch.arange(10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    feats, got_labels = extract_features(model, TensorDataset(images, labels), batch_size=3)
    assert torch.equal(got_labels, labels)
    assert torch.allclose(feats.norm(dim=1), torch.ones(10))
    assert torch.allclose(feats, F.normalize(model(images), dim=1).detach(), atol=1e-6)


def _sharded_features(rank, port, result_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)  # the same model and data on both ranks
    images, labels = torch.randn(11, 3, 2, 2), torch.arange(11)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    feats, got = extract_features(model, TensorDataset(images, labels), batch_size=4)
    if rank == 0:
        torch.save({"feats": feats, "labels": got, "single": F.normalize(model(images), dim=1)},
                   result_path)
    dist.destroy_process_group()


def test_features_embedded_on_two_ranks_come_back_in_dataset_order(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_features, args=(port, str(tmp_path / "r.pt")), nprocs=2)
    r = torch.load(tmp_path / "r.pt")
    assert torch.equal(r["labels"], torch.arange(11))  # 11 images: ranks hold 6 and 5
    assert torch.allclose(r["feats"], r["single"].detach(), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# validation: each error names the argument and says what was expected

def _tiny_knn_setup(labels=None, n=12):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g) if labels is None else labels
    ds = TensorDataset(torch.randn(n, 3, 4, 4, generator=g), labels)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    return model, ds


def test_knn_accuracy_takes_a_device_string():
    model, ds = _tiny_knn_setup()
    by_str = knn_accuracy(model, ds, ds, k=3, device="cpu")
    by_device = knn_accuracy(model, ds, ds, k=3, device=torch.device("cpu"))
    assert by_str == by_device and by_str["knn_train"] == 12 and by_str["knn_k"] == 3
    feats, _ = extract_features(model, ds, device="cpu")
    assert feats.shape == (12, 4)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=0), ValueError, "k must be >= 1, got 0"),
    (dict(k=-1), ValueError, "k must be >= 1, got -1"),
    (dict(k=2.0), TypeError, "k must be an integer"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature=-1.0), ValueError, "temperature must be a positive finite number"),
    (dict(temperature="0.07"), TypeError, "temperature must be a real number"),
    (dict(device=0), TypeError, "device must be a torch.device or a string"),
    (dict(device="gpu"), ValueError, "device must name a device"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(num_workers=-1), ValueError, "num_workers must be >= 0"),
    (dict(amp_dtype=torch.int8), TypeError, "amp_dtype must be None or a floating torch.dtype"),
])
def test_knn_accuracy_rejects_bad_settings_before_embedding(kwargs, exc, match):
    _, ds = _tiny_knn_setup()

    class Counting(nn.Module):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return x.flatten(1)

    with pytest.raises(exc, match=match):
        knn_accuracy(Counting(), ds, ds, **kwargs)
    assert Counting.calls == 0  # refused before the embedding


def test_knn_accuracy_rejects_bad_data_naming_the_dataset():
    model, ds = _tiny_knn_setup()
    empty = TensorDataset(torch.randn(0, 3, 4, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="test_set is empty"):
        knn_accuracy(model, ds, empty)
    with pytest.raises(ValueError, match="train_set is empty"):
        knn_accuracy(model, empty, ds)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        knn_accuracy(lambda x: x, ds, ds)
    _, float_labels = _tiny_knn_setup(labels=torch.rand(12))
    with pytest.raises(TypeError, match="the labels of train_set must be integer class indices"):
        knn_accuracy(model, float_labels, ds)
    _, bad_range = _tiny_knn_setup(labels=torch.full((12,), -1))
    with pytest.raises(ValueError, match=r"test_labels must be class indices in \[0, "):
        knn_accuracy(model, ds, bad_range)
    flat3d = nn.Flatten(2)  # (B, 3, 16): 3-D features
    with pytest.raises(ValueError, match=r"model must return \(B, D\) features .* got shape "
                                         r"\(12, 3, 16\)"):
        knn_accuracy(flat3d, ds, ds)
    assert flat3d.training  # restored after the error


def _features(n, d=4, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("change,exc,match", [
    (dict(k=0), ValueError, "k must be >= 1, got 0"),
    (dict(k=None), TypeError, "k must be an integer"),
    (dict(temperature=0), ValueError, "temperature must be a positive finite number"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
    (dict(num_classes=2), ValueError, r"train_labels must be class indices in \[0, "
                                      r"num_classes=2\), got labels in \[0, 2\]"),
    (dict(train_features=_features(6, 4).reshape(6, 2, 2)), ValueError,
     r"train_features must be a non-empty \(rows, D\) tensor, got shape \(6, 2, 2\)"),
    (dict(test_features=_features(0, 4)), ValueError,
     r"test_features must be a non-empty \(rows, D\) tensor, got shape \(0, 4\)"),
    (dict(test_features=_features(5, 3)), ValueError, "test_features has D=3 but train_features "
                                                      "has D=4"),
    (dict(train_features=torch.ones(6, 4, dtype=torch.long)), TypeError,
     "train_features must be a floating-point tensor"),
    (dict(train_labels=torch.arange(6).float()), TypeError,
     "train_labels must be integer class indices"),
    (dict(test_labels=torch.ones(5, dtype=torch.bool)), TypeError,
     "test_labels must be integer class indices"),
    (dict(train_labels=torch.arange(5)), ValueError,
     r"train_labels must have shape \(6,\), one per row of train_features, got \(5,\)"),
    (dict(test_labels=torch.zeros(5, 1, dtype=torch.long)), ValueError,
     r"test_labels must have shape \(5,\)"),
    (dict(test_labels=[0, 1, 2, 0, 1]), TypeError, "test_labels must be a torch.Tensor"),
    (dict(test_features=_features(5).to("meta")), ValueError,
     "test_features is on meta but train_features is on cpu"),
])
def test_knn_classifier_rejects_bad_inputs_naming_them(change, exc, match):
    args = dict(train_features=_features(6), train_labels=torch.tensor([0, 1, 2, 0, 1, 2]),
                test_features=_features(5, seed=1), test_labels=torch.tensor([0, 1, 2, 0, 1]),
                k=3, temperature=0.07)
    assert knn_classifier(**args)[1] == 100.0  # 3 classes: top-5 always right
    args.update(change)
    with pytest.raises(exc, match=match):
        knn_classifier(**args)
