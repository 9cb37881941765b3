"""Shared fixtures: small synthetic datasets in the real on-disk layouts (session-scoped).

``synthetic_root(layout, **params)`` returns the root of a generated dataset (generated once
per session for each distinct (layout, params)); treat it as read-only and copy it
(``shutil.copytree``) before modifying anything. Parameters are those of
``data.synthetic.write_sysu`` / ``write_regdb`` / ``write_llcm`` (``seed`` included), plus for
SYSU ``preprocess=(W, H)`` to also write the training arrays.

``tiny_demo_cfg`` is a frozen demo config whose DATASET.ROOT is a session temp folder with a
small demo dataset (12 training + 8 test ids, 64x128 images) already generated.

``one_thread`` (module-scoped) holds torch at one intra-op thread for the module: the golden
files were made at one thread, the spawned training runs use ``OMP_NUM_THREADS=1`` (same kernels,
same bits), and many small ops run faster on one thread of a shared 2-core machine.
"""
import os

import pytest

from data.synthetic import write_llcm, write_regdb, write_sysu
from data.synthetic_market import write_duke, write_market, write_msmt17
from ivreid_golden import torch_threads

SMALL = {
    "sysu": dict(num_train=4, num_val=2, num_test=6, seed=0, images_per_cam=3),
    "regdb": dict(num_ids=6, seed=0, images_per_id=3),
    "llcm": dict(num_train=4, num_test=4, seed=0, images_per_cam=2),
    "market": dict(num_train=4, num_test=4, seed=0, images_per_cam=2, num_distractors=2, num_junk=1),
    "duke": dict(num_train=4, num_test=4, seed=0, images_per_cam=2, num_distractor_ids=1),
    "msmt17": dict(num_train=4, num_test=4, seed=0, images_per_cam=2),
}
_WRITERS = {"sysu": write_sysu, "regdb": write_regdb, "llcm": write_llcm, "market": write_market, "duke": write_duke,
            "msmt17": write_msmt17}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    cache = {}

    def make(layout, **params):
        preprocess = params.pop("preprocess", None)
        merged = dict(SMALL[layout], **params)
        key = (layout, tuple(sorted(merged.items())), tuple(preprocess) if preprocess else None)
        if key not in cache:
            root = str(tmp_path_factory.mktemp("%s_cam_data" % layout) / layout.upper())
            _WRITERS[layout](root, **merged)
            if preprocess:
                from data.datasets.sysu import preprocess_sysu

                preprocess_sysu(root, tuple(preprocess), progress=False)
            cache[key] = root
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_demo_cfg(tmp_path_factory):
    from data.datasets.demo import ensure_demo_dataset
    from utils.config import build_config

    root = os.path.join(str(tmp_path_factory.mktemp("demo")), "demo")
    cfg = build_config("demo", opts=[
        "DATASET.ROOT", root, "DATASET.DEMO_TRAIN_IDS", "12", "DATASET.DEMO_TEST_IDS", "8",
        "DATALOADER.NUM_WORKERS", "0", "DATALOADER.NUM_IDS", "4", "DATALOADER.NUM_POS", "2",
    ])
    ensure_demo_dataset(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory):
    """The root of the demo dataset of tests/tiny_train.py (10 + 6 ids, arrays at 64x32),
    generated once for the session; the train.py tests pass it as DATASET.ROOT."""
    from data.datasets.demo import ensure_demo_dataset
    from tiny_train import BASE
    from utils.config import build_config

    root = str(tmp_path_factory.mktemp("tiny_demo") / "demo")
    keys = ("DATASET.DEMO_TRAIN_IDS", "DATASET.DEMO_TEST_IDS", "INPUT.SIZE_TRAIN")
    ensure_demo_dataset(build_config("demo", opts=["DATASET.ROOT", root] + [str(x) for k in keys for x in (k, BASE[k])]))
    return root


@pytest.fixture(autouse=True)
def no_network_download(monkeypatch):
    """No test may download (ImageNet weights go through torch.hub): a download fails the test."""
    import torch

    def refuse(url, *args, **kwargs):
        raise AssertionError("a test tried to download %s" % url)

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):
        yield
