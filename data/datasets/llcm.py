"""LLCM: training lists and folder-built test sets.

Layout: ``idx/train_vis.txt`` and ``idx/train_nir.txt`` (``<relative path> <label>``, labels
contiguous) naming the training images, ``idx/test_id.txt`` (one line of comma-separated
ids), ``test_vis/cam1..cam9/<4-digit id>/*.jpg`` and ``test_nir/cam{1,2,4..9}/<4-digit id>/``.

Test directions, each defined as query modality -> gallery modality (the released VIS->IR
swap is not reproduced):

* ``ir2vis``: query = every NIR test image; gallery = per trial one (or ``SHOTS``) VIS image
  per (id, camera), ``random.seed(trial)`` as released.
* ``vis2ir``: query = every VIS test image; gallery = the same sampling over the NIR images.

Walk order: sorted ids, then cameras in ascending order, then sorted files. Camera and id
numbers come from the folder walk (``camX/NNNN`` below the root), so a root path containing
"cam" (which breaks the released parser) is fine. VIS camX and NIR camX share camera id X.
"""
import os
import re

from data.errors import DatasetError
from data.image_io import list_image_files
from data.list_dataset import load_listed_training, read_training_lists
from data.listfiles import read_id_file, require_root
from data.datasets.base import ReIDDataset
from data.items import from_modality_arrays
from data.registry import DATASETS
from data.testsets import ImageList, ListBuilder, TestSplit, seeded_trials, trial_ids
from utils.config import ConfigError

VIS_CAMS = tuple(range(1, 10))
NIR_CAMS = (1, 2, 4, 5, 6, 7, 8, 9)
LAYOUT = "idx/train_vis.txt, idx/train_nir.txt, idx/test_id.txt, test_vis/camX/<id>/, test_nir/camX/<id>/"
_FILE_CAM = re.compile(r"_c(\d+)_")


def camera_from_name(path):
    """Camera number in an LLCM file name (``0003_c01_s185734_f3195_nir.jpg`` -> 1), or 0."""
    match = _FILE_CAM.search(os.path.basename(path))
    return int(match.group(1)) if match else 0


@DATASETS.register("llcm")
class LLCM(ReIDDataset):
    """LLCM: 713 training identities (labels 0..712) and 351 test identities."""

    @classmethod
    def result_tags(cls, cfg):
        return [cfg.TEST.DIRECTION, cfg.TEST.GALLERY, "%dshot" % cfg.TEST.SHOTS]

    def train_items(self, size):
        rgb, rgb_lab, ir, ir_lab = self.train_images(size)
        rgb_list, ir_list = self.train_listing()
        return from_modality_arrays(rgb, rgb_lab, rgb_list.camids, ir, ir_lab, ir_list.camids, "LLCM")

    def _lists(self):
        require_root(self.root, "LLCM", LAYOUT)
        return os.path.join(self.root, "idx", "train_vis.txt"), os.path.join(self.root, "idx", "train_nir.txt")

    def train_images(self, size):
        return load_listed_training(self.root, *self._lists(), size, "LLCM", self.resample)

    def train_listing(self):
        (rgb, rgb_lab), (ir, ir_lab) = read_training_lists(self.root, *self._lists())
        return (ImageList(rgb, rgb_lab, [camera_from_name(p) for p in rgb]),
                ImageList(ir, ir_lab, [camera_from_name(p) for p in ir]))

    def _walk(self, ids, folder, cams, builder):
        for pid in ids:
            for cam in cams:
                d = os.path.join(self.root, folder, "cam%d" % cam, "%04d" % pid)
                if os.path.isdir(d):
                    names = list_image_files(d)
                    builder.add_group(pid, cam, [os.path.join(d, n) for n in names], names)

    def test_split(self, cfg, trial=None):
        require_root(self.root, "LLCM", LAYOUT)
        if cfg.TEST.GALLERY != "seeded":
            raise ConfigError("TEST.GALLERY %r is defined only for SYSU-MM01; LLCM uses 'seeded'" % cfg.TEST.GALLERY)
        id_path = os.path.join(self.root, "idx", "test_id.txt")
        ids = sorted(set(read_id_file(id_path)))
        vis, nir = ListBuilder(), ListBuilder()
        self._walk(ids, "test_vis", VIS_CAMS, vis)
        self._walk(ids, "test_nir", NIR_CAMS, nir)
        absent = sorted(set(ids) - set(vis.pids) - set(nir.pids))
        if absent:
            raise DatasetError("%s names ids with no images under test_vis/camX/ or test_nir/camX/ (expected e.g. %s): %s"
                               % (id_path, os.path.join(self.root, "test_vis", "cam1", "%04d" % absent[0]),
                                  ", ".join("%04d" % p for p in absent[:10])))
        if cfg.TEST.DIRECTION == "vis2ir":
            query, gallery, qmod, gmod = vis, nir, "visible", "infrared"
        else:
            query, gallery, qmod, gmod = nir, vis, "infrared", "visible"
        for builder, what in ((query, qmod), (gallery, gmod)):
            if not builder.paths:
                raise DatasetError("%s: no %s test images for the ids in %s" % (self.root, what, id_path))
        trials = trial_ids(cfg, trial)
        shots = int(cfg.TEST.SHOTS)
        chosen = seeded_trials(gallery.groups, trials, shots)
        q, g = query.image_list(), gallery.image_list()
        return TestSplit(
            query=q,
            gallery=g,
            trials=chosen,
            protocol="llcm",
            query_modality=qmod,
            gallery_modality=gmod,
            info={"dataset": "llcm", "root": self.root, "direction": cfg.TEST.DIRECTION, "gallery": "seeded",
                  "shots": shots, "trials": trials, "num_query": len(q), "num_gallery_candidates": len(g),
                  "gallery_sizes": [int(len(t)) for t in chosen], "num_ids": len(ids)},
        )
