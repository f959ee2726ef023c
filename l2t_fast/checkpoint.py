"""Atomic checkpoints that load with ``torch.load(path, weights_only=True)``.

A resumed run must continue exactly where the interrupted one stopped, so a checkpoint
holds, besides the training state, every random number generator the run draws from:
torch's, numpy's, Python's, and the run's own data generator (batch order, augmentation).
All are stored as tensors, numbers and strings, never pickled objects.
"""
import os
import random
import tempfile
import warnings

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (empty, truncated, not ours) or that belongs to
    another run; the message names the file and what to do."""


def _fsync_folder(folder):
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def save_atomic(obj, path, keep_previous=False):
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one:
    save into a temporary file in the same folder, flush it to disk (fsync), then
    ``os.replace`` it over ``path``. With ``keep_previous`` the file it replaces is kept as
    ``previous_path(path)``, for ``load_latest`` to fall back to."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, previous_path(path))
        os.replace(temporary, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def previous_path(path):
    """Where ``save_atomic(..., keep_previous=True)`` keeps the file before the last one."""
    root, extension = os.path.splitext(str(path))
    return f"{root}.previous{extension}"


def load(path, what="checkpoint", remedy="delete it"):
    """Load a checkpoint onto the CPU, refusing anything but plain data (``weights_only``).
    A file that cannot be read is a ``CheckpointError`` naming it, ``what`` it is and the
    ``remedy``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load raises many kinds on a bad file
        size = os.path.getsize(path) if os.path.exists(path) else 0
        state = "empty" if size == 0 else f"unreadable ({size} bytes: {type(error).__name__})"
        raise CheckpointError(f"{what} {str(path)!r} is {state}: it was cut short or is not "
                              f"a checkpoint of l2t_fast; {remedy}") from error


def load_latest(path, what="checkpoint", remedy="delete it"):
    """``load(path)``, or, if that file is unreadable, the one before it (kept by
    ``save_atomic(keep_previous=True)``), with a warning; ``None`` if neither exists."""
    candidates = [p for p in (str(path), previous_path(path)) if os.path.exists(p)]
    errors = []
    for candidate in candidates:
        try:
            state = load(candidate, what, remedy)
        except CheckpointError as error:
            errors.append(str(error))
            continue
        if errors:
            warnings.warn(f"{errors[0]}; resuming from the previous checkpoint {candidate!r}",
                          stacklevel=2)
        return state
    if errors:
        raise CheckpointError("; ".join(errors))
    return None


def rng_state():
    """The global random states of torch (CPU and CUDA), numpy and Python, as plain data."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()),
                     python["gauss_next"]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    """Seed torch, numpy and Python's ``random`` alike, so that a run depends on ``seed`` only."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
