"""Released TokenMatcher / CMAG checkpoints -> this project's encoder (model/tokenmatcher/convert.py).

* every key of the released layouts (``state_dict_keys.txt`` K=4, ``state_dict_keys_regdb.txt``
  K=6; ``module.`` prefixes) is mapped or dropped as never used, and the mapped dict loads
  strictly into the encoder of the geometry read off the file;
* a file written as the released scripts write it (``{'state_dict', 'epoch', 'best_mAP'}`` with
  a numpy float32 / float64 ``best_mAP``, under numpy 2 and numpy 1 pickle names) is read with
  ``weights_only=True`` and, converted, gives the golden eval features (recipe weights of
  ``encoder_k6_depth2.pt``);
* files holding any other Python object are refused without running it; keys outside the
  layout and a geometry that does not fit the model are clear errors.
"""
import math
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError
from model.tokenmatcher.convert import (DROPPED, convert_state_dict, load_released_encoder, project_key,
                                        read_released_checkpoint)
from model.tokenmatcher.encoder import TokenMatcherEncoder

from test_tokenmatcher_encoder import EVAL_TOL, GOLDEN, golden, recipe_state

KEY_FILES = {"sysu": ("state_dict_keys.txt", 4), "regdb": ("state_dict_keys_regdb.txt", 6)}


def released_keys(name):
    """[(key with module., shape, dtype, role)] of a released layout file."""
    rows = [line.split() for line in open(os.path.join(GOLDEN, name)) if not line.startswith("#")]
    return [(key, tuple(int(s) for s in shape.split("x")) if shape != "scalar" else (), dtype, role)
            for _, key, shape, dtype, role in rows]


def meta_state(rows):
    return OrderedDict((key, torch.empty(shape, dtype=getattr(torch, dtype), device="meta"))
                       for key, shape, dtype, _ in rows)


@pytest.mark.parametrize("dataset", sorted(KEY_FILES))
def test_every_released_key_is_mapped_or_dropped_and_loads_strictly(dataset):
    name, k = KEY_FILES[dataset]
    rows = released_keys(name)
    assert all(key.startswith("module.") for key, _, _, _ in rows)
    mapped, info = convert_state_dict(meta_state(rows))
    assert (info["num_tokens"], info["depth"], info["embed_dim"]) == (k, 12, 768)
    roles = {key[len("module."):]: role for key, _, _, role in rows}
    # dropped: what never runs (blocks.11, norm, and the whole BatchNorm template `bottleneck`)
    never_run = {key for key, role in roles.items() if role in ("unused", "buffer-unused")} | {"bottleneck.bias"}
    assert set(info["dropped"]) == never_run
    assert all(roles[key] != "used" and roles[key] != "buffer" for key in info["dropped"])
    assert len(mapped) + len(info["dropped"]) == len(rows)
    with torch.device("meta"):
        model = TokenMatcherEncoder(num_tokens=k)
    own = model.state_dict()
    assert sorted(mapped) == sorted(own)
    assert all(mapped[key].shape == own[key].shape and mapped[key].dtype == own[key].dtype for key in own)
    model.load_state_dict(mapped, strict=True, assign=True)
    # the trainable tensors are exactly the released 'used' ones, the frozen ones its head biases
    used = sum(math.prod(shape) for key, shape, _, role in rows if role == "used")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == used


def test_key_mapping_examples():
    assert project_key("visible_module.visible.conv.1.IN.weight", 12) == "stems.visible.conv.1.inorm.weight"
    assert project_key("thermal_module.thermal.conv.4.BN.running_var", 12) == "stems.infrared.conv.4.bnorm.running_var"
    assert project_key("thermal_module.thermal.conv.7.weight", 12) == "stems.infrared.conv.7.weight"
    assert project_key("b1.0.attn.qkv.bias", 12) == "last_block.attn.qkv.bias"
    assert project_key("b1.1.weight", 12) == "last_norm.weight"
    assert project_key("bottlenecks.5.running_mean", 12) == "token_bns.5.running_mean"
    assert project_key("blocks.10.mlp.fc2.weight", 12) == "blocks.10.mlp.fc2.weight"
    assert project_key("blocks.11.mlp.fc2.weight", 12) == DROPPED
    assert project_key("blocks.1.norm1.weight", 2) == DROPPED
    assert project_key("blocks.12.norm1.weight", 12) is None
    assert project_key("classifier.weight", 12) is None


@pytest.fixture(scope="module")
def k6_case():
    case = golden("encoder_k6_depth2.pt")
    return case, recipe_state(case)


def save_released(path, reference, best, epoch=34, legacy=False):
    state = OrderedDict(("module." + key, value) for key, value in reference.items())
    torch.save({"state_dict": state, "epoch": epoch, "best_mAP": best}, path,
               _use_new_zipfile_serialization=not legacy)


def test_released_file_converts_to_the_golden_eval_features(k6_case, tmp_path):
    case, reference = k6_case
    path = str(tmp_path / "model_best.pth.tar")
    save_released(path, reference, np.float32(0.8643))
    with torch.device("meta"):
        model = TokenMatcherEncoder(num_tokens=6, depth=2)
    model.to_empty(device="cpu")
    info = load_released_encoder(model, path)
    assert (info["num_tokens"], info["depth"], info["epoch"]) == (6, 2, 34)
    assert type(info["best_mAP"]) is float and info["best_mAP"] == float(np.float32(0.8643))
    assert len(info["dropped"]) == 19
    model.eval()
    x = case["inputs"]["x"]
    with torch.no_grad():
        feat = model.embed(torch.cat([x, x]), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(feat[:2], case["outputs_eval"]["modal1"], **EVAL_TOL)
    torch.testing.assert_close(feat[2:], case["outputs_eval"]["modal2"], **EVAL_TOL)


def tiny_reference_state():
    """A released-layout state dict of a tiny depth-2 encoder (built here, renamed back)."""
    torch.manual_seed(0)
    model = TokenMatcherEncoder(img_size=(64, 32), num_tokens=2, embed_dim=16, depth=2, num_heads=2, stem_width=8)
    back = {"stems.visible.": "visible_module.visible.", "stems.infrared.": "thermal_module.thermal.",
            "last_block.": "b1.0.", "last_norm.": "b1.1.", "token_bns.": "bottlenecks."}
    out = OrderedDict()
    for key, value in model.state_dict().items():
        for new, old in back.items():
            if key.startswith(new):
                key = old + key[len(new):].replace(".inorm.", ".IN.").replace(".bnorm.", ".BN.")
        out[key] = value
    out["blocks.1.norm1.weight"] = torch.ones(16)  # the original of b1, never run
    out["norm.weight"] = torch.ones(16)
    return model, out


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_numpy_float64_best_map_is_read_without_unsafe_unpickling(tmp_path, legacy):
    model, reference = tiny_reference_state()
    path = str(tmp_path / "stage1.pth.tar")
    save_released(path, reference, np.float64(0.6279), epoch=49, legacy=legacy)
    released = read_released_checkpoint(path)
    assert released["epoch"] == 49 and released["best_mAP"] == 0.6279 and type(released["best_mAP"]) is float
    assert list(released["state_dict"]) == list(reference)
    mapped, info = convert_state_dict(released["state_dict"])
    assert info["dropped"] == ["blocks.1.norm1.weight", "norm.weight"]
    assert all(torch.equal(mapped[k], v) for k, v in model.state_dict().items())


def test_numpy1_scalar_name_is_accepted(tmp_path):
    """Files pickled under numpy 1 name the reconstructor numpy.core.multiarray.scalar."""
    _, reference = tiny_reference_state()
    path = str(tmp_path / "np1.pth.tar")
    save_released(path, reference, np.float32(0.5), legacy=True)
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.count(b"cnumpy._core.multiarray\nscalar") == 1
    with open(path, "wb") as f:
        f.write(raw.replace(b"cnumpy._core.multiarray\nscalar", b"cnumpy.core.multiarray\nscalar"))
    assert read_released_checkpoint(path)["best_mAP"] == 0.5


class Payload:
    def __reduce__(self):
        return (print, ("payload executed",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_file_with_other_python_objects_is_refused_without_running_them(tmp_path, capsys, legacy):
    _, reference = tiny_reference_state()
    path = str(tmp_path / "evil.pth.tar")
    torch.save({"state_dict": reference, "epoch": 1, "best_mAP": Payload()}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="print"):
        read_released_checkpoint(path)
    assert "payload executed" not in capsys.readouterr().out
    torch.save({"state_dict": reference, "best_mAP": np.array([0.5])}, path)  # an array, not a scalar
    with pytest.raises(CheckpointError, match="numpy"):
        read_released_checkpoint(path)


def test_unknown_keys_and_wrong_geometry_are_clear_errors(tmp_path):
    model, reference = tiny_reference_state()
    reference["classifier.weight"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match="classifier.weight"):
        convert_state_dict(reference)
    del reference["classifier.weight"]
    path = str(tmp_path / "tiny.pth.tar")
    save_released(path, reference, np.float32(0.1))
    wrong = TokenMatcherEncoder(img_size=(64, 32), num_tokens=3, embed_dim=16, depth=2, num_heads=2, stem_width=8)
    with pytest.raises(CheckpointError, match="K=2, depth 2, width 16.*does not fit"):
        load_released_encoder(wrong, path)
    with pytest.raises(CheckpointError, match="not found"):
        read_released_checkpoint(str(tmp_path / "missing.pth.tar"))
    torch.save({"state_dict": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="holds no encoder state dict"):
        read_released_checkpoint(path)
