"""The one exception type for bad dataset input (missing files, malformed lists, bad images).

Every message names the offending path (or key) and says what was expected, so a user sees
one clear line instead of a traceback from deep inside a DataLoader worker.
"""
from utils.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset root, list file, label set or image is missing or not what was expected."""
