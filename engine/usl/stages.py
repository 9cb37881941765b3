"""The stage plan of an unsupervised TokenMatcher run, per dataset.

A run goes through its stages in order; each stage is a :class:`Stage`:

==========  ==========  ==========================================================  ================
name        kind        what it trains                                              starts from
==========  ==========  ==========================================================  ================
``stage1``  stage1      both modalities against their own cluster memories          the built model
``cam<k>``  camera      camera k's images alone (SYSU), to keep the clustering of   stage 1's model
                        its best-silhouette epoch for stage 2's pruning
``stage2``  stage2      cross-modal: matched clusters, mixed memories, neighbours   stage 1's model
==========  ==========  ==========================================================  ================

SYSU-MM01 and the demo (its synthetic layout): ``stage1``, the camera-local runs of
``USL.CAMERA.CAMERAS`` (released order 2, 5, 0, 1, 3, 4; cameras 2 and 5 are infrared, the
others visible), ``stage2``. RegDB (one camera per modality): ``stage1``, ``stage2``, one run
per trial (DATASET.TRIAL). "Stage 1's model" is the one stage 1 selected (``stage1_best.pth``
of the run directory); a stage run alone (``--stage NAME --from CKPT``) starts from CKPT.

The values of each stage come from ``USL.STAGE1.*``, ``USL.STAGE2.*`` and ``USL.CAMERA.*``
(epochs, iterations per epoch, SGD lr, cosine period and floor); ``index`` is the stage's
position in the dataset's full plan, which keys its random streams, so a stage draws the same
numbers whether it runs in the full plan or alone.
"""
from dataclasses import dataclass
from typing import Optional

from model.base import INFRARED, VISIBLE
from utils.errors import ConfigError

KINDS = ("stage1", "camera", "stage2")
SYSU_INFRARED_CAMERAS = (2, 5)
SYSU_CAMERAS = tuple(range(6))


@dataclass(frozen=True)
class Stage:
    """One stage of the plan (module docstring). ``modality``, ``camera``: the camera-local
    run's images; ``eps``: its DBSCAN radius (the global one for the other stages);
    ``best_metric``: what selects the stage's model (None: a camera run selects none)."""

    name: str
    kind: str
    index: int
    epochs: int
    iters: int
    lr: float
    t_max: int
    eta_min: float
    eps: float
    camera: Optional[int] = None
    modality: Optional[int] = None
    best_metric: Optional[str] = None

    @property
    def start(self):
        """``"model"`` (the built model) for stage 1, ``"stage1"`` (stage 1's model) otherwise."""
        return "model" if self.kind == "stage1" else "stage1"


def camera_stage_name(camera):
    return "cam%d" % int(camera)


def _positive(value, key):
    if int(value) < 1:
        raise ConfigError("%s must be >= 1, got %r" % (key, value))
    return int(value)


def _solver_stage(cfg, name, index, eps):
    node = cfg.USL[name.upper()]
    key = "USL.%s." % name.upper()
    return Stage(name, name, index, _positive(node.EPOCHS, key + "EPOCHS"), _positive(node.ITERS, key + "ITERS"),
                 float(node.LR), _positive(node.T_MAX, key + "T_MAX"), float(node.ETA_MIN), float(eps),
                 best_metric=node.BEST_METRIC)


def _camera_stages(cfg, first_index):
    cam = cfg.USL.CAMERA
    cameras = [int(c) for c in cam.CAMERAS]
    if not cameras:
        return []
    if cfg.DATASET.NAME == "regdb":
        raise ConfigError("USL.CAMERA.CAMERAS must be empty on RegDB (one camera per modality: no camera-local "
                          "runs), got %s" % cameras)
    if len(set(cameras)) != len(cameras) or not set(cameras) <= set(SYSU_CAMERAS):
        raise ConfigError("USL.CAMERA.CAMERAS must list distinct SYSU camera ids 0..5, got %s" % cameras)
    if len(cam.EPS) != len(SYSU_CAMERAS):
        raise ConfigError("USL.CAMERA.EPS must give the DBSCAN radius of each camera 0..5 (6 values), got %s"
                          % list(cam.EPS))
    stages = []
    for offset, camera in enumerate(cameras):
        infrared = camera in SYSU_INFRARED_CAMERAS
        epochs = cam.EPOCHS_IR if infrared else cam.EPOCHS_RGB
        stages.append(Stage(camera_stage_name(camera), "camera", first_index + offset,
                            _positive(epochs, "USL.CAMERA.EPOCHS_%s" % ("IR" if infrared else "RGB")),
                            _positive(cam.ITERS, "USL.CAMERA.ITERS"), float(cam.LR),
                            _positive(cam.T_MAX, "USL.CAMERA.T_MAX"), float(cam.ETA_MIN), float(cam.EPS[camera]),
                            camera=camera, modality=INFRARED if infrared else VISIBLE))
    return stages


def stage_plan(cfg):
    """The dataset's full plan: [:class:`Stage`] in order (module docstring)."""
    cameras = _camera_stages(cfg, 1)
    if cfg.USL.CAMERA_PRUNING and sorted(s.camera for s in cameras) != list(SYSU_CAMERAS):
        raise ConfigError("USL.CAMERA_PRUNING needs a camera-local run of every camera 0..5 (USL.CAMERA.CAMERAS, got "
                          "%s); set USL.CAMERA_PRUNING False to train stage 2 without pruning"
                          % [s.camera for s in cameras])
    eps = cfg.USL.CLUSTER.EPS
    return [_solver_stage(cfg, "stage1", 0, eps)] + cameras + [_solver_stage(cfg, "stage2", 1 + len(cameras), eps)]


def run_plan(cfg, only=None):
    """The stages a run goes through: the full plan, or the stage named `only` alone."""
    plan = stage_plan(cfg)
    if only is None:
        return plan
    names = [s.name for s in plan]
    if only not in names:
        raise ConfigError("--stage %s: no such stage for %s (its stages: %s)" % (only, cfg.DATASET.NAME,
                                                                                 ", ".join(names)))
    return [plan[names.index(only)]]
