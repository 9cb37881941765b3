"""Run logging: Python logging to the console and ``<run dir>/train.log``, and tensorboardX
scalars, on rank 0 only (other DDP ranks get silent stand-ins).

Console lines go through ``tqdm.write`` so they do not tear an active progress bar; INFO goes
to stdout, warnings and errors to stderr.
"""
import logging
import os
import sys

from tqdm import tqdm

LOGGER_NAME = "cmfn"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _TqdmConsoleHandler(logging.Handler):
    def emit(self, record):
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
        except Exception:
            self.handleError(record)


def setup_logger(log_file=None, rank=0, name=LOGGER_NAME):
    """The project logger: console + `log_file` (appended) on rank 0, silent elsewhere.

    Calling it again replaces the handlers of an earlier call (in-process reruns, tests).
    """
    logger = logging.getLogger(name)
    close_logger(logger)
    logger.propagate = False
    if rank != 0:
        logger.setLevel(logging.ERROR)
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    formatter = logging.Formatter(_FORMAT, _DATE_FORMAT)
    console = _TqdmConsoleHandler()
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def close_logger(logger):
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class TensorboardWriter:
    """tensorboardX SummaryWriter on rank 0; every method is a no-op when disabled."""

    def __init__(self, log_dir, enabled=True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)

    def add_scalar(self, tag, value, step):
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), int(step))

    def add_scalars(self, prefix, values, step):
        """One scalar per entry of `values`, tagged ``prefix/key``."""
        for key, value in values.items():
            self.add_scalar("%s/%s" % (prefix, key), value, step)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
