"""The one dispatch point: which backend computes the channel errors for given inputs.

A backend is a name, a check of whether it can run here (and on given inputs), and a
``channel_errors`` function (see ``registration`` for the ops behind the compiled ones).
``"auto"`` picks the fastest available backend for the inputs' device and dtype; naming
one that cannot run raises an error that says why, never a silent fallback. A backend
other than the reference is checked against it once per (device, dtype) in a process
(``self_check``) before it is first handed out.
"""
import os
import sys
import threading
from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Optional

import torch

from l2t_fast.matching.backends import compiled, reference, self_check  # noqa: F401  (cheap; Triton loads lazily)

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Preference of "auto" among GPU backends. Not yet measured on a GPU (no device in the
# session that wrote this): the CUDA extension first, as it has no JIT warm-up.
GPU_PREFERENCE = ("cuda", "triton")
FLOAT_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here, or not on these inputs."""


class BackendMismatch(BackendUnavailable):
    """A backend's results on the self-check's problem differ from the reference backend's."""


@dataclass(frozen=True)
class Backend:
    name: str
    module: str               # module that provides channel_errors (imported on first use)
    why_unavailable: Callable[[], Optional[str]]
    why_unsupported: Callable[[torch.device, torch.dtype], Optional[str]]

    @property
    def channel_errors(self):
        return self._module().channel_errors

    @property
    def channel_errors_jvp(self):
        """``(source, target, weight, bias, pair_source, pair_target, tangent_target,
        tangent_weight, tangent_bias) -> dE``: the errors' derivative along the tangents."""
        return self._module().channel_errors_jvp

    @property
    def channel_errors_vjp(self):
        """``(grad_errors, source, target, weight, bias, pair_source, pair_target) ->
        (grad_target[], grad_weight[], grad_bias[])`` without computing the errors;
        differentiable when grad mode is on."""
        return self._module().channel_errors_vjp

    @property
    def channel_errors_with_grads(self):
        """The fused op (``registration``: the errors and the gradients of ``<grad_errors,
        E>`` in one sweep), or None where the backend has no kernel for it: only the C++
        CPU kernels do (and not an extension built before it: that one keeps working)."""
        if self.name != "cpu":
            return None
        return getattr(torch.ops.l2t_fast, "channel_errors_with_grads", None)

    def _module(self):
        # Imported by the availability check already; sys.modules keeps torch.compile's
        # tracing away from the import machinery.
        return sys.modules.get(self.module) or import_module(self.module)


def _extension_problem(need_cuda=False):
    problem = compiled.load_problem()
    if problem is None and need_cuda and not compiled.has_cuda_kernels():
        return ("the compiled extension l2t_fast._C was built without CUDA kernels (it needs "
                "a CUDA toolkit and a CUDA-enabled torch at build time); rebuild with "
                "`pip install -e . --no-build-isolation` on a machine with both")
    if problem is None and need_cuda and not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return problem


def _triton_problem():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("Triton needs a CUDA device, or TRITON_INTERPRET=1 set before Triton is "
                "imported to run its kernels on CPU tensors (slowly)")
    try:
        sys.modules.get("l2t_fast.matching.backends.triton") or import_module("l2t_fast.matching.backends.triton")
    except ImportError as error:
        return f"Triton does not import ({error}); install it with `pip install triton`"
    return None


def _dtype_problem(dtype, allowed):
    if dtype not in allowed:
        return f"dtype {dtype} is not supported (supported: {', '.join(map(str, allowed))})"
    return None


def _on(device_type, dtypes):
    def why(device, dtype):
        if device.type != device_type:
            return f"it runs on {device_type} tensors, the inputs are on {device}"
        return _dtype_problem(dtype, dtypes)
    return why


def _triton_unsupported(device, dtype):
    if device.type == "cuda":
        return _dtype_problem(dtype, FLOAT_DTYPES + HALF_DTYPES)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return _dtype_problem(dtype, FLOAT_DTYPES)
    return f"it runs on cuda tensors (or on cpu with TRITON_INTERPRET=1), the inputs are on {device}"


_REGISTRY = {
    "reference": Backend("reference", "l2t_fast.matching.backends.reference", lambda: None,
                         lambda device, dtype: None),
    "cpu": Backend("cpu", "l2t_fast.matching.backends.compiled", _extension_problem,
                   _on("cpu", FLOAT_DTYPES)),
    "cuda": Backend("cuda", "l2t_fast.matching.backends.compiled", lambda: _extension_problem(True),
                    _on("cuda", FLOAT_DTYPES + HALF_DTYPES)),
    "triton": Backend("triton", "l2t_fast.matching.backends.triton", _triton_problem,
                      _triton_unsupported),
}


def available_backends():
    """Names of the backends that can run on this machine (``"reference"`` always)."""
    return [name for name in BACKENDS if _REGISTRY[name].why_unavailable() is None]


def resolve(name, device, dtype) -> Backend:
    """The backend to use for inputs on ``device`` of ``dtype``; ``name`` may be ``"auto"``.

    Raises ``BackendMismatch`` if the backend fails its self-check here."""
    backend = _choose(name, device, dtype)
    _ensure_checked(backend, device, dtype)
    return backend


def autocast_input_dtype(name, device):
    """The dtype that the loss casts its float32 and autocast-dtype inputs to under
    ``torch.autocast`` on ``device`` (None where autocast is off there).

    Autocast gives bf16/fp16 features but leaves the regressors float32, so the inputs
    arrive mixed. The GPU backends take half inputs and accumulate in float32 (docs/SPEC.md),
    so there the inputs go to the autocast dtype; a backend without half kernels (the C++
    CPU kernels, the reference, Triton's interpreter) computes in float32 instead.
    """
    if not torch.is_autocast_enabled(device.type):
        return None
    half = torch.get_autocast_dtype(device.type)
    try:
        native = _choose(name, device, half).name != "reference"
    except BackendUnavailable:
        native = False
    return half if native else torch.float32


def _choose(name, device, dtype):
    if name == "auto":
        if device.type == "cuda":
            candidates = GPU_PREFERENCE + ("reference",)
        else:
            candidates = ("cpu", "reference")
        for candidate in candidates:
            backend = _REGISTRY[candidate]
            if backend.why_unavailable() is None and backend.why_unsupported(device, dtype) is None:
                return backend
        raise AssertionError("the reference backend supports every input")  # pragma: no cover
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    backend = _REGISTRY[name]
    problem = backend.why_unavailable()
    if problem is not None:
        raise BackendUnavailable(f"backend {name!r} is not available: {problem}")
    problem = backend.why_unsupported(device, dtype)
    if problem is not None:
        raise BackendUnavailable(f"backend {name!r} cannot take these inputs: {problem}")
    return backend


_checked = set()  # (backend, device, dtype) that passed the self-check in this process
_check_lock = threading.Lock()


def _ensure_checked(backend, device, dtype):
    """Once per (backend, device, dtype): the self-check, or ``BackendMismatch``. Skipped
    while torch.compile traces (the next eager call checks)."""
    key = (backend.name, str(device), dtype)
    if backend.name == "reference" or key in _checked or torch.compiler.is_compiling():
        return
    with _check_lock:
        if key in _checked:
            return
        difference = self_check.first_difference(backend, device, dtype)
        if difference is not None:
            raise BackendMismatch(
                f"backend {backend.name!r} failed its self-check on {device} {dtype}: "
                f"{difference}; its results cannot be trusted here. Choose another backend: "
                f"backend=\"reference\" (always correct, slower) in the Python API, or "
                f"--backend reference on the command line")
        _checked.add(key)
