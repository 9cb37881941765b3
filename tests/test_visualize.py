"""evaluation/plots.py and tools/visualize_ranks.py: rank lists, grid colours, CMC plot, CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.embeddings import save_features, used_gallery_columns
from evaluation.metrics import PROTOCOLS, evaluate
from evaluation.plots import (
    CORRECT,
    QUERY,
    WRONG,
    draw_rank_grid,
    parse_queries,
    plot_cmc,
    ranked_gallery,
    save_rank_grids,
    select_queries,
)
from tools.visualize_ranks import embedding_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(folder, n):
    paths = []
    for i in range(n):
        path = os.path.join(folder, "img%02d.png" % i)
        Image.new("RGB", (16, 32), (20 * i % 255, 100, 200 - 10 * i % 200)).save(path)
        paths.append(path)
    return paths


# Gallery pids and cameras in rank order (distance = index), for hand-worked removals.
G_PIDS = np.array([5, 5, 7, 3, 9, 3])
G_CAMS = np.array([1, 2, 4, 5, 1, 2])
DIST = np.arange(6, dtype=np.float32)


@pytest.mark.parametrize("protocol, q_pid, q_cam, expected", [
    # sysu: a cam-3 query drops every cam-2 item, of any identity (the 5 and the 3 in cam 2)
    ("sysu", 3, 3, [0, 2, 3, 4]),
    ("sysu", 5, 3, [0, 2, 3, 4]),
    # sysu: a cam-6 query keeps everything
    ("sysu", 3, 6, [0, 1, 2, 3, 4, 5]),
    # llcm and market: only the query's own identity in the query's camera
    ("llcm", 3, 2, [0, 1, 2, 3, 4]),
    ("llcm", 5, 1, [1, 2, 3, 4, 5]),
    ("market", 3, 2, [0, 1, 2, 3, 4]),
    ("market", 5, 1, [1, 2, 3, 4, 5]),
    ("market", 3, 4, [0, 1, 2, 3, 4, 5]),
    # regdb: nothing
    ("regdb", 3, 2, [0, 1, 2, 3, 4, 5]),
])
def test_ranked_gallery_applies_the_protocol_removal(protocol, q_pid, q_cam, expected):
    assert ranked_gallery(DIST, q_pid, q_cam, G_PIDS, G_CAMS, protocol, 10).tolist() == expected
    assert ranked_gallery(DIST, q_pid, q_cam, G_PIDS, G_CAMS, protocol, 2).tolist() == expected[:2]


def test_ranked_gallery_orders_by_distance_then_index():
    dist = np.array([3.0, 1.0, 2.0, 1.0, 0.0, 5.0])
    assert ranked_gallery(dist, 3, 2, G_PIDS, G_CAMS, "regdb", 6).tolist() == [4, 1, 3, 2, 0, 5]


def test_ranked_gallery_rejects_an_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol 'market1501'"):
        ranked_gallery(DIST, 3, 2, G_PIDS, G_CAMS, "market1501", 3)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ranked_gallery_is_the_list_the_metric_scores(protocol):
    """Per query, the first true match of the drawn list sits at the metric's rank and the
    list's precision at its hits gives the metric's AP."""
    rng = np.random.default_rng(len(protocol))
    g_pids = np.repeat(np.arange(8), 6)
    g_cams = np.tile([1, 2, 3, 4, 5, 6], 8)
    q_pids = rng.integers(0, 8, 40)
    q_cams = rng.choice([2, 3, 6], 40)
    dist = rng.random((40, len(g_pids)))
    per_query = evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol, return_per_query=True)["per_query"]
    for qi in range(40):
        kept = ranked_gallery(dist[qi], q_pids[qi], q_cams[qi], g_pids, g_cams, protocol, len(g_pids))
        hits = np.flatnonzero(g_pids[kept] == q_pids[qi]) + 1
        assert per_query["rank"][qi] == hits[0]
        assert per_query["ap"][qi] == pytest.approx(np.mean(np.arange(1, len(hits) + 1) / hits))


def test_parse_queries():
    assert parse_queries("8") == 8
    assert parse_queries(8) == 8
    assert parse_queries("1,5,9") == [1, 5, 9]
    assert parse_queries(" 3, 4, ") == [3, 4]
    with pytest.raises(ValueError, match="--queries .* got 'first'"):
        parse_queries("first")


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


# test.py --save-features records the embedding it ranked by (here the baseline's two sets)
SETTINGS = {"feature": "sum6", "embedding": {"model": "Baseline", "preset": "sum6",
                                             "weights": [["pool_orig", 1.0], ["bn_orig", 1.0]]}}


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
    save_features(tmp_path / "feats", split, qf, gf, used, trials, {"image_size": [32, 16], **SETTINGS})
    out = tmp_path / "vis"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "visualize_ranks.py"), "--features", str(tmp_path / "feats"),
         "-k", "3", "--queries", "0,2", "--trial-index", "1", "--feature", "mix", "--plot-cmc", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(out)) == ["cmc_mix.png", "ranks_mix_top3_page01.png"]
    grid = Image.open(out / "ranks_mix_top3_page01.png")
    assert grid.height > 2 * 32  # two query rows


def test_embedding_of_saved_features():
    assert embedding_of(SETTINGS) == ("sum6", [("pool_orig", 1.0), ("bn_orig", 1.0)])
    assert embedding_of(SETTINGS, "sum6") == embedding_of(SETTINGS)
    # another preset of the same model class
    assert embedding_of(SETTINGS, "mix") == ("mix", [("pool_orig", 0.1), ("bn_orig", 0.9)])
    with pytest.raises(SystemExit, match="--feature"):
        embedding_of(SETTINGS, "nope")
    with pytest.raises(SystemExit, match="records no embedding"):
        embedding_of({"feature": "sum6"})
