"""l2t_fast: fast "Learning What and Where to Transfer" (L2T-ww) for PyTorch.

Public names are imported lazily, so that ``import l2t_fast`` stays cheap and the
compiled extension, Triton and the training engine load only when used.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "weighted_feature_matching": "l2t_fast.matching",
    "WeightedFeatureMatching": "l2t_fast.matching",
    "available_backends": "l2t_fast.matching",
    "WhatNetwork": "l2t_fast.methods.l2tww.meta",
    "WhereNetwork": "l2t_fast.methods.l2tww.meta",
    "L2TWW": "l2t_fast.methods.l2tww.engine",
    "FeatureHooks": "l2t_fast.models.hooks",
    "suggest_layers": "l2t_fast.models.layers",
    "build_model": "l2t_fast.models",
    "build_method": "l2t_fast.methods",
    "Batch": "l2t_fast.methods.base",
    "Setup": "l2t_fast.methods.base",
    "evaluate": "l2t_fast.methods.base",
    "run_transfer": "l2t_fast.jobs.transfer",
    "resolve_config": "l2t_fast.jobs.transfer",
    "run_sweep": "l2t_fast.jobs.sweep",
    "retain_freed_memory": "l2t_fast.host_memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'l2t_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
