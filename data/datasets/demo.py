"""The demo dataset: a synthetic SYSU-layout dataset generated on first use.

``ensure_demo_dataset(cfg)`` makes sure cfg.DATASET.ROOT holds the synthetic SYSU-MM01
tree for (DEMO_TRAIN_IDS, DEMO_TEST_IDS, DEMO_SEED) (``data/synthetic.py``; a fifth of
the training ids, at least one, go to ``exp/val_id.txt``; both are used for training as in SYSU) and its
training arrays at INPUT.SIZE_TRAIN. It is idempotent: an up-to-date root costs a few stat
calls. A new tree is generated in a temporary sibling folder and renamed into place, so
concurrent first uses never see a half-written dataset (the loser discards its copy). A
root that exists but is not a demo tree (no ``synthetic.json``) is never overwritten.
:func:`ensure_generated` is that install logic for any generated layout (the
``demo_market`` dataset uses it too).
"""
import json
import os
import shutil
import tempfile

from data.errors import DatasetError
from data.image_io import default_workers
from data.registry import DATASETS
from data.datasets.sysu import SYSUMM01, preprocess_sysu
from data.synthetic import write_sysu
from utils.config import ConfigError

# Images per (identity, camera) on average (+-2); keeps generation at a few seconds.
IMAGES_PER_CAM = 5
MANIFEST = "synthetic.json"


def demo_params(cfg):
    train_ids = int(cfg.DATASET.DEMO_TRAIN_IDS)
    num_val = max(1, train_ids // 5)
    return {"layout": "sysu", "seed": int(cfg.DATASET.DEMO_SEED), "train": train_ids - num_val, "val": num_val,
            "test": int(cfg.DATASET.DEMO_TEST_IDS), "images_per_cam": IMAGES_PER_CAM}


def _manifest(root):
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _matches(root, params):
    info = _manifest(root)
    return info is not None and all(info.get(k) == v for k, v in params.items())


def ensure_generated(root, params, generate):
    """Make `root` hold the generated tree whose manifest records `params`; returns `root`.

    `generate(folder)` writes the tree (manifest included) into an empty folder, which is
    then renamed onto `root` (module docstring: atomic, concurrent-safe, never overwriting
    a folder without a manifest). Nothing happens when the manifest already matches.
    """
    root = os.path.abspath(root)
    if not _matches(root, params):
        if os.path.isdir(root) and os.listdir(root) and _manifest(root) is None:
            raise DatasetError("%s exists and is not a generated demo dataset (no %s); refusing to overwrite it. "
                               "Point DATASET.ROOT at an empty or new folder." % (root, MANIFEST))
        parent = os.path.dirname(root)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(root) + ".", suffix=".tmp", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private 0700 would stick to the final root
        try:
            generate(tmp)
            _install(tmp, root, params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_demo_dataset(cfg, workers=None):
    """Generate/refresh the demo dataset under cfg.DATASET.ROOT; returns the root."""
    root = os.path.abspath(cfg.DATASET.ROOT)
    params = demo_params(cfg)
    if params["train"] < 1 or params["test"] < 1:
        raise ConfigError("DATASET.DEMO_TRAIN_IDS must be >= 2 and DEMO_TEST_IDS >= 1 (got %d, %d)"
                          % (cfg.DATASET.DEMO_TRAIN_IDS, cfg.DATASET.DEMO_TEST_IDS))
    height, width = int(cfg.INPUT.SIZE_TRAIN[0]), int(cfg.INPUT.SIZE_TRAIN[1])
    workers = workers or default_workers()

    def generate(folder):
        write_sysu(folder, params["train"], params["val"], params["test"], params["seed"], IMAGES_PER_CAM, workers)
        preprocess_sysu(folder, (width, height), workers=workers, progress=False, resample=cfg.INPUT.RESIZE_FILTER)

    ensure_generated(root, params, generate)
    preprocess_sysu(root, (width, height), workers=workers, progress=False, resample=cfg.INPUT.RESIZE_FILTER)
    return root


def _install(tmp, root, params):
    """Rename the finished tree `tmp` onto `root`, replacing an outdated demo tree."""
    old = None
    if os.path.isdir(root):
        if not os.listdir(root):
            os.rmdir(root)
        elif not _matches(root, params):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(root) + ".", suffix=".old", dir=os.path.dirname(root))
            os.rmdir(old)
            os.rename(root, old)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process installed it first; theirs is identical (same parameters).
        if not _matches(root, params):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@DATASETS.register("demo")
class DemoDataset(SYSUMM01):
    """SYSU-layout synthetic dataset under DATASET.ROOT, generated by :meth:`prepare` (which
    train.py and test.py call once before reading it)."""

    @classmethod
    def prepare(cls, cfg):
        ensure_demo_dataset(cfg)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.root = os.path.abspath(cfg.DATASET.ROOT)
