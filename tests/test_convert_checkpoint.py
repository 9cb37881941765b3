"""tools/convert_official_checkpoint.py on fake released checkpoints.

The fake checkpoints have every key and shape of the released model (tests/golden/
released_state_dict_{sysu,regdb}.txt). Each tensor is a unique constant ("marker"), stored as
an expanded scalar so the files stay tiny; after conversion and ``load_model`` every model
tensor must hold the marker of exactly one used released key, under the project prefix that
key's module maps to, and no unused key's marker may appear. A few tensors hold random values
and are compared exactly. The two kinds of derived constants the blocks rebuild carry their
true values and are checked and dropped by the converter: the WTConv Haar filter banks
(``wt_filter`` / ``iwt_filter``, :func:`haar_bank`) and the Swin relative-position index of the
GlobalBlock windows (:func:`swin_index`).
"""
import argparse
import os

import numpy as np
import pytest
import torch

from model import load_model
from tools.convert_official_checkpoint import ConversionFailed, convert, main

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")

# Released prefix -> prefix of this project's keys: the released CMAF module names (the key
# layout of tests/golden/released_state_dict_*.txt) and the CMFN module each maps to.
PREFIXES = [
    ("visible_module.visible.conv1.", "backbone.visible_stem.conv."),
    ("visible_module.visible.bn1.", "backbone.visible_stem.bn."),
    ("thermal_module.thermal.conv1.", "backbone.infrared_stem.conv."),
    ("thermal_module.thermal.bn1.", "backbone.infrared_stem.bn."),
    ("base_resnet.base.layer", "backbone.layer"),
    ("layer3.0.", "hce_a.0."),
    ("layer3.1.", "hce_a.1."),
    ("layer4.0.", "hce_b."),
    ("layer5.0.", "dilated_bottleneck."),
    ("MFA1.", "mfa1."),
    ("MFA2.", "mfa2."),
    ("MFA3.", "mfa3."),
    ("DEE.FC1", "mbue.branch1."),
    ("DEE.FC2", "mbue.branch2."),
    ("DEE.fu1.", "mbue.branch1."),
    ("DEE.fu2.", "mbue.branch2."),
    ("DEE.compression2.", "mbue.branch1."),
    ("DEE.compression3.", "mbue.branch2."),
    ("DEE.compression4.", "mbue.branch2."),
    ("bottleneck.", "head.bnneck."),
    ("classifier.", "head.classifier."),
]
# Kept exact (random values) to check that whole tensors, not only markers, move.
RANDOM_KEYS = {
    "visible_module.visible.conv1.weight": "backbone.visible_stem.conv.weight",
    "thermal_module.thermal.conv1.weight": "backbone.infrared_stem.conv.weight",
    "base_resnet.base.layer3.1.conv2.weight": "backbone.layer3.1.conv2.weight",
    "bottleneck.weight": "head.bnneck.weight",
    "classifier.weight": "head.classifier.weight",
}


def read_layout(name):
    rows = []
    with open(os.path.join(GOLDEN, "released_state_dict_%s.txt" % name)) as f:
        for line in f:
            if line.startswith("#"):
                continue
            key, shape, flag = line.rstrip("\n").split("\t")
            dims = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
            rows.append((key, dims, flag))
    return rows


def haar_bank(n):
    """The released WTConv's one-level Haar bank [n, 1, 2, 2]: the LL, rows-high, columns-high
    and HH filters, each 1/2 * signs, repeated for every n / 4 channels."""
    signs = torch.tensor([[[1, 1], [1, 1]], [[1, 1], [-1, -1]], [[1, -1], [1, -1]], [[1, -1], [-1, 1]]],
                         dtype=torch.float32)
    return (0.5 * signs).unsqueeze(1).repeat(n // 4, 1, 1, 1)


def swin_index(ws):
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def is_derived(key):
    return key.endswith(("wt_filter", "iwt_filter", "relative_position_index"))


def fake_released(name):
    """(state dict, {marker: key}, rows) with a unique constant per tensor."""
    rows = read_layout(name)
    gen = torch.Generator().manual_seed(0)
    state, markers = {}, {}
    for i, (key, dims, _) in enumerate(rows):
        marker = i + 1
        if key.endswith("filter"):
            value = haar_bank(dims[0])
        elif key.endswith("relative_position_index"):
            value = swin_index(int(round(dims[0] ** 0.5)))
        elif key in RANDOM_KEYS:
            value = torch.randn(dims, generator=gen)
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(marker, dtype=torch.int64)
        else:
            value = torch.tensor(float(marker)).expand(dims)
        markers[marker] = key
        state[key] = value
    return state, markers, rows


def check_mapping(model, released, markers, rows):
    used = {k for k, _, flag in rows if flag in ("yes", "buffer", "frozen") and not is_derived(k)}
    unused = {k for k, _, flag in rows if flag in ("no", "buffer-unused")}
    assert used | unused | {k for k, _, _ in rows if is_derived(k)} == {k for k, _, _ in rows}
    landed = {}
    for name, tensor in model.state_dict().items():
        source = next((k for k, v in RANDOM_KEYS.items() if v == name), None)
        if source is not None:
            assert torch.equal(tensor, released[source]), name
        else:
            low, high = tensor.min().item(), tensor.max().item()
            assert low == high, "%s is not one released tensor" % name
            source = markers[int(low)]
        assert source not in landed, "%s landed in %s and %s" % (source, landed.get(source), name)
        landed[source] = name
    assert set(landed) == used, (sorted(used - set(landed))[:5], sorted(set(landed) - used)[:5])
    assert not set(landed) & unused
    for source, target in landed.items():
        prefix = next((p for p in PREFIXES if source.startswith(p[0])), None)
        assert prefix is not None, source
        expected = prefix[1] + source[len(prefix[0]):] if prefix[0] == "base_resnet.base.layer" else prefix[1]
        assert target.startswith(expected), (source, target)
    return len(used), len(unused)


@pytest.mark.parametrize("name", ["sysu", "regdb"])
def test_convert_and_load(tmp_path, name):
    released, markers, rows = fake_released(name)
    src, dst = str(tmp_path / "released.t"), str(tmp_path / "converted.pth")
    # A DataParallel-style prefix and numpy extras, as the released scripts saved them.
    torch.save({"net": {"module." + k: v for k, v in released.items()}, "epoch": 42,
                "mAP": np.float64(0.76), "cmc": np.linspace(0, 1, 20, dtype=np.float32)}, src)
    lines = []
    meta = convert(src, dst, name, log=lines.append)

    model = load_model(dst)
    assert not model.training
    assert model.feat_dim == (2048 if name == "sysu" else 1024)
    n_used, n_unused = check_mapping(model, released, markers, rows)
    n_derived = sum(is_derived(k) for k, _, _ in rows)
    assert meta["mapped_tensors"] == n_used
    assert sum(meta["dropped_tensors"].values()) == n_unused + n_derived
    assert meta["released_epoch"] == 42
    assert any("wrote" in line for line in lines)
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["num_classes"] == (395 if name == "sysu" else 206)
    assert "PRETRAINED: false" in ckpt["config"]
    # the config of the dataset's CMFN preset, in the current layout (MODEL.CMFN.*)
    assert "CONFIG_VERSION: 2" in ckpt["config"]
    assert (model.cfg.METHOD, model.cfg.MODEL.NAME, model.cfg.DATASET.NAME) == ("cmfn", "cmfn", name)
    assert model.cfg.MODEL.CMFN.MBUE_AFTER == ("layer3" if name == "sysu" else "layer2")


def test_regdb_layout_counts():
    rows = read_layout("regdb")
    assert not any(k.startswith("MFA3.") for k, _, _ in rows)
    assert all(flag in ("no", "buffer-unused") for k, _, flag in rows if k.startswith(("layer5.", "base_resnet.base.layer4.")))


def test_wrong_dataset_is_an_error(tmp_path):
    released, _, _ = fake_released("sysu")
    src = str(tmp_path / "sysu.t")
    torch.save(released, src)
    with pytest.raises(ConversionFailed, match="MFA3"):
        convert(src, str(tmp_path / "out.pth"), "regdb", log=lambda line: None)
    with pytest.raises(ConversionFailed, match="--num-classes 206"):
        convert(src, str(tmp_path / "out.pth"), "sysu", num_classes=206, log=lambda line: None)
    assert not os.path.exists(tmp_path / "out.pth")


def test_unknown_key_is_an_error(tmp_path):
    released, _, _ = fake_released("regdb")
    released["DEE.FC99.weight"] = torch.zeros(3)
    released["extra_head.weight"] = torch.zeros(3)
    src = str(tmp_path / "bad.t")
    torch.save({"net": released}, src)
    with pytest.raises(ConversionFailed) as info:
        convert(src, str(tmp_path / "out.pth"), "regdb", log=lambda line: None)
    assert "extra_head.weight" in str(info.value) and "FC99" in str(info.value)


def test_refuses_arbitrary_pickles_unless_unsafe(tmp_path, capsys):
    src = str(tmp_path / "args.t")
    torch.save({"net": {"classifier.weight": torch.zeros(2, 3)}, "args": argparse.Namespace(lr=0.1)}, src)
    with pytest.raises(ConversionFailed, match="--unsafe-load"):
        convert(src, str(tmp_path / "out.pth"), "regdb", log=lambda line: None)
    # Unpickled on request; the tiny state dict then fails the mapping instead.
    with pytest.raises(ConversionFailed, match="does not fit"):
        convert(src, str(tmp_path / "out.pth"), "regdb", unsafe=True, log=lambda line: None)
    assert "weights_only=False" in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    src = str(tmp_path / "junk.t")
    torch.save({"epoch": 3}, src)
    with pytest.raises(ConversionFailed, match="no released state dict"):
        convert(src, str(tmp_path / "out.pth"), "sysu", log=lambda line: None)


def test_cli_errors_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "missing.t"), str(tmp_path / "out.pth"), "--dataset", "llcm"])
    assert info.value.code == 2
    assert "not found" in capsys.readouterr().err
