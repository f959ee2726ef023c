#!/usr/bin/env bash
# CI: the CPU kernels' tests once more, with the extension built under AddressSanitizer and
# UBSan (setup.py's L2T_FAST_SANITIZE=1), so that an out-of-bounds access or undefined
# behaviour in csrc/ fails CI instead of passing by luck. The sanitized build goes into a
# scratch copy of the sources; the checkout's own build (used by the rest of CI) is not
# touched. Uses the active virtual environment, else the checkout's .venv (.ci/run makes it).
#   bash .ci/sanitize.sh            (SANITIZE_DIR=... keeps the scratch copy there)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

scratch="${SANITIZE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/l2t_fast_sanitize.XXXXXX")}"
mkdir -p "$scratch"
rm -rf "$scratch/l2t_fast" "$scratch/csrc" "$scratch/tests"
cp -r setup.py pyproject.toml csrc l2t_fast tests "$scratch/"
find "$scratch/l2t_fast" \( -name '_C*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
(cd "$scratch" && L2T_FAST_SANITIZE=1 python setup.py -q build_ext --inplace >build.log 2>&1) ||
  { tail -n 40 "$scratch/build.log"; echo "sanitize: build failed" >&2; exit 1; }
echo "sanitize: built with ASan and UBSan in $((SECONDS - start))s in $scratch"

# The sanitizer runtimes must come first in the process, before Python loads the extension.
libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
cd "$scratch"
export PYTHONPATH="$scratch" L2T_FAST_REQUIRE_EXTENSION=1
# Leaks: CPython and torch keep allocations until exit on purpose. Any error aborts.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
LD_PRELOAD="$libasan $libubsan" python - <<PY
import torch  # noqa: F401  (loads libc10 and libtorch, which the extension links)
import l2t_fast._C as extension
assert extension.__file__.startswith("$scratch"), f"loaded {extension.__file__}, not the sanitized build"
PY
# The CPU kernels' tests (the Triton interpreter and the CUDA tests are not what this checks).
LD_PRELOAD="$libasan $libubsan" python -m pytest -q -p no:cacheprovider -k "not triton" \
  tests/test_loss.py tests/test_loss_grads.py tests/test_loss_jvp.py tests/test_fuzz_inputs.py
LD_PRELOAD="$libasan $libubsan" python -m pytest -q -p no:cacheprovider -k gram_kernel \
  tests/test_analysis.py
LD_PRELOAD="$libasan $libubsan" python -m pytest -q -p no:cacheprovider tests/test_max_pool.py
echo "sanitize: CPU kernel tests passed under ASan and UBSan at $((SECONDS - start))s"
[ -n "${SANITIZE_DIR:-}" ] || rm -rf "$scratch"
