"""cluster.features: flip-averaged extraction of the training images, single process and
sharded over two gloo processes (the torchrun layout), against a per-image computation."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from gloo_processes import run_gloo
from cluster.features import extract_train_features

TIMEOUT_S = 90


class Images(Dataset):
    """(image [3, 6, 5], index) items; a left-right asymmetric pattern so that flips matter."""

    def __init__(self, n, seed=0):
        self.images = torch.randn(n, 3, 6, 5, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, k):
        return self.images[k], k


class Toy(nn.Module):
    """Eval output {"bn": BN(linear(x)) + modality offset, "pool": ...}; train mode differs (batch BN)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(90, 8)
        self.bn = nn.BatchNorm1d(8)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2)
        self.seen = 0

    def forward(self, images, modality):
        self.seen += len(images)
        f = self.bn(self.fc(images.flatten(1)))
        shift = 1.0 if modality == "infrared" else 0.0
        return {"bn": f + shift, "pool": f.abs()}


def expected(model, data, modality, name="bn"):
    model.eval()
    with torch.no_grad():
        rows = []
        for img, _ in data:
            f = model(img[None], modality)[name] + model(img.flip(-1)[None], modality)[name]
            rows.append(f[0] / 2)
    return torch.stack(rows)


@pytest.mark.parametrize("modality", ["visible", "infrared"])
def test_flip_average_then_normalisation(modality):
    data, model = Images(13), Toy()
    model.train()
    feats, normed = extract_train_features(model, data, modality, "cpu", embedding="bn", batch_size=4)
    assert model.training  # the mode is restored
    want = expected(model, data, modality)
    assert feats.shape == (13, 8) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, F.normalize(want, dim=1), rtol=1e-6, atol=1e-6)
    # the flip average matters: the unflipped eval features alone differ
    model.eval()
    with torch.no_grad():
        plain = model(data.images, modality)["bn"]
    assert not torch.allclose(feats, plain, atol=1e-3)


def test_embedding_name_is_required_with_several_sets():
    data, model = Images(4), Toy()
    with pytest.raises(ValueError, match="name the one"):
        extract_train_features(model, data, "visible", "cpu")
    with pytest.raises(ValueError, match="no embedding set 'feat'"):
        extract_train_features(model, data, "visible", "cpu", embedding="feat")


def test_items_must_carry_their_position():
    class Shifted(Images):
        def __getitem__(self, k):
            return self.images[k], k + 1

    with pytest.raises(ValueError, match="own position"):
        extract_train_features(Toy(), Shifted(5), "visible", "cpu", embedding="bn")


def _worker(rank, port, out_dir, n):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = Toy()
        feats, normed = extract_train_features(model, Images(n), "infrared", "cpu", embedding="pool", batch_size=3)
        torch.save({"feats": feats, "normed": normed, "seen": model.seen}, os.path.join(out_dir, "rank%d.pt" % rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [11])
def test_sharded_over_two_processes_and_gathered(tmp_path, n):
    run_gloo(_worker, (str(tmp_path), n), 2, TIMEOUT_S)
    want = expected(Toy(), Images(n), "infrared", "pool")
    outs = [torch.load(tmp_path / ("rank%d.pt" % r), weights_only=True) for r in range(2)]
    for out in outs:
        torch.testing.assert_close(out["feats"], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["normed"], F.normalize(want, dim=1), rtol=1e-6, atol=1e-6)
    # each process ran only its own shard (6 and 5 images, each also flipped)
    assert [out["seen"] for out in outs] == [12, 10]
