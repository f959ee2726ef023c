#!/usr/bin/env bash
# The GPU checks and benchmarks of the Triton and CUDA backends, for a session that has the
# device machine (it has torch with CUDA, Triton, nvcc, ninja and pytest-benchmark, and no
# network). Each step's log goes to $OUT/<step>.log (./gpu_out without $OUT), one line per
# step to $OUT/summary.txt. Steps run in the order given; with none, all of them:
#
#   build      the extension with CUDA kernels, in place, for sm_90
#   tests      every test on CUDA tensors (and the CPU suite of the loss and engine)
#   sanitizer  compute-sanitizer memcheck on the small CUDA case
#   floor      matmul rate, copy bandwidth and the floor of each benchmark config
#   bench      the loss benchmark at the GPU configs, against eager and torch.compile
#
# One device call runs at most 10 minutes: `bash .ci/gpu_check.sh build tests` in one call,
# `bash .ci/gpu_check.sh sanitizer floor bench` in the next fits.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
}

run_step() {
  case $1 in
    build)
      nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
      "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
      step build 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
        "$PYTHON" setup.py build_ext --inplace ;;
    tests)
      step tests 420 env L2T_FAST_REQUIRE_CUDA=1 L2T_FAST_REQUIRE_EXTENSION=1 \
        "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_backend_cuda.py \
        tests/test_backend_triton.py tests/test_loss_jvp.py tests/test_loss.py \
        tests/test_engine.py tests/test_loss_grads.py tests/test_batchnorm.py ;;
    sanitizer)
      step sanitizer 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_backend_cuda.py -k sanitizer ;;
    floor)
      step floor 120 "$PYTHON" benchmarks/floor.py --json "$OUT/floor.json" ;;
    bench)
      step bench 300 "$PYTHON" -m pytest benchmarks/bench_loss.py --benchmark-only -k gpu \
        -p no:cacheprovider --benchmark-json "$OUT/bench.json" ;;
    *)
      echo "unknown step $1 (build, tests, sanitizer, floor, bench)" >&2
      return 2 ;;
  esac
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests sanitizer floor bench)
for name in "${steps[@]}"; do
  run_step "$name" || exit
done
