"""Pseudo-labelled training data of the unsupervised recipe (TokenMatcher / CMAG): the
per-modality listings, the training sets over pseudo labels, the extraction set, and the
two per-modality loaders.

**Listings** (:func:`usl_listings`): the SYSU (and demo) or RegDB training images of one
dataset, read from the raw layouts through the dataset's ``train_listing()`` (no converted
copy on disk), as one :class:`ModalityListing` per modality, in the released order: sorted
by the file name the released conversion gives each image, ``<id:04d>_c<camera>_<file>``
(SYSU: ids, then cameras, then files) or ``<label>_c1_<file>`` (RegDB, the label not
padded). An image's **global index** is its position in that order. Cameras are the
released 0-based ones (SYSU 0-5: RGB 0, 1, 3, 4, IR 2, 5; RegDB always 0). The dataset's
identities are kept as ``true_pids`` for monitoring the pseudo labels only: nothing here
puts them in a batch.

**Training sets** (:class:`PseudoLabelSet`): item i = global index i with its pseudo label
(``set_labels``; -1 = outlier, never sampled). ``set[SampleIndex(i, seed)]`` is
``{"images": [V, 3, H, W], "pids": pseudo label, "camids": camera, "modality": 0 or 1,
"index": i}`` with one row per view (RGB stages: view 1 and view 2; IR and the RGB
camera-local runs: one view). The item's seed drives all its views through
``AugRng.from_seed(seed)`` (view 1 first), so the sample is the same in any worker; an item
without a seed uses the process-global generators, as released. :func:`collate_views` puts
the views in blocks: rows 0..B-1 view 1 of the B items, rows B..2B-1 view 2 in the same
order (the released ``cat((x_view1, x_view2))``), the other keys repeated per block. The
released trainer reads the list's camera slot as ``indexes``: that is ``index`` where the
slot holds the global index (SYSU stage 2), ``camids`` where it holds the camera.

Images are paths (decoded per sample, exactly the released pipeline) or, after
:meth:`ModalityListing.preloaded`, rows of a uint8 array pre-resized with bicubic to the
training size: faster, the same for pipelines that resize first (SYSU stage 1, the
clustering transform), and an approximation where the colour jitter comes before the resize.

**Loaders** (:func:`build_pseudo_loader`): one per modality (released: IR 128 images, RGB 64
images = 128 rows, 16 instances per label), each over a
:class:`data.samplers.multiple_gallery.MultipleGallerySampler` that yields exactly the
epoch's ``num_iters`` batches; the two loaders advance independently and are zipped.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.datasets.regdb import RegDB
from data.datasets.sysu import SYSUMM01
from data.errors import DatasetError
from data.image_io import decode_resized, open_image
from data.samplers.multiple_gallery import MultipleGallerySampler
from data.usl_transforms import AugRng
from utils.errors import ConfigError

VISIBLE, INFRARED = 0, 1


@dataclass
class ModalityListing:
    """One modality's training images in the released order (module docstring).

    ``images``: paths or a uint8 array [N, H, W, 3]; ``paths`` [N]; ``cams`` [N] released
    0-based cameras; ``true_pids`` [N] the dataset's identities (monitoring only); ``rows``
    [N] the global indices in the full listing (0..N-1 unless a subset)."""

    modality: int
    images: object
    paths: list
    cams: np.ndarray
    true_pids: np.ndarray
    rows: np.ndarray = None

    def __post_init__(self):
        self.paths = list(self.paths)
        self.cams = np.asarray(self.cams, dtype=np.int64).reshape(-1)
        self.true_pids = np.asarray(self.true_pids, dtype=np.int64).reshape(-1)
        self.rows = np.arange(len(self.paths), dtype=np.int64) if self.rows is None else \
            np.asarray(self.rows, dtype=np.int64).reshape(-1)
        if not len(self.images) == len(self.paths) == len(self.cams) == len(self.true_pids) == len(self.rows):
            raise ValueError("ModalityListing: %d images, %d paths, %d cams, %d pids, %d rows" % (
                len(self.images), len(self.paths), len(self.cams), len(self.true_pids), len(self.rows)))

    def __len__(self):
        return len(self.paths)

    def subset(self, positions):
        """The listing of `positions` (in that order); ``rows`` keep their global indices."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        images = [self.images[i] for i in positions] if isinstance(self.images, list) else self.images[positions]
        return ModalityListing(self.modality, images, [self.paths[i] for i in positions], self.cams[positions],
                               self.true_pids[positions], self.rows[positions])

    def camera(self, cam):
        """The images of one camera (a camera-local run's list), in the listing's order."""
        positions = np.flatnonzero(self.cams == int(cam))
        if not len(positions):
            raise DatasetError("no %s training images of camera %d (cameras present: %s)" % (
                "visible" if self.modality == VISIBLE else "infrared", cam, sorted(set(self.cams.tolist()))))
        return self.subset(positions)

    def preloaded(self, size, workers=None):
        """The same listing with ``images`` decoded and resized with bicubic to `size` = (H, W)."""
        images = decode_resized(self.paths, (int(size[1]), int(size[0])), workers=workers, resample="bicubic")
        return ModalityListing(self.modality, images, self.paths, self.cams, self.true_pids, self.rows)


def _sysu_name(path, cam):
    return "%s_c%d_%s" % (os.path.basename(os.path.dirname(path)), cam, os.path.basename(path))


def _regdb_name(path, label):
    return "%d_c1_%s" % (label, os.path.basename(path))


def usl_listings(dataset):
    """(visible, infrared) :class:`ModalityListing` of a SYSU, demo or RegDB dataset object."""
    rgb, ir = dataset.train_listing()
    out = []
    for modality, lst in ((VISIBLE, rgb), (INFRARED, ir)):
        if isinstance(dataset, SYSUMM01):
            names = [_sysu_name(p, c) for p, c in zip(lst.paths, lst.camids.tolist())]
            cams = lst.camids - 1
        elif isinstance(dataset, RegDB):
            names = [_regdb_name(p, label) for p, label in zip(lst.paths, lst.pids.tolist())]
            cams = np.zeros(len(lst), dtype=np.int64)
        else:
            raise ConfigError("DATASET.NAME: the unsupervised recipe reads SYSU-MM01 (sysu, demo) or RegDB (regdb) "
                              "training sets, got a %s dataset" % type(dataset).__name__)
        if len(set(names)) != len(names):
            raise DatasetError("%s training images share a file name; the released order needs unique names"
                               % ("visible" if modality == VISIBLE else "infrared"))
        order = sorted(range(len(names)), key=names.__getitem__)
        paths = [lst.paths[i] for i in order]
        out.append(ModalityListing(modality, paths, paths, cams[order], lst.pids[order]))
    return tuple(out)


def _check_labels(labels, n, what):
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != n:
        raise ValueError("%s: %d pseudo labels for %d images" % (what, len(labels), n))
    if len(labels) and labels.min() < -1:
        raise ValueError("%s: pseudo labels must be >= -1 (-1 = outlier), got %d" % (what, labels.min()))
    return labels


class PseudoLabelSet(Dataset):
    """Augmented samples of one modality's pseudo-labelled items (module docstring).

    ``views``: the transforms of the item's views in row-block order, each called as
    ``transform(image, rng)`` with one :class:`data.usl_transforms.AugRng` for all of them."""

    def __init__(self, listing, views, labels=None):
        self.listing = listing
        self.views = list(views)
        if not self.views:
            raise ValueError("PseudoLabelSet needs at least one view transform")
        self.set_labels(np.full(len(listing), -1, dtype=np.int64) if labels is None else labels)

    def set_labels(self, labels):
        """This epoch's pseudo labels [N] (-1 = outlier)."""
        self.labels = _check_labels(labels, len(self.listing), "PseudoLabelSet")

    def __len__(self):
        return len(self.listing)

    def __getitem__(self, item):
        i = int(item)
        label = int(self.labels[i])
        if label < 0:
            raise IndexError("item %d is an outlier this epoch (pseudo label -1) and cannot be sampled" % i)
        seed = getattr(item, "seed", None)
        rng = AugRng.global_state() if seed is None else AugRng.from_seed(seed)
        image = self.listing.images[i]
        if isinstance(image, str):
            image = open_image(image)
        return {"images": torch.stack([view(image, rng) for view in self.views]), "pids": label,
                "camids": int(self.listing.cams[i]), "modality": int(self.listing.modality), "index": i}


def collate_views(samples):
    """Samples with ``images`` [V, 3, H, W] -> one batch: ``images`` [V*B, 3, H, W] in view
    blocks, the int64 keys [V*B] repeated per block."""
    views = samples[0]["images"].shape[0]
    batch = {"images": torch.cat([torch.stack([s["images"][v] for s in samples]) for v in range(views)])}
    for key in samples[0]:
        if key != "images":
            batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.int64).repeat(views)
    return batch


class ExtractionSet(Dataset):
    """``{"images": [3, H, W], "index": global index}`` of every image (or of ``positions``,
    e.g. one rank's shard) through a deterministic ``transform(image)``."""

    def __init__(self, listing, transform, positions=None):
        self.listing, self.transform = listing, transform
        self.positions = np.arange(len(listing), dtype=np.int64) if positions is None else \
            np.asarray(positions, dtype=np.int64).reshape(-1)

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, k):
        i = int(self.positions[k])
        return {"images": self.transform(self.listing.images[i]), "index": i}


def build_pseudo_loader(dataset, labels, slots, batch_size, num_instances, num_iters, seed=0, stream=0, epoch=0,
                        order="seeded", workers=0, rank=0, world_size=1, pin_memory=False):
    """The DataLoader of one modality for one epoch: `dataset` (a :class:`PseudoLabelSet`)
    takes `labels` [N]; a :class:`MultipleGallerySampler` over (labels, camera `slots` [N])
    yields `num_iters` global batches of `batch_size` items (this rank's share per batch).
    Returns (loader, sampler)."""
    dataset.set_labels(labels)
    sampler = MultipleGallerySampler(dataset.labels, slots, num_instances, batch_size, num_iters=num_iters, seed=seed,
                                     order=order, stream=stream, rank=rank, world_size=world_size, epoch=epoch)
    generator = torch.Generator()
    sampler.generator = generator
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate_views, num_workers=int(workers),
                        pin_memory=bool(pin_memory) and torch.cuda.is_available(), generator=generator)
    return loader, sampler
