"""Where an unsupervised run stands, and the resumable checkpoint that records it.

:class:`USLProgress` counts the position in the run's stage plan, the epoch of that stage, the
iterations of that epoch already done, the global step, the selection result of every stage
(``best``) and the camera-local clusterings finished so far (``camera_local``: camera ->
(image rows, local labels) of that camera's modality listing, -1 = local outlier).

:func:`make_state` writes a checkpoint of this project's format (:mod:`engine.checkpoint`) whose
``epoch`` is the last completed epoch of the current stage (-1: none) and whose ``iteration``
counts the steps of the next one already done. Besides the model, the optimiser, the schedule,
the gradient scaler and the RNG streams, its ``usl`` entry holds:

``plan``, ``stage``          the run's stage names and the current one
``start_from``               the checkpoint a ``--stage`` run started from ("" in a full run)
``best``                     stage name -> {"value", "epoch", "metric", "select_by"}
``camera_local``             camera -> {"rows", "labels"} (int64 tensors)
``selection``                the current camera-local run's silhouette selection (or None)
``epoch_state``              mid-epoch only: the epoch's pseudo labels, memory banks, neighbour
                             sets and match (:meth:`engine.usl.labelling.EpochLabels.state_dict`)
``step``                     the stage-2 step's own state (methods that keep some)

so that ``--resume`` continues inside any stage exactly. :func:`restore_progress` reads it back.
"""
import dataclasses
import json
import os

import torch

from engine.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from engine.run_dir import read_metrics
from engine.training import capture_rng_state
from utils.io import save_text, save_torch

CAMERA_LOCAL_FORMAT = "usl-camera-local"

LAST = "last.pth"
BEST = "best.pth"


def stage_best_file(stage_name):
    """The file of a stage's selected model in the run directory (stage1_best.pth, stage2_best.pth)."""
    return "%s_best.pth" % stage_name


def camera_local_file(camera):
    return "camera_local_%d.pth" % int(camera)


@dataclasses.dataclass
class USLProgress:
    """Where the run stands (module docstring)."""

    stage: int = 0
    epoch: int = 0
    iteration: int = 0
    global_step: int = 0
    best: dict = dataclasses.field(default_factory=dict)
    camera_local: dict = dataclasses.field(default_factory=dict)
    last_saved: str = None


def _camera_local_state(camera_local):
    return {str(cam): {"rows": rows.clone(), "labels": labels.clone()} for cam, (rows, labels) in camera_local.items()}


def make_state(model, optimizer, schedule, amp, cfg, progress, plan, completed_epoch, ctx, start_from="",
               selection=None, epoch_state=None, step_state=None):
    """A resumable checkpoint (module docstring)."""
    usl = {
        "plan": [s.name for s in plan],
        "stage": plan[progress.stage].name,
        "start_from": start_from or "",
        "best": {k: dict(v) for k, v in progress.best.items()},
        "camera_local": _camera_local_state(progress.camera_local),
        "selection": None if selection is None else selection.state_dict(),
        "epoch_state": epoch_state,
        "step": step_state or {},
    }
    return make_checkpoint(model.state_dict(), cfg, 1, completed_epoch, iteration=int(progress.iteration),
                           global_step=int(progress.global_step), optimizer=optimizer.state_dict(),
                           scheduler=schedule.state_dict(), scaler=amp.scaler.state_dict(), rng=capture_rng_state(),
                           usl=usl, meta={"world_size": ctx.world_size, "torch": str(torch.__version__)})


def save_last(state, run_dir, progress):
    """Write last.pth; remember it as the last good checkpoint."""
    path = os.path.join(run_dir, LAST)
    save_checkpoint(path, state)
    progress.last_saved = "%s (%s epoch %d%s)" % (path, state["usl"]["stage"], state["epoch"],
                                                 ", +%d iterations" % state["iteration"] if state["iteration"] else "")


def save_model(path, model, cfg, stage_name, epoch, best):
    """A weights-only checkpoint of a stage's selected model (loadable by test.py and --from)."""
    save_checkpoint(path, make_checkpoint(model.state_dict(), cfg, 1, epoch,
                                          usl={"stage": stage_name, "best": dict(best or {})}))


def check_usl_checkpoint(ckpt, path):
    """CheckpointError unless `ckpt` is a resumable train_usl.py checkpoint."""
    if "usl" not in ckpt or "plan" not in ckpt["usl"]:
        raise CheckpointError("%s is not a resumable train_usl.py checkpoint (no 'usl' stage state): a checkpoint of "
                              "train.py, a converted or a selected-model file cannot be resumed; start a stage from it "
                              "with --stage NAME --from %s" % (path, path))
    for key in ("optimizer", "scheduler", "rng"):
        if key not in ckpt:
            raise CheckpointError("%s has no %r entry and cannot be resumed" % (path, key))


def restore_progress(ckpt, plan, progress):
    """Fill `progress` from a resumable checkpoint of this run's `plan`; returns the position of its stage."""
    usl = ckpt["usl"]
    names = [s.name for s in plan]
    if list(usl["plan"]) != names:
        raise CheckpointError("the checkpoint was written by a run of the stages %s, this run has %s (pass the same "
                              "--stage, or none)" % (", ".join(usl["plan"]), ", ".join(names)))
    progress.stage = names.index(usl["stage"])
    progress.epoch = int(ckpt["epoch"]) + 1
    progress.iteration = int(ckpt.get("iteration", 0))
    progress.global_step = int(ckpt.get("global_step", 0))
    progress.best = {k: dict(v) for k, v in usl["best"].items()}
    progress.camera_local = {int(cam): (v["rows"].clone(), v["labels"].clone())
                             for cam, v in usl["camera_local"].items()}
    return progress.stage


def trim_usl_metrics(path, stage_index, completed_epoch, mid_epoch):
    """Drop metrics.jsonl records written after the checkpoint (a resumed run writes them again):
    those of later stages or epochs; of the interrupted epoch itself, all but its cluster record
    when resuming inside it (its labelling is restored, not redone). Returns how many were dropped."""
    records = read_metrics(path)
    resumed = completed_epoch + 1

    def keep(r):
        position = (r.get("stage_index", -1), r.get("epoch", -1))
        if position < (stage_index, resumed):
            return True
        return position == (stage_index, resumed) and mid_epoch and r.get("kind") == "clusters"

    kept = [r for r in records if keep(r)]
    if len(kept) != len(records):
        save_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def save_camera_local(path, camera, listing, labels, selection):
    """camera_local_<cam>.pth: the kept clustering of a camera-local run (tensors and plain values):
    ``rows`` (the images' indices in their modality's training listing), ``labels`` (local cluster,
    -1 = outlier), ``paths``, the silhouette and the epoch it came from."""
    save_torch(path, {"format": CAMERA_LOCAL_FORMAT, "camera": int(camera), "modality": int(listing.modality),
                      "rows": torch.from_numpy(listing.rows.copy()), "labels": torch.as_tensor(labels).long(),
                      "paths": list(listing.paths), "silhouette": float(selection.best_score),
                      "epoch": selection.best_epoch})


def load_camera_local(folder, cameras):
    """camera -> (rows, labels) read from ``folder/camera_local_<cam>.pth`` for every camera."""
    out = {}
    for camera in cameras:
        path = os.path.join(folder, camera_local_file(camera))
        if not os.path.isfile(path):
            raise CheckpointError("stage 2 prunes with the camera-local clusterings but %s is missing: run the "
                                  "camera-local stage cam%d first (its files go to its OUTPUT_DIR), point "
                                  "USL.CAMERA_LOCAL_DIR at that folder, or set USL.CAMERA_PRUNING False"
                                  % (path, camera))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or foreign files
            raise CheckpointError("cannot read %s: %s" % (path, exc)) from None
        if not isinstance(state, dict) or state.get("format") != CAMERA_LOCAL_FORMAT:
            raise CheckpointError("%s is not a camera-local clustering of train_usl.py" % path)
        out[int(camera)] = (state["rows"], state["labels"])
    return out
