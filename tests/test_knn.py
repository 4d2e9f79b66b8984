import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dino_fast.knn import extract_features, knn_classifier


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
