"""Atomic checkpoints that load with ``torch.load(path, weights_only=True)``.

A resumed run must continue exactly where the interrupted one stopped, so a checkpoint
holds, besides the training state, every random number generator the run draws from:
torch's, numpy's, Python's, and the run's own data generator (batch order, augmentation).
All are stored as tensors, numbers and strings, never pickled objects.
"""
import os
import random
import tempfile

import numpy as np
import torch


def save_atomic(obj, path):
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one:
    save into a temporary file in the same folder, then ``os.replace`` it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load(path):
    """Load a checkpoint onto the CPU, refusing anything but plain data (``weights_only``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


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
