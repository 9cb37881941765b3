"""Config system: defaults, _BASE_ inheritance, overrides, and the errors users see."""
import os

import pytest

from utils.config import (
    ConfigError,
    build_config,
    config_from_string,
    default_output_dir,
    get_default_config,
    merge_from_file,
    merge_from_list,
)

DATASETS = ["sysu", "regdb", "llcm", "demo"]


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
    assert cfg.MODEL.MBUE_AFTER == "layer2"  # regdb.yaml itself
    assert cfg.LOSS.DCL_MILESTONES == [6]
    sysu = build_config("sysu")
    assert sysu.INPUT.COLOR_JITTER == [0.5, 0.5, 0.5, 0.5]
    assert sysu.LOSS.DCL_WEIGHTS == [0.1, 0.01, 0.0]


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
