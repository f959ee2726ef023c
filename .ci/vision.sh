#!/usr/bin/env bash
# CI, second environment: the vision stack. A venv of its own (.venv-vision) with the
# torch 2.14.1 CUDA build and the torchvision 0.29.1 that matches it (both from local disk;
# the CUDA torch runs on the CPU here) and timm; the project installed into it, which with
# nvcc present builds the CUDA kernels too (C++20: torch 2.14's headers need it). Then:
# the extension must load with its ops registered for the CUDA dispatch key, and the tests
# marked `vision` run (torchvision and timm models, the paper's recipe end to end).
set -euo pipefail
cd "$(dirname "$0")/.."
# Build in a scratch copy of the committed tree: an editable install builds l2t_fast/_C*.so
# in place, and a build against torch 2.14.1 must not replace the checkout's own (torch 2.13).
scratch="$(mktemp -d "${TMPDIR:-/tmp}/l2t_fast_vision.XXXXXX")"
git archive HEAD | tar -x -C "$scratch"
cd "$scratch"
start=$SECONDS

python3 -m venv .venv-vision
. .venv-vision/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
pip install -q torch==2.14.1 torchvision==0.29.1   # a matching pair; never unpinned
pip install -q timm
echo "vision: installed torch, torchvision and timm in $((SECONDS - start))s"
# The toolkit's own root, as nvcc reports it: torch guesses it from nvcc's place on PATH,
# which is wrong where nvcc is a wrapper script (/usr/local/bin/nvcc here: no libcudart).
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
  export CUDA_HOME="$(cd "$CUDA_HOME" && pwd)"
fi
echo "vision: CUDA toolkit: ${CUDA_HOME:-none}"
# one GPU architecture proves that the kernels compile and link, in half the nvcc time
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}"
pip install -q -e ".[test,vision]" --no-build-isolation
echo "vision: installed and built the extension in $((SECONDS - start))s"

python - <<'PY'
import torch

import l2t_fast._C  # noqa: F401  (loads the extension: it compiled and linked)


def registered(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"l2t_fast::{op}", key)


ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("l2t_fast::"))
cuda_ops = ["channel_errors", "channel_errors_backward", "channel_errors_double_backward"]
assert set(cuda_ops) <= set(ops), f"the extension registers only {ops}"
assert all(registered(op, "CPU") for op in ops), [op for op in ops if not registered(op, "CPU")]
assert torch.version.cuda is not None, "this torch is not a CUDA build: no CUDA kernels built"
missing = [op for op in cuda_ops if not registered(op, "CUDA")]
assert not missing, f"ops without a CUDA kernel: {missing}"
print(f"vision: torch {torch.__version__} (CUDA {torch.version.cuda}); l2t_fast ops on CPU: "
      f"{', '.join(ops)}; on CUDA: {', '.join(cuda_ops)}")
PY

export L2T_FAST_REQUIRE_EXTENSION=1
python -m pytest -q -m vision
echo "vision: done in $((SECONDS - start))s"
