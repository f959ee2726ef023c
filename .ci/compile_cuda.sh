#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu to an object file for sm_90 against the installed torch's
# headers, so that a syntax or type error in the CUDA kernels fails CI even on machines
# without a GPU or a CUDA build of torch (a CPU torch wheel ships the ATen/c10 CUDA headers).
# Needs nvcc on PATH (or NVCC=...). Objects go to a temporary directory and are discarded.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
PYTHON="${PYTHON:-python}"
ARCH="${CUDA_ARCH:-90}"

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  "import torch.utils.cpp_extension as c; print('\n'.join(c.include_paths()))")
PY_INCLUDE="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
CXX11_ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
# the standard the installed torch's headers require, as setup.py chooses it
STD="$("$PYTHON" -c "import runpy; print(runpy.run_path('setup.py', run_name='build_tools')['cxx_standard']())")"

FLAGS=(-c "-std=${STD}" -O3 -Xcompiler -fPIC
       "-gencode=arch=compute_${ARCH},code=sm_${ARCH}"
       --expt-relaxed-constexpr -Werror all-warnings
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       -DL2T_FAST_WITH_CUDA "-D_GLIBCXX_USE_CXX11_ABI=${CXX11_ABI}"
       -I"$PY_INCLUDE")
for include in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-isystem "$include"); done
# A CPU torch lacks the configure-generated c10/cuda/impl/cuda_cmake_macros.h; c10 offers
# this define for that case (it only drops Windows export macros).
if [ ! -f "${TORCH_INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "no CUDA sources in csrc/cuda" >&2
  exit 1
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for source in "${SOURCES[@]}"; do
  echo "nvcc (sm_${ARCH}): $source"
  "$NVCC" "${FLAGS[@]}" "$source" -o "$OUT/$(basename "$source").o"
done
echo "compiled ${#SOURCES[@]} CUDA source(s) for sm_${ARCH}"
