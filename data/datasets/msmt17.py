"""MSMT17: list files naming the images of a training folder and a test folder.

Layout: ``list_train.txt``, ``list_val.txt`` (training images, paths relative to the
training folder), ``list_query.txt``, ``list_gallery.txt`` (paths relative to the test
folder), one ``<relative path> <pid>`` per line; the folders are ``train/`` and ``test/``
(MSMT17_V1) or, when those are absent, ``mask_train_v2/`` and ``mask_test_v2/``
(MSMT17_V2). File names are ``<pid>_<index>_<camera>_<date><time of day>_<frame>_<k>.jpg``
(``0000_000_01_0303morning_0015_0.jpg``): the camera is the third ``_`` field of the file
name (01..15), camera id = that number - 1.

Training = list_train followed by list_val; its pids are the labels as listed (they must
be 0..C-1; no relabelling, as released). Query and gallery keep their listed pids.
"""
import os

from data.errors import DatasetError
from data.listfiles import read_label_list
from data.datasets.market_style import MarketStyleDataset, Rows
from data.registry import DATASETS

NUM_CAMS = 15
# (training folder, test folder) of each release, in the order they are looked for.
FOLDERS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
LISTS = {"train": ("list_train.txt", "list_val.txt"), "query": ("list_query.txt",), "gallery": ("list_gallery.txt",)}
LAYOUT = ("list_{train,val,query,gallery}.txt with train/ and test/ (MSMT17_V1) or mask_train_v2/ and "
          "mask_test_v2/ (MSMT17_V2)")


def camera_from_name(name, source):
    """0-based camera id from the third ``_`` field of an MSMT17 file name."""
    fields = os.path.basename(name).split("_")
    try:
        cam = int(fields[2])
    except (IndexError, ValueError):
        raise DatasetError("%s: file name %r has no camera number as its third '_' field "
                           "(e.g. 0000_000_01_0303morning_0015_0.jpg)" % (source, name)) from None
    if not 1 <= cam <= NUM_CAMS:
        raise DatasetError("%s: file %r names camera %d, expected 1..%d" % (source, name, cam, NUM_CAMS))
    return cam - 1


def image_folders(root):
    """(training folder, test folder) of the release found under `root`."""
    if not os.path.isdir(root):
        raise DatasetError("MSMT17 root not found: %s (expected %s; see datasets/README.md)" % (root, LAYOUT))
    for train, test in FOLDERS.values():
        if os.path.isdir(os.path.join(root, train)) and os.path.isdir(os.path.join(root, test)):
            return os.path.join(root, train), os.path.join(root, test)
    raise DatasetError("%s holds neither train/ + test/ (MSMT17_V1) nor mask_train_v2/ + mask_test_v2/ (MSMT17_V2); "
                       "expected %s" % (root, LAYOUT))


@DATASETS.register("msmt17")
class MSMT17(MarketStyleDataset):
    """MSMT17, 15 cameras (camera ids 0..14).

    =========  ======  ======  =======
    split      ids     images  cameras
    =========  ======  ======  =======
    train      1,041   32,621  15
    query      3,060   11,659  15
    gallery    3,060   82,161  15
    =========  ======  ======  =======

    Training = list_train (30,248 images) + list_val (2,373 images of the same identities).
    """

    DISPLAY = "MSMT17"

    def _read(self, split):
        train_dir, test_dir = image_folders(self.root)
        folder = train_dir if split == "train" else test_dir
        rows = Rows()
        for name in LISTS[split]:
            path = os.path.join(self.root, name)
            rels, pids = read_label_list(path, folder)
            rows.paths += [os.path.join(folder, r) for r in rels]
            rows.pids += pids
            rows.camids += [camera_from_name(r, path) for r in rels]
        return rows, 0

    def labels(self):
        """The listed training pids, which must be 0..C-1."""
        pids = set(self.rows("train")[0].pids)
        if pids != set(range(len(pids))):
            missing = sorted(set(range(max(pids) + 1)) - pids)[:10]
            raise DatasetError("MSMT17 training pids in %s + %s must be 0..C-1; found %d pids in [%d, %d]%s"
                               % (os.path.join(self.root, LISTS["train"][0]), LISTS["train"][1], len(pids),
                                  min(pids), max(pids), ", missing: %s" % missing if missing else ""))
        return {pid: pid for pid in pids}
