"""Readers for the datasets' text files: comma-separated id files and "<path> <label>" lists.

* ID files (SYSU ``exp/*_id.txt``, LLCM ``idx/test_id.txt``): only the first line is read;
  it holds comma-separated integer ids, as the released readers parse it.
* Label lists (RegDB ``idx/*_{t}.txt``, LLCM ``idx/train_*.txt``): one ``<relative path>
  <int label>`` per line, the path relative to the dataset root (datasets/README.md).

Errors name the file (and line) and what was expected.
"""
import os

from data.errors import DatasetError


def read_id_file(path):
    """The ids on the first line of `path` (comma-separated ints), in file order."""
    if not os.path.isfile(path):
        raise DatasetError("id file not found: %s (expected one line of comma-separated ids)" % path)
    with open(path) as f:
        first = f.readline().strip()
    if not first:
        raise DatasetError("id file %s is empty (expected one line of comma-separated ids)" % path)
    try:
        return [int(tok) for tok in first.split(",") if tok.strip()]
    except ValueError:
        raise DatasetError("id file %s: expected comma-separated integers on the first line, got %r"
                           % (path, first[:80])) from None


def read_label_list(path, root, check_files=True):
    """(relative paths, int labels) of a "<path> <label>" list; files checked under `root`."""
    if not os.path.isfile(path):
        raise DatasetError("list file not found: %s (expected '<relative path> <label>' lines)" % path)
    rels, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            try:
                if len(parts) != 2:
                    raise ValueError
                labels.append(int(parts[1]))
            except ValueError:
                raise DatasetError("%s line %d: expected '<relative path> <int label>', got %r"
                                   % (path, lineno, line[:100])) from None
            rels.append(parts[0].lstrip("/"))
    if not rels:
        raise DatasetError("list file %s has no entries (expected '<relative path> <label>' lines)" % path)
    if check_files:
        missing = [r for r in rels if not os.path.isfile(os.path.join(root, r))]
        if missing:
            shown = ", ".join(missing[:5]) + (" ... (%d in all)" % len(missing) if len(missing) > 5 else "")
            raise DatasetError("%s names %d image(s) that do not exist under %s: %s" % (path, len(missing), root, shown))
    return rels, labels


def require_root(root, dataset, expected):
    """`root` must be a directory; otherwise name it, the dataset and the expected layout."""
    if not os.path.isdir(root):
        raise DatasetError("%s root not found: %s (expected %s; see datasets/README.md)" % (dataset, root, expected))
