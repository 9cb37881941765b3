"""DukeMTMC-reID: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of
``<pid>_c<camera>_f<frame>.jpg`` files (``0005_c2_f0046182.jpg``).

Parsing and relabelling: ``data/datasets/market_style.py``. The released parser walks the
folder in file-system order, so its set-order labels depend on the machine the data lies on
(pids up to 7140 collide in the set's hash table); here the walk is in sorted name order,
which makes the labels a fixed function of the file names.
"""
from data.datasets.market_style import FolderDataset
from data.registry import DATASETS


@DATASETS.register("dukemtmc")
class DukeMTMCreID(FolderDataset):
    """DukeMTMC-reID, 8 cameras (c1..c8, camera ids 0..7).

    =========  ======  ======  =======
    split      ids     images  cameras
    =========  ======  ======  =======
    train      702     16,522  8
    query      702     2,228   8
    gallery    1,110   17,661  8
    =========  ======  ======  =======

    The gallery holds the 702 test identities plus 408 distractor identities (ordinary
    pids seen by one camera only). There are no junk (-1) or pid-0 files; a -1 file would
    be dropped as in Market-1501.
    """

    DISPLAY = "DukeMTMC-reID"
    NUM_CAMS = 8
