"""Market-1501, DukeMTMC-reID, MSMT17 and demo_market: the released parsers' golden lists,
set-order relabelling, the synthetic layouts, and one clear error per kind of bad input."""
import hashlib
import os
import platform
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.datasets.market_style import train_labels
from data.errors import DatasetError
from data.image_io import decode_resized
from data.registry import DATASETS, get_dataset
from data.set_order import set_order, set_order_labels
from data.synthetic_market import MSMT_FOLDERS, write_duke, write_market, write_msmt17
from evaluation.metrics import evaluate
from utils.config import PROJECT_ROOT, build_config
from utils.errors import ConfigError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "fusionreid", "datasets.pt")


def _cfg(name, root, *opts):
    return build_config(None, opts=["DATASET.NAME", name, "DATASET.ROOT", str(root)] + list(opts), validate=False)


def _dataset(name, root, *opts, relabel=None):
    cfg = _cfg(name, root, *opts)
    if relabel is not None:
        # DATASET.RELABEL may not be a default key yet; the datasets read it when present.
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATASET.RELABEL = relabel
    return get_dataset(cfg)


def _digest(root):
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            h.update(os.path.relpath(os.path.join(folder, name), root).encode())
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


# --------------------------------------------------------------------------------------------
# set order


def test_set_order_by_hand():
    # Table of 8 slots. 5 -> slot 5, 12 -> slot 4; 2053 & 7 = 5 is taken and 5 + 9 > 7 allows no
    # linear probe, so perturb = 2053 >> 5 = 64 and i = (5*5 + 1 + 64) & 7 = 2; 7140 & 7 = 4 is
    # taken, perturb = 223, i = (4*5 + 1 + 223) & 7 = 4 (taken), perturb = 6, i = 27 & 7 = 3.
    assert set_order([5, 12, 2053, 7140]) == [2053, 7140, 12, 5]
    # 2053 first takes slot 5, so 5 moves to slot 2; 7140 takes slot 4 and 12 moves on
    # (4*5 + 1 + 0) & 7 = 5 (taken), (5*5 + 1) & 7 = 2 (taken), (2*5 + 1) & 7 = 3.
    assert set_order([2053, 5, 7140, 12]) == [5, 12, 7140, 2053]
    assert set_order([3, 3, 1, 0, 1]) == [0, 1, 3]
    with pytest.raises(ValueError, match="non-negative"):
        set_order([1, -1])


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="compares with CPython's own sets")
def test_set_order_is_cpythons():
    r = random.Random(0)
    for _ in range(300):
        n = r.choice([1, 4, 5, 13, 40, 702, 751, 1041])
        values = [r.randrange(r.choice([16, 1502, 7141, 2 ** 40])) for _ in range(n)]
        values += [r.choice(values) for _ in range(n // 2)]
        r.shuffle(values)
        assert set_order(values) == list(set(values))
        assert set_order_labels(values) == {pid: i for i, pid in enumerate(set(values))}
    big = list(range(60000))  # past 50,000 values the table only doubles
    r.shuffle(big)
    assert set_order(big) == list(set(big))


def test_relabel_rules():
    assert train_labels([7140, 5, 5, 12]) == set_order_labels([7140, 5, 12])
    assert train_labels([7140, 5, 5, 12], "sorted") == {5: 0, 12: 1, 7140: 2}
    with pytest.raises(ConfigError, match="DATASET.RELABEL"):
        train_labels([1], "ascending")


# --------------------------------------------------------------------------------------------
# golden: the released parsers on synthetic file trees


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)["datasets"]


def _rows(image_list, base):
    return sorted([os.path.relpath(p, base), int(pid), int(cam)] for p, pid, cam in
                  zip(image_list.paths, image_list.pids, image_list.camids))


def _expected(entries):
    return sorted([path, pid, cam] for path, pid, cam, _ in entries)


def _folder_tree(tmp_path, case, extra=()):
    for split in ("train", "query", "gallery"):
        for path, *_ in case[split]:
            _touch(os.path.join(tmp_path, path))
    for rel in extra:
        _touch(os.path.join(tmp_path, rel))


def test_golden_market1501(tmp_path, golden):
    case = golden["market1501"]
    # Junk boxes (pid -1) are in no golden list: the released parser drops them everywhere.
    _folder_tree(tmp_path, case, ["market1501/bounding_box_test/-1_c1s1_000001_00.jpg",
                                  "market1501/bounding_box_train/-1_c2s1_000002_00.jpg",
                                  "market1501/query/-1_c3s1_000003_00.jpg"])
    ds = _dataset("market1501", tmp_path / "market1501")
    assert _rows(ds.train_listing()[0], tmp_path) == _expected(case["train"])
    split = ds.test_split(_cfg("market1501", tmp_path / "market1501"))
    assert _rows(split.query, tmp_path) == _expected(case["query"])
    assert _rows(split.gallery, tmp_path) == _expected(case["gallery"])
    assert ds.num_cameras == case["num_train_cams"] == 6
    assert len(set(ds.train_listing()[0].pids.tolist())) == case["num_train_pids"]
    assert split.protocol == "market" and split.info["junk_dropped"] == 1 and split.info["num_distractors"] == 1
    assert split.query_modality == split.gallery_modality == "visible"
    assert len(split.trials) == 1 and np.array_equal(split.trials[0], np.arange(len(split.gallery)))


def test_golden_dukemtmc(tmp_path, golden):
    case = golden["dukemtmc"]
    _folder_tree(tmp_path, case)
    root = tmp_path / "dukemtmc"
    ds = _dataset("dukemtmc", root)
    raw = {int(re.match(r"\d+", os.path.basename(p)).group()): label for p, label, _, _ in case["train"]}
    assert raw == {5: 0, 12: 1, 2053: 3, 7140: 2}
    # The released walk is in directory order: the golden labels are the set order of the pids
    # in an order such a walk meets them (ext4's here), not in sorted order.
    assert set_order_labels([2053, 5, 7140, 12]) == raw
    # Here the walk is sorted: paths, pids and cameras as released, labels = set order of 5, 12, 2053, 7140.
    by_label = {2053: 0, 7140: 1, 12: 2, 5: 3}
    expected = sorted([p, by_label[int(os.path.basename(p)[:4])], c] for p, _, c, _ in case["train"])
    assert _rows(ds.train_listing()[0], tmp_path) == expected
    split = ds.test_split(_cfg("dukemtmc", root))
    assert _rows(split.query, tmp_path) == _expected(case["query"])
    assert _rows(split.gallery, tmp_path) == _expected(case["gallery"])
    assert ds.num_cameras == case["num_train_cams"] == 2 and ds.train_cameras == (0, 7)
    assert "num_distractors" not in split.info
    ranked = _dataset("dukemtmc", root, relabel="sorted")
    assert sorted(set(zip(ranked.rows("train")[0].pids, ranked.train_listing()[0].pids.tolist()))) == [
        (5, 0), (12, 1), (2053, 2), (7140, 3)]


def test_golden_msmt17(tmp_path, golden):
    case = golden["msmt17"]
    root = tmp_path / "msmt17"
    lists = {"list_train.txt": case["train"][:-1], "list_val.txt": case["train"][-1:],
             "list_query.txt": case["query"], "list_gallery.txt": case["gallery"]}
    for name, entries in lists.items():
        lines = []
        for path, pid, _, _ in entries:
            _touch(os.path.join(tmp_path, path))
            lines.append("%s %d\n" % (path.split("/", 2)[2], pid))
        (root / name).write_text("".join(lines))
    ds = _dataset("msmt17", root)
    assert _rows(ds.train_listing()[0], tmp_path) == _expected(case["train"])
    split = ds.test_split(_cfg("msmt17", root))
    assert _rows(split.query, tmp_path) == _expected(case["query"])
    assert _rows(split.gallery, tmp_path) == _expected(case["gallery"])
    assert ds.num_cameras == case["num_train_cams"] == 5
    assert split.info["junk_dropped"] == 0 and "num_distractors" not in split.info


def test_camera_and_pid_from_file_name_only(tmp_path):
    # The released regex runs over the whole path and would read pid 99, camera 9 here.
    root = tmp_path / "0099_c9" / "market1501"
    for rel in ("bounding_box_train/0002_c1s1_000451_03.jpg", "query/0003_c2s1_000100_00.jpg",
                "bounding_box_test/0003_c4s2_000200_01.jpg"):
        _touch(os.path.join(root, rel))
    ds = _dataset("market1501", root)
    train = ds.train_listing()[0]
    assert train.pids.tolist() == [0] and train.camids.tolist() == [0] and ds.rows("train")[0].pids == [2]
    split = ds.test_split(_cfg("market1501", root))
    assert split.query.pids.tolist() == [3] and split.query.camids.tolist() == [1]
    assert split.gallery.camids.tolist() == [3]


# --------------------------------------------------------------------------------------------
# synthetic layouts


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("market_style")
    out = {}
    out["market1501"] = (str(base / "market"), write_market(str(base / "market"), 6, 8, seed=3, images_per_cam=3,
                                                            num_distractors=5, num_junk=3, workers=2))
    out["dukemtmc"] = (str(base / "duke"), write_duke(str(base / "duke"), 6, 6, seed=3, images_per_cam=2,
                                                      num_distractor_ids=2, workers=2))
    out["msmt17"] = (str(base / "msmt"), write_msmt17(str(base / "msmt"), 5, 6, seed=3, images_per_cam=3, workers=2))
    return out


_NAMES = {
    "market1501": re.compile(r"^(\d{4}|-1)_c[1-6]s[1-6]_\d{6}_\d{2}\.jpg$"),
    "dukemtmc": re.compile(r"^\d{4}_c[1-8]_f\d{7}\.jpg$"),
}
_MSMT_LINE = re.compile(r"^(\d{4})/(\d{4})_(\d{3})_(\d{2})_\d{4}(morning|noon|afternoon)_\d{4}_0\.jpg (\d+)$")


def _perfect_ranking(split):
    d = (split.query.pids[:, None] != split.gallery.pids[None, :]).astype(np.float64)
    return evaluate(d, split.query.pids, split.gallery.pids, split.query.camids, split.gallery.camids, "market", 5)


@pytest.mark.parametrize("name", ["market1501", "dukemtmc"])
def test_folder_layouts_parse_to_the_plan(trees, name):
    root, plan = trees[name]
    assert sorted(os.listdir(root)) == ["bounding_box_test", "bounding_box_train", "query", "synthetic.json"]
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        names = os.listdir(os.path.join(root, folder))
        assert names and all(_NAMES[name].match(n) for n in names), folder
    ds = _dataset(name, root)
    train = ds.train_listing()[0]
    counts = plan["counts"]
    assert len(train) == sum(n for (s, _, _), n in counts.items() if s == "train")
    raw = ds.rows("train")[0].pids
    assert sorted(set(raw)) == plan["train"]
    assert dict(zip(raw, train.pids.tolist())) == set_order_labels(sorted(raw))
    assert set(zip(raw, train.camids.tolist())) == {(p, c - 1) for (s, p, c) in counts if s == "train"}
    assert ds.num_cameras == len({c for (s, _, c) in counts if s == "train"})
    split = ds.test_split(_cfg(name, root))
    groups = sorted((p, c) for (s, p, c) in counts if s == "test")
    assert sorted(zip(split.query.pids.tolist(), (split.query.camids + 1).tolist())) == groups
    gallery_ids = set(split.gallery.pids.tolist())
    if name == "market1501":
        assert len(split.gallery) == sum(n for (s, _, _), n in counts.items() if s == "test") + 5
        assert split.info["num_distractors"] == 5 and split.info["junk_dropped"] == 3
        assert gallery_ids == set(plan["test"]) | {0}
        assert sum(n.startswith("-1_") for n in os.listdir(os.path.join(root, "bounding_box_test"))) == 3
    else:
        assert gallery_ids == set(plan["test"]) | set(plan["distractor_ids"])
    # Every query has a match in another camera: a perfect distance ranks it first.
    r = _perfect_ranking(split)
    assert r["num_valid_queries"] == len(split.query) and r["cmc"][0] == 1.0 and r["mAP"] == 1.0


def test_msmt17_layout_parses_to_the_plan(trees):
    root, plan = trees["msmt17"]
    assert sorted(os.listdir(root)) == ["list_gallery.txt", "list_query.txt", "list_train.txt", "list_val.txt",
                                        "synthetic.json", "test", "train"]
    for name, rows in plan["lists"].items():
        lines = open(os.path.join(root, name)).read().splitlines()
        assert lines and len(lines) == len(rows)
        folder = "train" if name in ("list_train.txt", "list_val.txt") else "test"
        for line in lines:
            m = _MSMT_LINE.match(line)
            assert m and m.group(1) == m.group(2) and int(m.group(1)) == int(m.group(6)), line
            assert os.path.isfile(os.path.join(root, folder, line.split(" ")[0]))
    ds = _dataset("msmt17", root)
    train = ds.train_listing()[0]
    n_train = sum(n for (s, _, _), n in plan["counts"].items() if s == "train")
    assert len(train) == n_train == len(plan["lists"]["list_train.txt"]) + len(plan["lists"]["list_val.txt"])
    assert [os.path.relpath(p, os.path.join(root, "train")) for p in train.paths] == [
        r for r, _ in plan["lists"]["list_train.txt"] + plan["lists"]["list_val.txt"]]
    assert sorted(set(train.pids.tolist())) == list(range(5))
    cams = [int(os.path.basename(p).split("_")[2]) - 1 for p in train.paths]
    assert train.camids.tolist() == cams and ds.num_cameras == len(set(cams))
    split = ds.test_split(_cfg("msmt17", root))
    assert len(split.query) == sum(1 for (s, _, _) in plan["counts"] if s == "test")
    r = _perfect_ranking(split)
    assert r["num_valid_queries"] == len(split.query) and r["mAP"] == 1.0


def test_msmt17_v2_folders(tmp_path):
    write_msmt17(str(tmp_path / "v2"), 2, 2, seed=1, images_per_cam=2, version="v2")
    assert MSMT_FOLDERS["v2"] == ("mask_train_v2", "mask_test_v2")
    assert {"mask_train_v2", "mask_test_v2"} <= set(os.listdir(tmp_path / "v2"))
    ds = _dataset("msmt17", tmp_path / "v2")
    train = ds.train_listing()[0]
    assert len(train) and all(os.sep + "mask_train_v2" + os.sep in p for p in train.paths)
    split = ds.test_split(_cfg("msmt17", tmp_path / "v2"))
    assert all(os.sep + "mask_test_v2" + os.sep in p for p in split.query.paths + split.gallery.paths)


@pytest.mark.parametrize("writer", [write_market, write_duke, write_msmt17])
def test_generation_is_deterministic(tmp_path, writer):
    writer(str(tmp_path / "a"), 2, 2, seed=5, images_per_cam=2, workers=1)
    writer(str(tmp_path / "b"), 2, 2, seed=5, images_per_cam=2, workers=2)
    writer(str(tmp_path / "c"), 2, 2, seed=6, images_per_cam=2, workers=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_synthetic_market_is_learnable_not_trivial(trees):
    """Same-identity images share the person's colours across cameras (a colour histogram of the
    centre finds it), while raw pixels, dominated by camera background, scale and lighting, do not."""
    root, _ = trees["market1501"]
    split = _dataset("market1501", root).test_split(_cfg("market1501", root))
    q, g = decode_resized(split.query.paths, (32, 64)), decode_resized(split.gallery.paths, (32, 64))

    def hist(a):
        c = a[:, 8:60, 8:24] // 64
        h = np.stack([np.bincount(x.ravel(), minlength=64) for x in c[..., 0] * 16 + c[..., 1] * 4 + c[..., 2]])
        h = np.sqrt(h.astype(np.float64))
        return h / np.linalg.norm(h, axis=1, keepdims=True)

    def pixels(a):
        a = a.reshape(len(a), -1).astype(np.float64)
        a -= a.mean(1, keepdims=True)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    other_cam = split.query.camids[:, None] != split.gallery.camids[None, :]
    same = (split.query.pids[:, None] == split.gallery.pids[None, :]) & other_cam
    diff = split.query.pids[:, None] != split.gallery.pids[None, :]
    sim = hist(q) @ hist(g).T
    assert sim[same].mean() > sim[diff].mean() + 0.05
    r = evaluate(-pixels(q) @ pixels(g).T, split.query.pids, split.gallery.pids, split.query.camids,
                 split.gallery.camids, "market", 5)
    assert r["cmc"][0] < 0.5


def test_cli_writes_the_layouts(tmp_path):
    tool = os.path.join(PROJECT_ROOT, "tools", "make_synthetic_dataset.py")
    for layout, writer in (("market", write_market), ("msmt17", write_msmt17)):
        out = subprocess.run([sys.executable, tool, "--layout", layout, "--root", str(tmp_path / layout), "--ids", "4",
                              "--images", "2", "--workers", "1", "--seed", "2"], capture_output=True, text=True,
                             cwd=PROJECT_ROOT)
        assert out.returncode == 0, out.stderr
        writer(str(tmp_path / (layout + "_direct")), 2, 2, seed=2, images_per_cam=2)
        assert _digest(tmp_path / layout) == _digest(tmp_path / (layout + "_direct"))


def test_train_items(trees):
    root, _ = trees["dukemtmc"]
    ds = _dataset("dukemtmc", root, "INPUT.RESIZE_FILTER", "bilinear")
    items = ds.train_items((16, 32))
    listing = ds.train_listing()[0]
    assert len(items) == len(listing) and items.images[0].shape == (32, 16, 3) and items.images[0].dtype == np.uint8
    assert np.array_equal(items.pids, listing.pids) and np.array_equal(items.camids, listing.camids)
    assert not items.modality.any()
    from PIL import Image

    ref = np.asarray(Image.open(listing.paths[-1]).convert("RGB").resize((16, 32), Image.BILINEAR))
    np.testing.assert_array_equal(items.images[len(items) - 1], ref)


def test_contract_class_methods(trees):
    root, _ = trees["market1501"]
    for name in ("market1501", "dukemtmc", "msmt17", "demo_market"):
        cls = DATASETS.get(name)
        cfg = _cfg(name, root)
        assert cls.run_name(cfg) == name and cls.result_tags(cfg) == [] and cls.test_runs(cfg) == [None]
        assert cls.eval_info(cfg) == {}
        with pytest.raises(ConfigError, match="one query/gallery split"):
            cls.test_runs(cfg, "3")
    ds = _dataset("market1501", root)
    assert ds.train_listing()[1].paths == [] and len(ds.train_listing()[1].pids) == 0
    with pytest.raises(ConfigError, match="DATASET.RELABEL"):
        _dataset("market1501", root, relabel="ascending")


# --------------------------------------------------------------------------------------------
# errors


def _copy(trees, name, tmp_path):
    dst = str(tmp_path / name)
    shutil.copytree(trees[name][0], dst)
    return dst


def _train_error(name, root, match, what="listing"):
    ds = _dataset(name, root)
    with pytest.raises(DatasetError, match=match):
        ds.train_items((8, 16)) if what == "items" else ds.train_listing()


def _test_error(name, root, match):
    with pytest.raises(DatasetError, match=match):
        _dataset(name, root).test_split(_cfg(name, root))


def test_folder_layout_errors(trees, tmp_path):
    _train_error("market1501", tmp_path / "absent", "Market-1501 root not found: .*absent")
    root = _copy(trees, "market1501", tmp_path)
    shutil.rmtree(os.path.join(root, "query"))
    _test_error("market1501", root, "Market-1501 query folder not found: .*query")
    os.makedirs(os.path.join(root, "query"))
    _test_error("market1501", root, "query folder .* holds no .jpg images")
    os.rmdir(os.path.join(root, "query"))
    shutil.copytree(os.path.join(trees["market1501"][0], "query"), os.path.join(root, "query"))
    train = os.path.join(root, "bounding_box_train")
    for name, match in (("img_0001.jpg", re.escape("%s: file name 'img_0001.jpg' does not start with '<pid>_c<camera>'"
                                                   % train)),
                        ("0002_c7s1_000451_03.jpg", "'0002_c7s1_000451_03.jpg' names camera c7, expected c1..c6"),
                        ("0002_c0s1_000451_03.jpg", "'0002_c0s1_000451_03.jpg' names camera c0, expected c1..c6"),
                        ("-2_c1s1_000451_03.jpg", "'-2_c1s1_000451_03.jpg' does not start")):
        _touch(os.path.join(train, name))
        _train_error("market1501", root, match)
        os.remove(os.path.join(train, name))
    test_folder = os.path.join(root, "bounding_box_test")
    for name in os.listdir(test_folder):
        if not name.startswith("-1_"):
            os.remove(os.path.join(test_folder, name))
    _test_error("market1501", root, "bounding_box_test holds only junk images")
    broken = sorted(os.listdir(train))[1]
    with open(os.path.join(train, broken), "wb") as f:
        f.write(b"not a jpeg")
    _train_error("market1501", root, "cannot decode image " + re.escape(os.path.join(train, broken)), what="items")


def test_msmt17_errors(trees, tmp_path):
    _train_error("msmt17", tmp_path / "absent", "MSMT17 root not found")
    root = _copy(trees, "msmt17", tmp_path)
    os.rename(os.path.join(root, "test"), os.path.join(root, "test_x"))
    _train_error("msmt17", root, re.escape("neither train/ + test/ (MSMT17_V1) nor mask_train_v2/ + mask_test_v2/"))
    os.rename(os.path.join(root, "test_x"), os.path.join(root, "test"))
    val = os.path.join(root, "list_val.txt")
    text = open(val).read()
    os.remove(val)
    _train_error("msmt17", root, "list file not found: .*list_val.txt")

    def listed(line, match, touch=None):
        if touch:
            _touch(os.path.join(root, "train", touch))
        with open(val, "w") as f:
            f.write(text + line + "\n")
        _train_error("msmt17", root, match, what="items")

    listed("0001/0001_099_01_0303noon_0001_0.jpg 1",
           "list_val.txt names 1 image.* that do not exist under .*train: 0001/0001_099_01_0303noon_0001_0.jpg")
    listed("0001/0001_099_01_0303noon_0001_0.jpg",
           "list_val.txt line %d: expected '<relative path> <int label>'" % (text.count("\n") + 1))
    listed("0001/0001_x.jpg 1", "list_val.txt: file name '0001/0001_x.jpg' has no camera number as its third",
           touch="0001/0001_x.jpg")
    listed("0001/0001_098_16_0303noon_0001_0.jpg 1", "names camera 16, expected 1..15",
           touch="0001/0001_098_16_0303noon_0001_0.jpg")
    listed("0001/0001_098_01_0303noon_0001_0.jpg 9",
           re.escape("training pids in %s + list_val.txt must be 0..C-1; found 6 pids in [0, 9], missing: [5, 6, 7, 8]"
                     % os.path.join(root, "list_train.txt")), touch="0001/0001_098_01_0303noon_0001_0.jpg")


# --------------------------------------------------------------------------------------------
# demo_market


def test_demo_market(tmp_path):
    from data.datasets.demo_market import demo_market_params, ensure_demo_market

    root = tmp_path / "demo_market"
    cfg = _cfg("demo_market", root, "DATASET.DEMO_TRAIN_IDS", "3", "DATASET.DEMO_TEST_IDS", "4",
               "DATASET.DEMO_SEED", "1")
    DATASETS.get("demo_market").prepare(cfg)
    manifest = os.path.join(root, "synthetic.json")
    stamp = os.stat(manifest).st_mtime_ns
    assert ensure_demo_market(cfg) == str(root) and os.stat(manifest).st_mtime_ns == stamp
    assert os.listdir(tmp_path) == ["demo_market"]  # no temporary folder left behind
    params = demo_market_params(cfg)
    assert (params["train"], params["test"], params["distractors"], params["junk"]) == (3, 4, 2, 1)
    write_market(str(tmp_path / "reference"), 3, 4, 1, params["images_per_cam"], 2, 1)
    assert _digest(root) == _digest(tmp_path / "reference")
    ds = get_dataset(cfg)
    assert len(set(ds.train_listing()[0].pids.tolist())) == 3
    split = ds.test_split(cfg)
    assert split.info["dataset"] == "demo_market" and split.info["num_distractors"] == 2
    assert split.info["junk_dropped"] == 1
    bigger = _cfg("demo_market", root, "DATASET.DEMO_TRAIN_IDS", "4", "DATASET.DEMO_TEST_IDS", "4",
                  "DATASET.DEMO_SEED", "1")
    ensure_demo_market(bigger)  # an outdated demo tree is replaced
    assert len(set(get_dataset(bigger).train_listing()[0].pids.tolist())) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a generated demo dataset"):
        ensure_demo_market(_cfg("demo_market", tmp_path / "mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
