"""Safeguards of the training loop: reproducible randomness, mixed precision, a finite-loss
guard and a graceful stop on SIGINT / SIGTERM.

Randomness. Every epoch starts by reseeding Python ``random``, numpy and torch (CPU and all
CUDA devices) from :func:`derive_seed` ``(SEED, epoch, rank)``. The sampler and the loader's
worker seeds derive from ``(SEED, epoch)`` too (data/), so epoch ``e`` draws the same numbers
whether the process trained epochs ``0..e-1`` itself or resumed from a checkpoint.
:func:`capture_rng_state` / :func:`restore_rng_state` still record the generators as plain
tensors, lists and ints (loadable with ``torch.load(weights_only=True)``); a resume in the
middle of an epoch needs them.

Mixed precision (``SOLVER.AMP``): ``none`` (fp32, released), ``bf16`` (autocast on CPU or
GPU, no loss scaling) or ``fp16`` (CUDA only, autocast + ``torch.amp.GradScaler``). fp16 on
a CPU raises :class:`~utils.config.ConfigError`: CPU fp16 kernels are slow or missing and
loss scaling buys nothing there; bf16 is the CPU choice. ``auto`` picks fp16 on CUDA (the
released FusionReID recipe) and bf16 elsewhere.
"""
import math
import os
import random
import signal
import threading

import numpy as np
import torch

from utils.config import ConfigError
from utils.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- randomness
def derive_seed(seed, epoch, rank=0):
    """A 31-bit seed that depends only on (seed, epoch, rank)."""
    state = np.random.SeedSequence([int(seed), int(epoch) + 1, int(rank)]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def seed_everything(seed):
    """Seed Python ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def seed_epoch(seed, epoch, rank=0):
    """Reseed every global generator for `epoch`; returns the derived seed."""
    derived = derive_seed(seed, epoch, rank)
    seed_everything(derived)
    return derived


def configure_determinism(deterministic):
    """Deterministic kernels (bitwise-reproducible runs) or the released cudnn.benchmark."""
    if deterministic:
        # cuBLAS reproducibility needs a fixed workspace; read when CUDA first initialises.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)


def capture_rng_state():
    """The state of every global generator as tensors, lists and ints."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [int(version), [int(v) for v in mt_state], gauss],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Inverse of :func:`capture_rng_state` (CUDA states only where devices match)."""
    version, mt_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in mt_state), gauss))
    np_state = state["numpy"]
    np.random.set_state((
        np_state["name"],
        np_state["keys"].numpy().astype(np.uint32),
        int(np_state["pos"]),
        int(np_state["has_gauss"]),
        float(np_state["cached_gaussian"]),
    ))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------ mixed precision
def native_bf16(device_type):
    """True when the device type has native bf16 kernels (CUDA: the GPU supports bf16; CPU:
    oneDNN's bf16 path, AVX-512 BF16 / AMX). Without them CPU bf16 convolutions fall back to
    reference kernels, measured here 21x slower than fp32 for a FusionReID training step."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class MixedPrecision:
    """Autocast context and gradient scaler for one ``SOLVER.AMP`` mode on one device type.

    One code path serves every mode: with ``none``/``bf16`` the scaler is disabled and
    ``scaler.scale(loss)`` / ``scaler.step(opt)`` reduce to ``loss`` / ``opt.step()``.
    """

    def __init__(self, mode, device_type):
        if mode not in ("none", "bf16", "fp16", "auto"):
            raise ConfigError("SOLVER.AMP must be none, bf16, fp16 or auto, got %r" % mode)
        if mode == "auto":
            mode = "fp16" if device_type == "cuda" else "bf16"
        if mode == "fp16" and device_type != "cuda":
            raise ConfigError(
                "SOLVER.AMP fp16 needs a CUDA device (autocast + GradScaler); on %s use SOLVER.AMP bf16 "
                "or none" % device_type
            )
        self.mode = mode
        self.device_type = device_type
        self.dtype = AMP_DTYPES.get(mode)
        self.scaler = torch.amp.GradScaler(device_type, enabled=mode == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def warning(self):
        """One line for the log when this mode is slow on this device (bf16 on a CPU without
        native bf16 kernels, :func:`native_bf16`), else ""."""
        if self.mode == "bf16" and self.device_type == "cpu" and not native_bf16("cpu"):
            return ("SOLVER.AMP bf16: this CPU (%s) has no native bf16 kernels, so bf16 autocast runs many times "
                    "slower than fp32 here (a FusionReID step measured 21x); SOLVER.AMP none trains in fp32"
                    % torch.backends.cpu.get_cpu_capability())
        return ""


# ----------------------------------------------------------------------------- loss guard
class NonFiniteError(UserError, FloatingPointError):
    """The training loss or the model's weights / BN statistics became NaN or infinite."""


def check_finite_loss(terms, epoch, iteration, global_step, last_checkpoint):
    """Raise :class:`NonFiniteError` unless every loss term is finite.

    The message names the step, the offending terms and the last good checkpoint to go back to
    (``last_checkpoint`` is a description such as ``"runs/x/last.pth (epoch 3)"`` or None).
    """
    bad = {name: value for name, value in terms.items() if not math.isfinite(value)}
    if not bad:
        return
    where = last_checkpoint or "none written yet"
    raise NonFiniteError(
        "non-finite loss at epoch %d, iteration %d (global step %d): %s; all terms: %s. Stopped "
        "without saving this state. Last good checkpoint: %s. Lower SOLVER.BASE_LR, check the "
        "data, or try SOLVER.AMP none."
        % (epoch, iteration, global_step,
           ", ".join("%s=%s" % kv for kv in bad.items()),
           ", ".join("%s=%.4g" % kv for kv in terms.items()), where)
    )


def check_finite_state(state_dict, epoch, last_checkpoint):
    """Raise :class:`NonFiniteError` naming the first tensors of `state_dict` that hold NaN/inf.

    A finite loss does not guarantee finite BN running statistics; evaluating such a model
    would fail later with a less telling message.
    """
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(
            "non-finite model state after epoch %d in %d tensor(s): %s%s. Stopped without saving it. Last good "
            "checkpoint: %s. Lower SOLVER.BASE_LR or try SOLVER.AMP none."
            % (epoch, len(bad), ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "",
               last_checkpoint or "none written yet")
        )


# ---------------------------------------------------------------------------- graceful stop
class GracefulStop:
    """Turns the first SIGINT / SIGTERM into a request the loop polls (``requested``).

    The loop then writes a resumable checkpoint and exits with ``128 + signal``. A second
    SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the main thread
    and restored on exit from the ``with`` block.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + int(self.signum) if self.signum is not None else 0

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
