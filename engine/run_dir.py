"""The run directory (``OUTPUT_DIR``) of a training run and its guard.

Contents, all written by rank 0::

    config.yaml        the resolved config
    train.log          the log (appended across resumes)
    metrics.jsonl      one JSON object per evaluation (epoch, split, rank1/5/10/20, mAP, mINP
                       as fractions, trial information)
    events.out.tfevents.*   tensorboardX scalars
    last.pth           the newest resumable checkpoint (every epoch, and on SIGINT/SIGTERM)
    best.pth           the checkpoint selected by SOLVER.SELECT_BY / SOLVER.BEST_METRIC

A directory that already holds a run (config.yaml or last.pth present) is never reused unless
the caller asks to resume it or to overwrite it.
"""
import contextlib
import glob
import json
import os

from utils.io import save_text
from utils.errors import UserError

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
LAST_CHECKPOINT = "last.pth"
BEST_CHECKPOINT = "best.pth"
_RUN_FILES = (CONFIG_FILE, LOG_FILE, METRICS_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT)
_MARKERS = (CONFIG_FILE, LAST_CHECKPOINT)


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked."""


def holds_run(path):
    return any(os.path.exists(os.path.join(path, name)) for name in _MARKERS)


def check_run_dir(path, resume=False, overwrite=False):
    """Raise RunDirError unless `path` may be used as asked (read-only; every DDP rank may call it)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if not resume and not overwrite and holds_run(path):
        found = [n for n in _MARKERS if os.path.exists(os.path.join(path, n))]
        raise RunDirError(
            "run directory %s already holds a run (%s); pass --resume to continue it, --overwrite to "
            "replace it, or choose another OUTPUT_DIR" % (path, ", ".join(found))
        )


def prepare_run_dir(path, resume=False, overwrite=False):
    """Check `path` (:func:`check_run_dir`) and create it; with `overwrite` delete the files of
    the earlier run (only files a run writes: anything else in the folder is left alone).

    Returns the list of deleted paths.
    """
    check_run_dir(path, resume, overwrite)
    os.makedirs(path, exist_ok=True)
    removed = []
    if overwrite:
        candidates = [os.path.join(path, n) for n in _RUN_FILES]
        candidates += glob.glob(os.path.join(path, "events.out.tfevents.*"))
        for file in candidates:
            if os.path.isfile(file):
                os.remove(file)
                removed.append(file)
    return removed


def read_metrics(path):
    """The records of a metrics.jsonl file (empty list when absent)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trim_metrics(path, last_epoch):
    """Drop records of epochs after `last_epoch` (evaluated, then lost to a crash before the
    checkpoint); a resumed run evaluates those epochs again."""
    records = read_metrics(path)
    kept = [r for r in records if r.get("epoch", -1) <= last_epoch]
    if len(kept) != len(records):
        save_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)



@contextlib.contextmanager
def open_run(path, ctx, resume=False, overwrite=False):
    """The run of a training script in the run directory `path`: check it on every process,
    prepare it on rank 0 (:func:`prepare_run_dir`), and open the run's log and tensorboard
    writer (written by rank 0 only); yields (logger, tensorboard writer, metrics.jsonl path,
    deleted paths). A :class:`UserError` raised inside is written to the log (and marked
    ``logged``) before it propagates; the log and the writer are closed on the way out."""
    from engine.distributed import barrier
    from utils.logger import TensorboardWriter, close_logger, setup_logger

    check_run_dir(path, resume=resume, overwrite=overwrite)
    barrier(ctx)
    removed = prepare_run_dir(path, resume=resume, overwrite=overwrite) if ctx.is_main else []
    logger = setup_logger(os.path.join(path, LOG_FILE) if ctx.is_main else None, ctx.rank)
    tb = TensorboardWriter(path, enabled=ctx.is_main)
    try:
        yield logger, tb, os.path.join(path, METRICS_FILE), removed
    except UserError as exc:
        logger.error("%s", exc)
        exc.logged = True
        raise
    finally:
        tb.close()
        close_logger(logger)
