"""torchvision compat import, atomic writes and the checkpoint format."""
import json
import os

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError, file_sha256, load_checkpoint, make_checkpoint, save_checkpoint
from utils.config import build_config
from utils.io import append_jsonl, atomic_path, save_json, save_npy


def test_torchvision_models_and_transforms_import():
    from utils.compat import torchvision

    import torchvision.models
    import torchvision.transforms

    net = torchvision.models.resnet18()
    assert sum(p.numel() for p in net.parameters()) == 11689512
    # the op schemas torchvision registers on import exist, whether its C extension loaded
    # (which defines them) or the compat layer had to define them
    for op in ("nms", "qnms"):
        schema = str(getattr(torch.ops.torchvision, op).default._schema)
        assert schema.startswith("torchvision::%s(Tensor dets, Tensor scores, float iou_threshold)" % op)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_atomic_replaces_existing(tmp_path):
    target = tmp_path / "a.npy"
    save_npy(target, np.arange(3))
    save_npy(target, np.arange(5))
    assert np.load(target).tolist() == list(range(5))
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]


def test_atomic_files_get_the_usual_mode(tmp_path):
    target = tmp_path / "m.npy"
    save_npy(target, np.zeros(2))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~mask


def test_json_helpers(tmp_path):
    save_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    append_jsonl(tmp_path / "m.jsonl", {"epoch": 0})
    append_jsonl(tmp_path / "m.jsonl", {"epoch": 1})
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_checkpoint_roundtrip_weights_only(tmp_path):
    cfg = build_config("demo")
    net = torch.nn.Linear(3, 2)
    ckpt = make_checkpoint(net.state_dict(), cfg, num_classes=2, epoch=4, best={"rank1": 0.5})
    path = tmp_path / "c.pth"
    save_checkpoint(path, ckpt)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 4 and raw["num_classes"] == 2
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["weight"], net.weight)
    assert len(file_sha256(str(path))) == 64


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    bare = tmp_path / "bare.pth"
    torch.save({"net": {}}, bare)
    with pytest.raises(CheckpointError, match="convert_official_checkpoint"):
        load_checkpoint(str(bare))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(str(junk))
