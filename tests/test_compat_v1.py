"""Configs and checkpoints written before the multi-method layout (config version 1) still load.

The checkpoints in tests/golden/legacy/ were written by ``make_checkpoint`` of that code
(the generator is tests/golden/legacy/make_fixture_v1.py): their config text keeps the CMFN
keys at the root of MODEL and LOSS, and their model keys are that code's. Their tensors are
stored as zeros and regenerated here by the generator's per-key rule (tests/legacy_rule.py); ``features_v1.pt``
holds the eval outputs that code computed from those weights on the rule images, which the
model loaded by today's ``load_model`` must reproduce to float32 rounding (1e-6: today's blocks
order some sums differently; a wrong key mapping changes the outputs by orders of magnitude more).
"""
import os

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from legacy_rule import images, rule
from model import load_model
from utils.config import build_config, config_from_string, merge_from_file, get_default_config
from utils.errors import ConfigError

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "legacy")
CASES = ("cmfn_sysu", "cmfn_regdb", "baseline_regdb")


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(LEGACY, "features_v1.pt"), weights_only=True)["cases"]


@pytest.mark.parametrize("case", CASES)
def test_v1_checkpoint_gives_identical_features(case, expected, tmp_path):
    torch.set_num_threads(1)
    ckpt = load_checkpoint(os.path.join(LEGACY, "%s_skeleton.pth" % case))
    assert "CONFIG_VERSION" not in ckpt["config"] and "MBUE_AFTER" in ckpt["config"]
    ckpt["model"] = {k: rule(k, tuple(v.shape), v.dtype) for k, v in ckpt["model"].items()}
    path = str(tmp_path / "v1.pth")
    save_checkpoint(path, ckpt)
    model = load_model(path)
    copies = expected[case]["num_copies"]
    with torch.no_grad():
        for modality in ("visible", "infrared"):
            sets = model(images("input_" + modality), modality=modality)
            old = expected[case]["features"][modality]
            names = model.embedding_sets
            assert len(names) == 2 * copies
            for c in range(copies):
                # float reassociation of the faster blocks moves values by ~1e-7; a wrong
                # mapping of any tensor moves them by far more than 1e-6
                torch.testing.assert_close(sets[names[2 * c]], old["pool"][4 * c:4 * (c + 1)], rtol=0, atol=1e-6)
                torch.testing.assert_close(sets[names[2 * c + 1]], old["bn"][4 * c:4 * (c + 1)], rtol=0, atol=1e-6)


def test_v1_config_text_is_renamed():
    ckpt = load_checkpoint(os.path.join(LEGACY, "cmfn_regdb_skeleton.pth"))
    cfg = config_from_string(ckpt["config"])
    assert cfg.MODEL.CMFN.MBUE_AFTER == "layer2"
    assert cfg.LOSS.CMFN.DCL_WEIGHTS == [0.1, 0.01] and cfg.LOSS.CMFN.DCL_MILESTONES == [6]
    assert cfg.CONFIG_VERSION == 2


def test_v1_yaml_file_and_overrides_are_renamed(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("_BASE_: %s\nMODEL:\n  MBUE_AFTER: layer2\n  FIX:\n    SWIN: true\nLOSS:\n  ORT_WEIGHT: 0.5\n"
                    % os.path.join(os.path.dirname(LEGACY), "..", "..", "configs", "cmfn", "sysu.yaml"))
    cfg = build_config(config_file=str(path), opts=["MODEL.DROP_PATH", "0.2", "LOSS.DCL_MILESTONES", "[3, 4]"])
    assert cfg.MODEL.CMFN.MBUE_AFTER == "layer2" and cfg.MODEL.CMFN.FIX.SWIN is True
    assert cfg.LOSS.CMFN.ORT_WEIGHT == 0.5 and cfg.MODEL.CMFN.DROP_PATH == 0.2
    assert cfg.LOSS.CMFN.DCL_MILESTONES == [3, 4]


def test_unknown_key_still_fails_with_its_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  MBUE_AFTERR: layer2\n")
    with pytest.raises(ConfigError, match="MODEL.MBUE_AFTERR"):
        merge_from_file(get_default_config(), str(path))
