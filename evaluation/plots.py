"""Pictures of test results: CMC curves (matplotlib, Agg) and ranked-gallery grids (PIL).

* :func:`plot_cmc` draws one or more CMC curves (fractions 0..1, rank 1..len) with an
  optional +-std band and writes a PNG.
* :func:`ranked_gallery` returns the top-k gallery columns of one distance row after the
  protocol's removal rule (:func:`evaluation.metrics.removed_items`, the rule the metrics
  apply), i.e. the list the metric scores.
* :func:`draw_rank_grid` writes one PNG with a row per query: the query on the left, then its
  top-k gallery images, each framed green (same identity) or red (other identity), with the
  rank, identity, modality and camera written under it.
* :func:`save_rank_grids` does both for chosen queries of a distance matrix, a page of at
  most `rows_per_page` queries per PNG; test.py --visrank and tools/visualize_ranks.py use it,
  with their ``--queries`` option read by :func:`parse_queries`.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from evaluation.metrics import removed_items
from utils.io import atomic_path

MODALITY_LABELS = {"visible": "VIS", "infrared": "IR"}
CORRECT = (0, 170, 0)
WRONG = (215, 0, 0)
QUERY = (40, 90, 220)


def plot_cmc(curves, path, title=None):
    """Write a CMC plot to `path` (PNG).

    `curves`: list of (label, cmc, std) with cmc/std sequences of fractions (std may be None).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for label, cmc, std in curves:
        cmc = 100 * np.asarray(cmc, dtype=np.float64)
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, cmc, marker="o", markersize=3, label="%s (R1 %.2f%%)" % (label, cmc[0]))
        if std is not None:
            std = 100 * np.asarray(std, dtype=np.float64)
            ax.fill_between(ranks, cmc - std, cmc + std, alpha=0.2)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    last = max(len(c) for _, c, _ in curves)
    ax.set_xlim(1, last)
    ax.set_xticks(sorted({1, last} | set(range(5, last + 1, 5))))
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def ranked_gallery(dist_row, q_pid, q_camid, g_pids, g_camids, protocol, k):
    """Indices of the k closest gallery items the metric keeps for this query."""
    # stable: ties ordered by gallery index, as evaluation.metrics ranks them
    order = np.argsort(np.asarray(dist_row), kind="stable")
    keep = ~removed_items(protocol, q_pid, q_camid, g_pids, g_camids)[order]
    return order[keep][:k]


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no scalable default font
        return ImageFont.load_default()


def _tile(path, size, border, color, lines, font, line_h):
    """An image resized to `size` (w, h), framed in `color`, with text lines below it."""
    w, h = size
    tile = Image.new("RGB", (w + 2 * border, h + 2 * border + line_h * len(lines) + 4), "white")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((w, h), Image.LANCZOS)
    except OSError as exc:
        raise OSError("cannot read image %s: %s" % (path, exc)) from None
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, w + 2 * border - 1, h + 2 * border - 1], fill=color)
    tile.paste(img, (border, border))
    y = h + 2 * border + 2
    for text in lines:
        tw = draw.textlength(text, font=font)
        draw.text(((tile.width - tw) / 2, y), text, fill="black", font=font)
        y += line_h
    return tile


def draw_rank_grid(rows, path, image_size=(64, 128), border=4, gap=16):
    """Write a rank grid PNG.

    `rows`: list of dicts ``query`` and ``gallery`` (list); every item is a dict with
    ``path``, ``pid``, ``camid``, ``modality``; gallery items also ``correct`` (bool).
    `image_size` is (width, height) of each picture.
    """
    font = _font(11)
    line_h = 13
    tiles_rows = []
    for row in rows:
        q = row["query"]
        tiles = [_tile(q["path"], image_size, border, QUERY,
                       ["query id %d" % q["pid"], "%s cam%d" % (MODALITY_LABELS[q["modality"]], q["camid"])],
                       font, line_h)]
        for rank, g in enumerate(row["gallery"], 1):
            tiles.append(_tile(g["path"], image_size, border, CORRECT if g["correct"] else WRONG,
                               ["#%d  id %d" % (rank, g["pid"]),
                                "%s cam%d" % (MODALITY_LABELS[g["modality"]], g["camid"])],
                               font, line_h))
        tiles_rows.append(tiles)
    tile_w, tile_h = tiles_rows[0][0].size
    ncols = max(len(t) for t in tiles_rows)
    width = ncols * tile_w + (ncols - 1) * 4 + gap + 8
    height = len(tiles_rows) * (tile_h + 8) + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for r, tiles in enumerate(tiles_rows):
        y = 4 + r * (tile_h + 8)
        x = 4
        for c, tile in enumerate(tiles):
            canvas.paste(tile, (x, y))
            x += tile_w + 4
            if c == 0:
                # a vertical rule separates the query from its ranked gallery
                draw.line([(x + gap // 2 - 2, y), (x + gap // 2 - 2, y + tile_h)], fill=(150, 150, 150), width=2)
                x += gap
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def parse_queries(text):
    """The ``--queries`` option: "8" -> 8 (a count), "1,5,9" -> [1, 5, 9] (query indices)."""
    text = str(text).strip()
    try:
        if "," in text:
            return [int(i) for i in text.split(",") if i.strip()]
        return int(text)
    except ValueError:
        raise ValueError("--queries must be a count or comma-separated query indices, got %r" % text) from None


def select_queries(num_queries, queries):
    """Query indices: an explicit list, or `queries` (int) evenly spread over the query set."""
    if isinstance(queries, (list, tuple, np.ndarray)):
        idx = [int(i) for i in queries]
        bad = [i for i in idx if not 0 <= i < num_queries]
        if bad:
            raise ValueError("query index %d out of range (0..%d)" % (bad[0], num_queries - 1))
        return idx
    n = min(int(queries), num_queries)
    return sorted(set(np.linspace(0, num_queries - 1, n).round().astype(int).tolist()))


def save_rank_grids(distmat, query, gallery, protocol, out_dir, k=10, queries=8,
                    image_size=(64, 128), rows_per_page=8, prefix="ranks"):
    """PNG pages of ranked galleries for chosen queries; returns the written paths.

    `query` / `gallery`: dicts with ``paths``, ``pids``, ``camids`` (sequences, gallery aligned
    with the columns of `distmat`) and ``modality``. `queries`: count or list of row indices.
    """
    distmat = np.asarray(distmat)
    q_pids, q_cams = np.asarray(query["pids"]), np.asarray(query["camids"])
    g_pids, g_cams = np.asarray(gallery["pids"]), np.asarray(gallery["camids"])
    rows = []
    for qi in select_queries(len(q_pids), queries):
        top = ranked_gallery(distmat[qi], q_pids[qi], q_cams[qi], g_pids, g_cams, protocol, k)
        rows.append({
            "query": {"path": query["paths"][qi], "pid": int(q_pids[qi]), "camid": int(q_cams[qi]),
                      "modality": query["modality"]},
            "gallery": [{"path": gallery["paths"][j], "pid": int(g_pids[j]), "camid": int(g_cams[j]),
                         "modality": gallery["modality"], "correct": bool(g_pids[j] == q_pids[qi])}
                        for j in top],
        })
    written = []
    for page, start in enumerate(range(0, len(rows), rows_per_page), 1):
        path = os.path.join(out_dir, "%s_top%d_page%02d.png" % (prefix, k, page))
        draw_rank_grid(rows[start:start + rows_per_page], path, image_size=image_size)
        written.append(path)
    return written
