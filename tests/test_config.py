"""Config system: defaults, _BASE_ inheritance, overrides, version-1 key names, method
presets, validation of enumerated values, and the errors users see."""
import argparse
import glob
import os
import re

import pytest

from utils.config import (
    CHOICES,
    CONFIG_DIR,
    RENAMES,
    ConfigError,
    add_config_arguments,
    build_config,
    config_from_args,
    config_from_string,
    default_output_dir,
    get_default_config,
    is_config_key,
    merge_from_file,
    merge_from_list,
    method_names,
)

DATASETS = ["sysu", "regdb", "llcm", "demo"]
PRESETS = sorted(os.path.relpath(p, CONFIG_DIR) for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"),
                                                                     recursive=True))


def lookup(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_configs_load(name):
    cfg = build_config(name)
    assert cfg.DATASET.NAME == name
    assert cfg.DATASET.ROOT.startswith("datasets/")
    assert not os.path.isabs(cfg.DATASET.ROOT)


def test_base_inheritance_chain():
    # regdb.yaml -> llcm.yaml -> sysu.yaml
    cfg = build_config("regdb")
    assert cfg.INPUT.SIZE_TRAIN == [384, 144]  # from llcm.yaml
    assert cfg.INPUT.COLOR_JITTER == []  # from llcm.yaml
    assert cfg.MODEL.CMFN.MBUE_AFTER == "layer2"  # regdb.yaml itself
    assert cfg.LOSS.CMFN.DCL_MILESTONES == [6]
    sysu = build_config("sysu")
    assert sysu.INPUT.COLOR_JITTER == [0.5, 0.5, 0.5, 0.5]
    assert sysu.LOSS.CMFN.DCL_WEIGHTS == [0.1, 0.01, 0.0]


def test_user_file_with_relative_base(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("SOLVER:\n  MAX_EPOCHS: 7\n  BASE_LR: 0.05\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("_BASE_: ../parent.yaml\nSOLVER:\n  MAX_EPOCHS: 3\n")
    cfg = build_config("sysu", str(child))
    assert cfg.SOLVER.MAX_EPOCHS == 3
    assert cfg.SOLVER.BASE_LR == 0.05


def test_overrides_and_int_to_float():
    cfg = build_config("sysu", opts=["OUTPUT_DIR", "runs/x", "SOLVER.MAX_EPOCHS", "2", "SOLVER.BASE_LR", "1",
                                     "TEST.RERANK", "True", "INPUT.SIZE_TRAIN", "[64, 32]"])
    assert cfg.OUTPUT_DIR == "runs/x"
    assert cfg.SOLVER.MAX_EPOCHS == 2
    assert isinstance(cfg.SOLVER.BASE_LR, float) and cfg.SOLVER.BASE_LR == 1.0
    assert cfg.TEST.RERANK is True
    assert cfg.INPUT.SIZE_TRAIN == [64, 32]
    assert cfg.is_frozen()


def test_string_key_keeps_numeric_looking_text():
    cfg = build_config("sysu", opts=["OUTPUT_DIR", "123"])
    assert cfg.OUTPUT_DIR == "123"


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_EPOCH.*did you mean MAX_EPOCHS"):
        build_config("sysu", opts=["SOLVER.MAX_EPOCH", "2"])
    with pytest.raises(ConfigError, match="NOPE.X"):
        build_config("sysu", opts=["NOPE.X", "2"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_EPOCHS expects int"):
        build_config("sysu", opts=["SOLVER.MAX_EPOCHS", "two"])
    with pytest.raises(ConfigError, match=r"TEST\.FLIP expects bool"):
        build_config("sysu", opts=["TEST.FLIP", "1"])


def test_bad_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  MAX_EPOCHZ: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*SOLVER.MAX_EPOCHZ"):
        merge_from_file(get_default_config(), str(bad))
    with pytest.raises(ConfigError, match="config file not found"):
        merge_from_file(get_default_config(), str(tmp_path / "missing.yaml"))
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("INPUT:\n  SIZE_TRAIN: 5\n")
    with pytest.raises(ConfigError, match="type.yaml.*INPUT.SIZE_TRAIN expects list"):
        merge_from_file(get_default_config(), str(wrong_type))


def test_base_cycle_detected(tmp_path):
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        merge_from_file(get_default_config(), str(tmp_path / "a.yaml"))


def test_unknown_dataset_lists_available():
    with pytest.raises(ConfigError, match="available: demo, llcm, regdb, sysu"):
        build_config("market")


def test_odd_override_list():
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        merge_from_list(get_default_config(), ["SOLVER.MAX_EPOCHS"])


def test_roundtrip_through_yaml_text():
    cfg = build_config("regdb", opts=["SOLVER.MAX_EPOCHS", "5"])
    assert config_from_string(cfg.dump()) == cfg


def test_default_output_dir():
    assert default_output_dir(build_config("sysu")) == os.path.join("runs", "sysu")
    assert default_output_dir(build_config("regdb", opts=["DATASET.TRIAL", "7"])) == os.path.join("runs", "regdb_trial7")
    assert default_output_dir(build_config("sysu", opts=["OUTPUT_DIR", "x/y"])) == "x/y"
    # other methods than cmfn are prefixed with the method
    assert default_output_dir(build_config("sysu", method="ivreid")) == os.path.join("runs", "ivreid_sysu")
    assert default_output_dir(build_config("regdb", method="ivreid", opts=["DATASET.TRIAL", "3"])) == \
        os.path.join("runs", "ivreid_regdb_trial3")


# Version-1 key names ---------------------------------------------------------------------------

def test_rename_table_maps_old_names_onto_current_keys():
    """Every version-1 name is gone from the defaults, still accepted, and its target exists."""
    defaults = get_default_config()
    # the CMFN keys of version 1, at the root of MODEL and LOSS
    assert set(RENAMES) == {"MODEL." + k for k in (
        "MBUE_AFTER", "DROPOUT", "DROP_PATH", "NUM_HEADS", "WINDOW_SIZE", "SHIFT_SIZE", "MLP_RATIO", "FIX.SWIN",
        "FIX.CONTEXT_PATH", "FIX.DEPTHWISE_IRMLP", "FIX.SEPARATE_COMPRESSION")} | {"LOSS." + k for k in (
            "CPM_WEIGHT", "CPM_MARGIN", "ORT_WEIGHT", "DCL_WEIGHTS", "DCL_MILESTONES")}
    for old, new in RENAMES.items():
        assert new.startswith(("MODEL.CMFN.", "LOSS.CMFN.")) and new.split(".", 2)[2] == old.split(".", 1)[1]
        with pytest.raises(KeyError):
            lookup(defaults, old)
        lookup(defaults, new)
        assert is_config_key(old) and is_config_key(new)


def _other_value(default):
    """A command-line value of the type of `default` that differs from it."""
    if isinstance(default, bool):
        return str(not default)
    if isinstance(default, (int, float)):
        return str(default + 1)
    if isinstance(default, list):
        return str([0.5] * (len(default) + 1))
    return "layer2" if default == "layer3" else default + "_x"


@pytest.mark.parametrize("old", sorted(RENAMES))
def test_old_name_on_the_command_line(old):
    new = RENAMES[old]
    default = lookup(get_default_config(), new)
    value = _other_value(default)
    cfg = merge_from_list(get_default_config(), [old, value])
    assert lookup(cfg, new) != default
    assert lookup(cfg, new) == lookup(merge_from_list(get_default_config(), [new, value]), new)


def test_old_names_in_a_yaml_file(tmp_path):
    old = tmp_path / "v1.yaml"
    old.write_text("MODEL:\n  MBUE_AFTER: layer2\n  DROPOUT: 0.2\n  NUM_HEADS: 8\n"
                   "  FIX:\n    SWIN: true\n    SEPARATE_COMPRESSION: true\n"
                   "LOSS:\n  CPM_WEIGHT: 0.5\n  ORT_WEIGHT: 0\n  DCL_WEIGHTS: [0.2, 0.0]\n  DCL_MILESTONES: [3]\n")
    cfg = build_config("sysu", str(old))
    model, loss = cfg.MODEL.CMFN, cfg.LOSS.CMFN
    assert (model.MBUE_AFTER, model.DROPOUT, model.NUM_HEADS) == ("layer2", 0.2, 8)
    assert (model.FIX.SWIN, model.FIX.SEPARATE_COMPRESSION, model.FIX.CONTEXT_PATH) == (True, True, False)
    assert (loss.CPM_WEIGHT, loss.ORT_WEIGHT, loss.DCL_WEIGHTS, loss.DCL_MILESTONES) == (0.5, 0.0, [0.2, 0.0], [3])
    assert isinstance(loss.ORT_WEIGHT, float)
    # the same file in the current layout gives the same config
    new = tmp_path / "v2.yaml"
    new.write_text("MODEL:\n  CMFN:\n    MBUE_AFTER: layer2\n    DROPOUT: 0.2\n    NUM_HEADS: 8\n"
                   "    FIX:\n      SWIN: true\n      SEPARATE_COMPRESSION: true\n"
                   "LOSS:\n  CMFN:\n    CPM_WEIGHT: 0.5\n    ORT_WEIGHT: 0\n    DCL_WEIGHTS: [0.2, 0.0]\n"
                   "    DCL_MILESTONES: [3]\n")
    assert build_config("sysu", str(new)) == cfg
    # an unknown key under a renamed node is reported under its current name
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  FIX:\n    SWINN: true\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key MODEL\.CMFN\.FIX\.SWINN"):
        build_config("sysu", str(bad))


def test_old_names_in_a_stored_config_text():
    """A checkpoint's config text written before CONFIG_VERSION 2."""
    cfg = config_from_string("MODEL:\n  NAME: cmfn\n  MBUE_AFTER: layer2\n  FIX:\n    SWIN: true\n"
                             "LOSS:\n  DCL_MILESTONES: [6]\n")
    assert cfg.CONFIG_VERSION == 2
    assert cfg.MODEL.CMFN.MBUE_AFTER == "layer2" and cfg.MODEL.CMFN.FIX.SWIN is True
    assert cfg.LOSS.CMFN.DCL_MILESTONES == [6]


# Method presets --------------------------------------------------------------------------------

def test_method_presets():
    assert {"cmfn", "ivreid"} <= set(method_names())
    assert method_names() == sorted(d for d in os.listdir(CONFIG_DIR) if os.path.isdir(os.path.join(CONFIG_DIR, d)))
    ivreid = build_config("sysu", method="ivreid")
    assert (ivreid.METHOD, ivreid.MODEL.NAME, ivreid.LOSS.NAME, ivreid.SOLVER.OPTIMIZER) == \
        ("ivreid", "ivreid", "ivreid", "adam")
    regdb = build_config("regdb", method="ivreid")  # ivreid/regdb.yaml -> ivreid/sysu.yaml
    assert (regdb.METHOD, regdb.MODEL.NAME, regdb.DATASET.NAME, regdb.LOSS.TRI_MARGIN) == \
        ("ivreid", "ivreid", "regdb", 0.2)
    assert regdb.LOSS.IVREID.KL_REDUCTION == "mean"
    # the method defaults to cmfn, whose presets are also configs/<dataset>.yaml
    for dataset in DATASETS:
        cfg = build_config(dataset, method="cmfn")
        assert cfg.METHOD == "cmfn" and cfg.MODEL.NAME == "cmfn"
        assert build_config(dataset) == cfg
        assert build_config(None, os.path.join(CONFIG_DIR, dataset + ".yaml")) == cfg


def _datasets_of(method):
    return ", ".join(sorted(f[:-len(".yaml")] for f in os.listdir(os.path.join(CONFIG_DIR, method))
                            if f.endswith(".yaml")))


def test_unknown_method_or_dataset_lists_what_exists():
    with pytest.raises(ConfigError, match=r"no method 'nope' \(expected a folder .*nope\); available: %s$"
                                          % ", ".join(method_names())):
        build_config("sysu", method="nope")
    assert "llcm" not in _datasets_of("ivreid").split(", ")
    with pytest.raises(ConfigError, match=r"method ivreid has no config for dataset 'llcm' \(expected .*%s\); "
                                          r"available: %s$" % (re.escape(os.path.join("ivreid", "llcm.yaml")),
                                                               _datasets_of("ivreid"))):
        build_config("llcm", method="ivreid")
    assert _datasets_of("cmfn") == "demo, llcm, regdb, sysu"
    with pytest.raises(ConfigError, match=r"method cmfn has no config for dataset 'market'.*"
                                          r"available: demo, llcm, regdb, sysu$"):
        build_config("market", method="cmfn")


def _from_command_line(*argv):
    return config_from_args(add_config_arguments(argparse.ArgumentParser()).parse_args(list(argv)))


def test_method_and_dataset_on_the_command_line(tmp_path):
    assert _from_command_line() == build_config("sysu", method="cmfn")
    assert _from_command_line("--method", "ivreid") == build_config("sysu", method="ivreid")
    assert _from_command_line("--dataset", "regdb") == build_config("regdb", method="cmfn")
    cfg = _from_command_line("--method", "ivreid", "--dataset", "regdb", "SOLVER.MAX_EPOCHS", "3")
    assert (cfg.METHOD, cfg.DATASET.NAME, cfg.SOLVER.MAX_EPOCHS) == ("ivreid", "regdb", 3)
    # --config alone: the defaults and the file, no preset
    own = tmp_path / "own.yaml"
    own.write_text("DATASET:\n  NAME: llcm\n")
    cfg = _from_command_line("--config", str(own))
    assert cfg.DATASET.NAME == "llcm" and cfg.INPUT.SIZE_TRAIN == [384, 192]
    # --config after a preset
    cfg = _from_command_line("--method", "ivreid", "--config", str(own))
    assert (cfg.METHOD, cfg.DATASET.NAME) == ("ivreid", "llcm")
    with pytest.raises(ConfigError, match="no method 'ivried'.*available: cmag, cmfn, fusionreid, fusionreid_vi, ivreid, tokenmatcher"):
        _from_command_line("--method", "ivried")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_and_validates(preset):
    path = os.path.join(CONFIG_DIR, preset)
    cfg = build_config(None, path)  # validated: every enumerated value and registered name
    folder, name = os.path.split(preset)
    dataset = name[:-len(".yaml")]
    assert cfg.DATASET.NAME == dataset
    assert cfg.METHOD == (folder or "cmfn")
    assert cfg.DATASET.ROOT.startswith("datasets/")
    assert build_config(dataset, method=folder or "cmfn") == cfg
    assert config_from_string(cfg.dump()) == cfg


# Validation of enumerated values ---------------------------------------------------------------

REGISTERED = ("MODEL.NAME", "LOSS.NAME", "DATASET.NAME", "DATALOADER.SAMPLER", "SOLVER.OPTIMIZER",
              "SOLVER.SCHEDULER")


@pytest.mark.parametrize("key", sorted(CHOICES) + list(REGISTERED) + ["TEST.FEATURE"])
def test_enumerated_value_outside_its_choices_names_the_key(key):
    bad = "3" if key == "MODEL.LAST_STRIDE" else "foo"
    with pytest.raises(ConfigError, match=re.escape(key)):
        build_config("sysu", opts=[key, bad])
    # not validated on request (a stored config is checked by whoever reads it)
    assert str(lookup(build_config("sysu", opts=[key, bad], validate=False), key)) == bad


def test_validation_messages():
    with pytest.raises(ConfigError, match=r"TEST\.DISTANCE must be one of cosine, euclidean, sqeuclidean, got 'foo'"):
        build_config("sysu", opts=["TEST.DISTANCE", "foo"])
    with pytest.raises(ConfigError, match=r"SOLVER\.OPTIMIZER 'foo' is not a registered optimizer "
                                          r"\(known: adam, adamw, sgd\)"):
        build_config("sysu", opts=["SOLVER.OPTIMIZER", "foo"])
    with pytest.raises(ConfigError, match=r"DATALOADER\.SAMPLER 'foo' is not a registered sampler.*cross_modality"):
        build_config("sysu", opts=["DATALOADER.SAMPLER", "foo"])
    with pytest.raises(ConfigError, match=r"TEST\.FEATURE 'foo' is not an embedding of the cmfn model "
                                          r"\(known: sum6, mix, orig, pool, bn; empty = its default sum6\)"):
        build_config("sysu", opts=["TEST.FEATURE", "foo"])
    with pytest.raises(ConfigError, match=r"TEST\.SHOTS must be >= 1, got 0"):
        build_config("sysu", opts=["TEST.SHOTS", "0"])


def test_embedding_preset_is_checked_against_the_model():
    for feature in ("sum6", "mix", "orig", "pool", "bn"):
        assert build_config("sysu", opts=["TEST.FEATURE", feature]).TEST.FEATURE == feature
        assert build_config("sysu", opts=["MODEL.NAME", "baseline", "TEST.FEATURE", feature]).TEST.FEATURE == feature
    assert build_config("sysu", method="ivreid", opts=["TEST.FEATURE", "pool"]).TEST.FEATURE == "pool"
    with pytest.raises(ConfigError, match=r"TEST\.FEATURE 'sum6' is not an embedding of the ivreid model"):
        build_config("sysu", method="ivreid", opts=["TEST.FEATURE", "sum6"])
    # test.py checks it against the model of the checkpoint instead
    cfg = build_config("sysu", method="ivreid", opts=["TEST.FEATURE", "sum6"], check_feature=False)
    assert cfg.TEST.FEATURE == "sum6"


def test_every_default_key_is_commented():
    """Each key in utils/config.py is preceded by a comment line (documented where defined)."""
    import inspect

    import utils.config as config_module

    lines = inspect.getsource(config_module).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("_C.") and "= CN()" not in line:
            j = i - 1
            while j >= 0 and lines[j].startswith("_C.") and "= CN()" not in lines[j]:
                j -= 1
            assert lines[j].lstrip().startswith("#"), "undocumented config key: " + line
