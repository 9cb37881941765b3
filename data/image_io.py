"""Image decoding shared by every dataset: open as RGB, resize, decode many in parallel.

Resizing uses one of :data:`RESAMPLE` (``INPUT.RESIZE_FILTER``): ``lanczos`` (the released
CMFN code, PIL's LANCZOS = the old ANTIALIAS), ``bilinear`` (PIL's antialiased bilinear, the
torchvision ``Resize`` default that IV-REID and FusionReID's test images use) or ``bicubic``
(PIL's bicubic, FusionReID's training images). ``decode_resized(paths, (W, H))`` returns a uint8 array [N, H, W, 3] (or fills a given one,
e.g. a memory-mapped .npy file). Decoding runs in a thread pool: Pillow releases the GIL
while it decodes and resamples, so threads scale across cores without copying pixels between
processes. A file that cannot be decoded raises one :class:`DatasetError` listing every bad
path (the whole batch is checked first, so all broken files are reported at once).
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from data.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# Images decoded per task: large enough to amortise scheduling, small enough to balance.
_CHUNK = 64


def list_image_files(folder):
    """Sorted image file names (not paths) in `folder`; hidden files and others skipped."""
    return sorted(
        name for name in os.listdir(folder)
        if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    )


def open_image(path):
    """The fully decoded image at `path` as RGB; any decoding problem names the path."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError("image not found: %s" % path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError("cannot decode image %s (%s: %s)" % (path, type(exc).__name__, exc)) from None


def resize_image(img, size, resample="lanczos"):
    """The PIL image `img` at `size` = (W, H) with the filter named `resample` (unchanged if already)."""
    if img.size != tuple(size):
        img = img.resize(tuple(size), RESAMPLE[resample])
    return img


def load_resized(path, size, resample="lanczos"):
    """uint8 [H, W, 3] of `path` resized to `size` = (W, H) with the filter named `resample`."""
    return np.asarray(resize_image(open_image(path), size, resample))


def default_workers():
    """Decoding threads: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _decode_chunk(paths, size, out, start, resample):
    bad = []
    for k, path in enumerate(paths):
        try:
            out[start + k] = load_resized(path, size, resample)
        except DatasetError as exc:
            bad.append(str(exc))
    return bad


def decode_resized(paths, size, out=None, workers=None, progress=None, resample="lanczos"):
    """Decode `paths` into `out` (created if None) = uint8 [N, H, W, 3] at `size` = (W, H).

    `progress`: a description string to show a tqdm bar, or None for none.
    Raises DatasetError naming every image that could not be decoded.
    """
    width, height = int(size[0]), int(size[1])
    if out is None:
        out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    elif out.shape != (len(paths), height, width, 3):
        raise ValueError("output array has shape %s, expected %s" % (out.shape, (len(paths), height, width, 3)))
    workers = workers or default_workers()
    starts = range(0, len(paths), _CHUNK)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc=progress, unit="img", dynamic_ncols=True)
    bad = []
    try:
        if workers == 1:
            for s in starts:
                bad += _decode_chunk(paths[s:s + _CHUNK], (width, height), out, s, resample)
                if bar is not None:
                    bar.update(len(paths[s:s + _CHUNK]))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [
                    (pool.submit(_decode_chunk, paths[s:s + _CHUNK], (width, height), out, s, resample),
                     len(paths[s:s + _CHUNK]))
                    for s in starts
                ]
                for future, n in futures:
                    bad += future.result()
                    if bar is not None:
                        bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if bad:
        shown = "\n  ".join(bad[:20])
        more = "\n  ... and %d more" % (len(bad) - 20) if len(bad) > 20 else ""
        raise DatasetError("%d image(s) could not be read:\n  %s%s" % (len(bad), shown, more))
    return out
