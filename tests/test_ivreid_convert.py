"""Saved models of the IV-REID reference code: restricted loading, key mapping, bias folding, CLI.

tests/golden/ivreid/checkpoint_skeleton_sysu{,_legacy}.pth are ``torch.save(model)`` of a
reference Baseline over 395 identities, in the zip and the legacy format; the i-th tensor of
its state dict (the order of state_dict_keys.txt) holds the number i in every element, so
where a tensor lands after conversion tells which key it came from.
"""
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from model.ivreid import IVReID
from model.ivreid_convert import (RefusedGlobal, convert_reference_state, load_reference_state_dict,
                                  map_reference_state_dict)
from tools.convert_official_checkpoint import main
from utils.config import config_from_string, get_default_config, merge_from_list

GOLDEN = Path(__file__).resolve().parent / "golden" / "ivreid"
SKELETONS = ["checkpoint_skeleton_sysu.pth", "checkpoint_skeleton_sysu_legacy.pth"]
AUX = ("aux_visible.", "aux_infrared.")

# Reference prefix -> this project's prefix, by the role of the module.
TO_PROJECT = (
    ("base.", "backbone."),
    ("bottleneck.", "head.bnneck."),
    ("share_classifier.", "head.classifier."),
    ("ide_net.rgb_bn.", "aux_visible.bn."),
    ("ide_net.rgb_fc1.", "aux_visible.fc1."),
    ("ide_net.rgb_fc2.", "aux_visible.fc2."),
    ("ide_net.ir_bn.", "aux_infrared.bn."),
    ("ide_net.ir_fc1.", "aux_infrared.fc1."),
    ("ide_net.ir_fc2.", "aux_infrared.fc2."),
)
# Conv bias -> running mean of the BatchNorm right after that conv, one of each kind.
FOLDS = {
    "base.conv1.bias": "base.bn1.running_mean",
    "base.layer1.0.conv2.bias": "base.layer1.0.bn2.running_mean",
    "base.layer2.0.downsample.0.bias": "base.layer2.0.downsample.1.running_mean",
    "base.layer4.2.conv3.bias": "base.layer4.2.bn3.running_mean",
}


def renamed(key, table):
    old, new = next((old, new) for old, new in table if key.startswith(old))
    return new + key[len(old):]


def sysu_layout():
    """[(key, shape)] of the SYSU Baseline section of state_dict_keys.txt."""
    rows, inside = [], False
    for line in (GOLDEN / "state_dict_keys.txt").read_text().splitlines():
        if line.startswith("## "):
            inside = line.startswith("## Baseline, SYSU")
        elif inside and line and not line.startswith("#"):
            key, shape = line.split("\t")[:2]
            rows.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()]))
    return rows


def ivreid_cfg(*opts):
    cfg = get_default_config()
    merge_from_list(cfg, ["MODEL.NAME", "ivreid", "MODEL.PRETRAINED", "False", *opts])
    return cfg


@pytest.mark.parametrize("name", SKELETONS)
def test_skeleton_loads_with_the_reference_layout(name):
    state = load_reference_state_dict(str(GOLDEN / name))
    assert [(k, list(v.shape)) for k, v in state.items()] == sysu_layout()
    for i, value in enumerate(state.values()):
        assert bool((value == i).all()), list(state)[i]


def test_conversion_puts_every_tensor_in_its_place():
    state = load_reference_state_dict(str(GOLDEN / SKELETONS[0]))
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    converted, info = convert_reference_state(state, ivreid_cfg())
    assert torch.equal(torch.rand(3), expected_draw), "the conversion moved the global RNG"
    for i, key in enumerate(state):
        assert bool((converted[renamed(key, TO_PROJECT)] == i).all()), key
    assert info["num_classes"] == 395 and info["mapped"] == 378 and info["folded_conv_biases"] == 0
    fresh = [k for k in converted if k.startswith(AUX)]
    assert info["initialised"] == fresh and len(fresh) == 18
    # Fresh heads: default BNs, kaiming-normal fan_out linears (std sqrt(2 / 512)), zero biases.
    assert torch.equal(converted["aux_visible.bn.weight"], torch.ones(2048))
    assert not converted["aux_infrared.fc1.bias"].any() and not converted["aux_infrared.fc2.bias"].any()
    assert converted["aux_visible.fc1.weight"].std().item() == pytest.approx(0.0625, rel=0.02)
    again, _ = convert_reference_state(state, ivreid_cfg())
    assert torch.equal(again["aux_infrared.fc2.weight"], converted["aux_infrared.fc2.weight"])


def test_conv_bias_folding_on_the_skeleton():
    state = load_reference_state_dict(str(GOLDEN / SKELETONS[1]))
    index = {key: i for i, key in enumerate(state)}
    mapped, folded = map_reference_state_dict(state, conv_bias=False)
    assert folded == 53 and len(mapped) == 378 - 53
    for bias, running_mean in FOLDS.items():
        assert renamed(bias, TO_PROJECT) not in mapped
        value = mapped[renamed(running_mean, TO_PROJECT)]
        assert bool((value == index[running_mean] - index[bias]).all()), running_mean
    moved = [k for k in state if renamed(k, TO_PROJECT) in mapped
             and not bool((mapped[renamed(k, TO_PROJECT)] == index[k]).all())]
    assert len(moved) == 53 and all(k.endswith("running_mean") for k in moved)


def random_tiny_model(conv_bias):
    model = IVReID.from_config(ivreid_cfg("MODEL.BACKBONE", "resnet18", "MODEL.IVREID.AUX_DIM", "8",
                                          "MODEL.IVREID.CONV_BIAS", str(conv_bias)), 5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model.double()


def test_folded_model_computes_the_same_features():
    torch.manual_seed(0)
    biased = random_tiny_model(conv_bias=True)
    reference = {renamed(k, [(new, old) for old, new in TO_PROJECT]): v for k, v in biased.state_dict().items()}
    mapped, folded = map_reference_state_dict(reference, conv_bias=False)
    assert folded == 20
    bare = random_tiny_model(conv_bias=False)
    bare.load_state_dict(mapped)
    conv_biases = {name + ".bias" for name, m in biased.named_modules() if isinstance(m, nn.Conv2d)}
    dropped = random_tiny_model(conv_bias=False)
    dropped.load_state_dict({k: v for k, v in biased.state_dict().items() if k not in conv_biases})
    x = torch.randn(4, 3, 64, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got, unfolded = biased.eval()(x), bare.eval()(x), dropped.eval()(x)
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=0, atol=1e-12), name
        # Without the fold the biases are simply lost, which changes the features.
        assert (unfolded["bn"] - want["bn"]).abs().max() > 1e-3
        # In train mode the batch means remove the biases: no fold needed, same outputs.
        want, got = biased.train()(x), dropped.train()(x)
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=0, atol=1e-10), name


@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_state_dicts_and_torch_modules(tmp_path, zip_format):
    path = tmp_path / "plain.pth"
    state = {"module.base.conv1.weight": torch.arange(6.0).view(2, 3), "module.bottleneck.running_mean": torch.ones(2)}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_reference_state_dict(str(path))
    assert list(loaded) == ["base.conv1.weight", "bottleneck.running_mean"]
    assert torch.equal(loaded["base.conv1.weight"], torch.arange(6.0).view(2, 3))
    # A whole torch.nn model pickles only torch.nn classes.
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    torch.save(net, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_reference_state_dict(str(path))
    assert list(loaded) == list(net.state_dict()) and torch.equal(loaded["0.weight"], net[0].weight.detach())


class SystemCall:
    """Unpickling calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class HubLoad:
    """Unpickling calls torch.hub.load, a torch function that can run code of its own."""

    def __reduce__(self):
        return torch.hub.load, ("someone/repo", "model")


def write(path, obj, fmt):
    if fmt == "raw":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
def test_malicious_pickles_are_refused(tmp_path, fmt):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    write(path, {"model": SystemCall("touch %s" % marker)}, fmt)
    with pytest.raises(RefusedGlobal, match=r"refusing to unpickle the global (posix|nt|os)\.system") as error:
        load_reference_state_dict(str(path))
    assert str(path) in str(error.value)
    assert not marker.exists()
    write(path, {"model": HubLoad()}, fmt)
    with pytest.raises(RefusedGlobal, match=r"torch\.hub\.load"):
        load_reference_state_dict(str(path))
    if fmt == "raw":
        # The payload is real: an unrestricted unpickler runs it.
        pickle.loads(pickle.dumps(SystemCall("touch %s" % marker), protocol=2))
        assert marker.exists()


def test_cli_writes_a_checkpoint_that_loads_weights_only(tmp_path, capsys):
    dst = tmp_path / "ivreid_sysu.pth"
    main([str(GOLDEN / SKELETONS[1]), str(dst), "--method", "ivreid", "--dataset", "sysu", "--num-classes", "395"])
    assert "wrote %s" % dst in capsys.readouterr().out
    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "cmfn-checkpoint" and ckpt["num_classes"] == 395 and ckpt["epoch"] == -1
    cfg = config_from_string(ckpt["config"])
    assert cfg.MODEL.NAME == "ivreid" and cfg.MODEL.IVREID.CONV_BIAS and not cfg.MODEL.PRETRAINED
    with torch.device("meta"):
        model = IVReID.from_config(cfg, 395)
    model.load_state_dict(ckpt["model"], assign=True)  # strict: every key, every shape
    layout = [key for key, _ in sysu_layout()]
    for i, key in enumerate(layout):
        assert bool((ckpt["model"][renamed(key, TO_PROJECT)] == i).all()), key
    assert ckpt["meta"]["mapped_tensors"] == 378
    assert ckpt["meta"]["initialised_tensors"] == [k for k in ckpt["model"] if k.startswith(AUX)]


def test_cli_errors(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    write(evil, {"model": SystemCall("true")}, "zip")
    dst = tmp_path / "out.pth"
    with pytest.raises(SystemExit) as exit_:
        main([str(evil), str(dst), "--method", "ivreid", "--dataset", "sysu"])
    assert exit_.value.code == 2
    assert "error: %s: refusing to unpickle" % evil in capsys.readouterr().err
    skeleton = str(GOLDEN / SKELETONS[0])
    for extra, message in ((["--dataset", "llcm"], "--dataset must be one of sysu, regdb"),
                           (["--dataset", "sysu", "--num-classes", "206"], "classifier over 395"),
                           (["--dataset", "sysu", "--unsafe-load"], "restricted unpickler")):
        with pytest.raises(SystemExit) as exit_:
            main([skeleton, str(dst), "--method", "ivreid"] + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not dst.exists()
