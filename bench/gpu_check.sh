#!/usr/bin/env bash
# The one GPU entry point: install lowlat on a GPU machine (offline: torch and the CUDA Python packages
# are preinstalled there; the CCCL headers wheel travels in .whl/), run the GPU tests and the
# benchmarks, and leave the logs, JSON records and plots in the folder given as the first argument.
#
#   bash bench/gpu_check.sh OUT [tests|bench|versus|trace|hostpath|ab|all, or several: tests,hostpath]
#   PYTEST_ARGS="-k graphs" BENCH_ARGS="--ranks 1,8 --hook" SWEEP_ARGS="--ranks 8" VERSUS_ARGS="--tokens 4,128" \
#       TRACE_ARGS="--tokens 1,128" bash bench/gpu_check.sh OUT all
#
# versus: builds DeepEP V1 from .peers/ (a git-ignored copy of ../shared/peers: the archive and
# build_deepep.sh) into /tmp and runs `python -m lowlat.bench --baseline deepep` next to it, and with
# 2+ GPUs `python -m lowlat.bench.normal --baseline deepep` (normal mode, one rank per GPU).
# trace: `python -m lowlat.bench.trace`, the fused kernels' phases (kernels/trace.cuh) at EP1.
# hostpath: `python -m lowlat.bench.hostpath`, an eager call's host time split into driver calls and the rest.
# ab (only by name, not in all): branches beside this checkout in one run (bench/ab.sh: git worktrees
# in AB_DIR, default .ab/branch; carry .ab; AB_MODULE=lowlat.bench.trace for the phase trace), the arms' lines in ab.txt.
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUT [tests|bench|versus|trace|hostpath|ab|all]}
what=${2:-all}
# wants TARGET: whether TARGET is among the comma-separated targets asked for (or all of them are).
wants() { [ "$what" = all ] || [[ ",$what," == *",$1,"* ]]; }
# wants_named TARGET: only when asked for by name (targets that need more than this checkout).
wants_named() { [[ ",$what," == *",$1,"* ]]; }
mkdir -p "$out"
# Never create NVLink multicast objects on the shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 LOWLAT_CACHE_DIR=${LOWLAT_CACHE_DIR:-/tmp/lowlat-cache}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, cuda.core, cuda.bindings; print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda.core", cuda.core.__version__, "cuda.bindings", cuda.bindings.__version__)'
} > "$out/setup.log" 2>&1
cat "$out/setup.log"
# One setup log (machine, install, DeepEP build): the device tool brings back only a few files.
setup_log=$out/setup.log

find_links=()
[ -d .whl ] && find_links=(--find-links .whl)
if ! python3 -m pip install -q --no-index "${find_links[@]}" --no-build-isolation -e . >> "$setup_log" 2>&1; then
  cat "$setup_log"; exit 1
fi
# nvshmem4py (the nvshmem extra) without its dependencies: its cuda-python pin would move the image's
# cuda-bindings; it needs only what is there.
for wheel in .whl/nvshmem4py*.whl; do
  [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps "$wheel" >> "$setup_log" 2>&1
done

status=0
if wants tests; then
  # shellcheck disable=SC2086
  python3 -m pytest -q -rs -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$out/pytest.log" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if wants versus; then
  if [ -f .peers/build_deepep.sh ]; then
    start=$(date +%s)
    if bash .peers/build_deepep.sh .peers/deepep-v1-567632d.tar.gz /tmp/deepep-build >> "$setup_log" 2>&1; then
      echo "DeepEP V1 built in $(( $(date +%s) - start )) s"
      # shellcheck disable=SC2086
      PYTHONPATH=/tmp/deepep-build/deepep-v1:${PYTHONPATH:-} NVSHMEM_REMOTE_TRANSPORT=none \
        python3 -m lowlat.bench --out "$out" --baseline deepep ${VERSUS_ARGS:-} 2>&1 | tee "$out/versus.log"
      [ "${PIPESTATUS[0]}" = 0 ] || status=1
      # DeepEP's normal mode runs one rank per GPU: its side-by-side needs 2+ GPUs.
      if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
        PYTHONPATH=/tmp/deepep-build/deepep-v1:${PYTHONPATH:-} \
          python3 -m lowlat.bench.normal --out "$out" --baseline deepep 2>&1 | tee "$out/versus-normal.log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
      else
        echo "normal mode vs DeepEP: skipped, DeepEP's normal kernels need 2+ GPUs (one rank per GPU)"
      fi
    else
      tail -20 "$setup_log"; status=1
    fi
  else
    echo "versus: .peers/build_deepep.sh is missing (copy ../shared/peers into .peers/ and carry it)"; status=1
  fi
fi
if wants bench; then
  # shellcheck disable=SC2086
  python3 -m lowlat.bench --out "$out" ${BENCH_ARGS:---ranks 1,8 --hook} 2>&1 | tee "$out/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # shellcheck disable=SC2086
  python3 -m lowlat.bench --out "$out" --sweep ${SWEEP_ARGS:---ranks 8} 2>&1 | tee "$out/sweep.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if wants trace; then
  # shellcheck disable=SC2086
  python3 -m lowlat.bench.trace ${TRACE_ARGS:-} 2>&1 | tee "$out/trace.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if wants hostpath; then
  # shellcheck disable=SC2086
  python3 -m lowlat.bench.hostpath ${HOSTPATH_ARGS:-} 2>&1 | tee "$out/hostpath.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if wants_named ab; then
  # With versus in the same run, DeepEP's build is on the path, so AB_ARGS may hold --baseline deepep.
  deepep=()
  if wants versus && [ -d /tmp/deepep-build/deepep-v1 ]; then
    deepep=(PYTHONPATH="/tmp/deepep-build/deepep-v1:${PYTHONPATH:-}" NVSHMEM_REMOTE_TRANSPORT=none)
  fi
  env "${deepep[@]}" bash bench/ab.sh "$out" || status=1
fi
exit "$status"
