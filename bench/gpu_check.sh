#!/usr/bin/env bash
# Install lowlat on a GPU machine (offline: torch and the CUDA Python packages are preinstalled there;
# the CCCL headers wheel travels in .whl/), run the GPU tests and the benchmarks, and leave the logs,
# JSON records and plots in the folder given as the first argument.
#
#   bash bench/gpu_check.sh OUT [tests|bench|all]
#   PYTEST_ARGS="-k graphs" BENCH_ARGS="--ranks 1,8 --hook" SWEEP_ARGS="--ranks 8" bash bench/gpu_check.sh OUT all
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
# Never create NVLink multicast objects on the shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 LOWLAT_CACHE_DIR=${LOWLAT_CACHE_DIR:-/tmp/lowlat-cache}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, cuda.core, cuda.bindings; print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda.core", cuda.core.__version__, "cuda.bindings", cuda.bindings.__version__)'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

find_links=()
[ -d .whl ] && find_links=(--find-links .whl)
if ! python3 -m pip install -q --no-index "${find_links[@]}" --no-build-isolation -e . > "$out/install.log" 2>&1; then
  cat "$out/install.log"; exit 1
fi

status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # shellcheck disable=SC2086
  python3 -m pytest -q -rs -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$out/pytest.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  # shellcheck disable=SC2086
  python3 -m lowlat.bench --out "$out" ${BENCH_ARGS:---ranks 1,8 --hook} 2>&1 | tee "$out/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # shellcheck disable=SC2086
  python3 -m lowlat.bench --out "$out" --sweep ${SWEEP_ARGS:---ranks 8} 2>&1 | tee "$out/sweep.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit "$status"
