"""Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of
``<pid>_c<camera>s<sequence>_<frame>_<box>.jpg`` files (``0002_c1s1_000451_03.jpg``).

Parsing, junk (pid -1) and distractor (pid 0) handling and relabelling:
``data/datasets/market_style.py``.
"""
from data.datasets.market_style import FolderDataset
from data.registry import DATASETS


@DATASETS.register("market1501")
class Market1501(FolderDataset):
    """Market-1501, 6 cameras (c1..c6, camera ids 0..5).

    =========  ======  ======  =======
    split      ids     images  cameras
    =========  ======  ======  =======
    train      751     12,936  6
    query      750     3,368   6
    gallery    751     15,913  6
    =========  ======  ======  =======

    The gallery counts the 750 test identities plus the distractors (pid 0, 2,793 images);
    the 3,819 junk images (pid -1) of ``bounding_box_test/`` are dropped. Training pids
    are all below 2048, so the released set-order labels are ascending.
    """

    DISPLAY = "Market-1501"
    NUM_CAMS = 6
    DISTRACTOR_PID = 0
