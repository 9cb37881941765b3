"""utils/plots.py and tools/visualize_ranks.py: rank lists, grid colours, CMC plot, CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from utils.features import save_features, used_gallery_columns
from utils.plots import (
    CORRECT,
    QUERY,
    WRONG,
    draw_rank_grid,
    plot_cmc,
    ranked_gallery,
    removed_columns,
    save_rank_grids,
    select_queries,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder, n):
    paths = []
    for i in range(n):
        path = os.path.join(folder, "img%02d.png" % i)
        Image.new("RGB", (16, 32), (20 * i % 255, 100, 200 - 10 * i % 200)).save(path)
        paths.append(path)
    return paths


def test_removal_rules_and_ranking():
    g_pids = np.array([5, 5, 7, 3, 9, 3])
    g_cams = np.array([1, 2, 4, 5, 1, 2])
    dist = np.arange(6, dtype=np.float32)  # already in rank order
    # sysu: a cam3 query ignores every cam2 item, a cam6 query nothing
    assert ranked_gallery(dist, 3, 3, g_pids, g_cams, "sysu", 10).tolist() == [0, 2, 3, 4]
    assert ranked_gallery(dist, 3, 6, g_pids, g_cams, "sysu", 3).tolist() == [0, 1, 2]
    # llcm: same identity and same camera number
    assert removed_columns("llcm", 3, 2, g_pids, g_cams).tolist() == [False] * 5 + [True]
    assert not removed_columns("regdb", 3, 2, g_pids, g_cams).any()
    assert ranked_gallery(dist[::-1].copy(), 1, 1, g_pids, g_cams, "regdb", 2).tolist() == [5, 4]
    with pytest.raises(ValueError, match="protocol"):
        removed_columns("market1501", 1, 1, g_pids, g_cams)


def test_select_queries():
    assert select_queries(100, 5) == [0, 25, 50, 74, 99]
    assert select_queries(3, 10) == [0, 1, 2]
    assert select_queries(10, [4, 2]) == [4, 2]
    with pytest.raises(ValueError, match="out of range"):
        select_queries(10, [10])


def test_rank_grid_frames(tmp_path):
    paths = write_images(tmp_path, 4)

    def item(i, correct):
        return {"path": paths[i], "pid": i, "camid": 1, "modality": "visible", "correct": correct}

    rows = [{"query": {"path": paths[0], "pid": 0, "camid": 3, "modality": "infrared"},
             "gallery": [item(1, True), item(2, False), item(3, True)]}]
    out = tmp_path / "grid.png"
    draw_rank_grid(rows, out, image_size=(20, 40), border=3)
    img = Image.open(out).convert("RGB")
    # tiles are 26 px wide (20 + 2*3) with 4 px between them; the query is followed by a gap
    tile_w, gap = 26, 16
    x0 = 4
    xs = [x0, x0 + tile_w + 4 + gap]
    xs += [xs[-1] + tile_w + 4, xs[-1] + 2 * (tile_w + 4)]
    colours = [img.getpixel((x + 1, 4 + 1)) for x in xs]
    assert colours == [QUERY, CORRECT, WRONG, CORRECT]
    assert img.width == 4 * tile_w + 3 * 4 + gap + 8


def test_cmc_plot_is_png(tmp_path):
    out = tmp_path / "cmc.png"
    cmc = np.linspace(0.3, 0.9, 20)
    plot_cmc([("sum6", cmc, 0.05 * np.ones(20)), ("mix", cmc - 0.1, None)], out, title="t")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (600, 450)


class _List:
    def __init__(self, paths, pids, camids):
        self.paths, self.pids, self.camids = paths, np.asarray(pids), np.asarray(camids)

    def __len__(self):
        return len(self.paths)


class _Split:
    def __init__(self, paths):
        self.query = _List(paths[:4], [0, 1, 2, 3], [3, 6, 3, 6])
        self.gallery = _List(paths[4:], [0, 1, 2, 3, 0, 1, 2, 3], [1, 2, 1, 2, 4, 5, 4, 5])
        self.trials = [np.arange(4), np.arange(4, 8)]
        self.protocol = "sysu"
        self.query_modality, self.gallery_modality = "infrared", "visible"
        self.info = {"dataset": "fake", "direction": "ir2vis"}


def test_save_rank_grids_pages(tmp_path):
    paths = write_images(tmp_path, 12)
    split = _Split(paths)
    dist = np.random.default_rng(0).random((4, 8))
    written = save_rank_grids(
        dist, {"paths": split.query.paths, "pids": split.query.pids, "camids": split.query.camids,
               "modality": "infrared"},
        {"paths": split.gallery.paths, "pids": split.gallery.pids, "camids": split.gallery.camids,
         "modality": "visible"},
        "sysu", tmp_path / "ranks", k=3, queries=4, rows_per_page=3)
    assert [os.path.basename(p) for p in written] == ["ranks_top3_page01.png", "ranks_top3_page02.png"]
    assert Image.open(written[0]).height > Image.open(written[1]).height


def test_visualize_ranks_cli_from_saved_features(tmp_path):
    paths = write_images(tmp_path, 12)
    split = _Split(paths)
    used, trials = used_gallery_columns(split)
    g = torch.Generator().manual_seed(0)
    qf = {"pool_orig": torch.randn(4, 6, generator=g), "bn_orig": torch.randn(4, 6, generator=g)}
    gf = {"pool_orig": torch.randn(8, 6, generator=g), "bn_orig": torch.randn(8, 6, generator=g)}
    save_features(tmp_path / "feats", split, qf, gf, used, trials, {"feature": "sum6", "image_size": [32, 16]})
    out = tmp_path / "vis"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "visualize_ranks.py"), "--features", str(tmp_path / "feats"),
         "-k", "3", "--queries", "0,2", "--trial-index", "1", "--plot-cmc", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(out)) == ["cmc_sum6.png", "ranks_sum6_top3_page01.png"]
    grid = Image.open(out / "ranks_sum6_top3_page01.png")
    assert grid.height > 2 * 32  # two query rows
