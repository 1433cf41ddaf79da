#!/usr/bin/env bash
# A branch beside this checkout, measured in one run on one machine (bench/gpu_check.sh OUT ab calls
# this; it needs lowlat installed, as gpu_check.sh does first).
#
#   AB_DIR=.ab/branch AB_ROUNDS=2 AB_ENV=NAME=VALUE AB_ARGS="..." bash bench/ab.sh OUT
#   AB_DIR=".ab/v1 .ab/v2" bash bench/ab.sh OUT      # several branches beside main, arms named v1, v2
#
# The branch is a git worktree in AB_DIR (`git worktree add .ab/branch BRANCH`; carry .ab to the
# device, which gets working trees, not history).  `python -m lowlat.bench $AB_ARGS` (default: EP1,
# 288 experts, T = 1..256, graph replays) runs from this checkout ("main") and from the worktree
# ("branch"; with several worktrees, each under its folder's name) alternately, AB_ROUNDS times;
# the current directory comes first on sys.path, so each arm runs its own package and kernels.
# AB_ENV adds an arm: the (first) worktree with that variable set (a switch inside one build).
# Each arm's per-point lines go to OUT/ab.txt.  The arm's tree comes first on PYTHONPATH, before
# what the caller set (so that AB_ARGS="--baseline deepep" finds a DeepEP build that `gpu_check.sh
# OUT versus,ab` put there).  AB_MODULE=lowlat.bench.trace runs the phase trace
# in every arm instead (AB_ARGS then default to the trace's own; its whole output is kept).
set -uo pipefail
out=${1:?usage: bench/ab.sh OUT}
read -r -a ab_dirs <<< "${AB_DIR:-.ab/branch}"
mkdir -p "$out"
root=$PWD
branches=() names=()
for ab_dir in "${ab_dirs[@]}"; do
  if [ ! -d "$ab_dir/lowlat" ] || [ ! -d "$ab_dir/kernels" ]; then
    echo "ab: no worktree in $ab_dir (git worktree add $ab_dir BRANCH, and carry its top folder)"
    exit 1
  fi
  branches+=("$(cd "$ab_dir" && pwd)")  # relative to this checkout, or absolute
  if [ "${#ab_dirs[@]}" = 1 ]; then names+=(branch); else names+=("$(basename "$ab_dir")"); fi
done
module=${AB_MODULE:-lowlat.bench}
status=0

# arm NAME DIR [NAME=VALUE]: one run of the bench (or AB_MODULE) from DIR with its own kernel cache.
arm() {
  echo "== $1"
  (cd "$2" && PYTHONPATH="$PWD" python3 -c 'import lowlat; print("package:", lowlat.__file__)' || exit 1
   run=(env ${3:+"$3"} LOWLAT_CACHE_DIR="/tmp/lowlat-cache-ab-$1" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python3 -m "$module")
   if [ "$module" = lowlat.bench ]; then
     # shellcheck disable=SC2086
     "${run[@]}" ${AB_ARGS:---ranks 1 --experts 288 --tokens 1,4,32,128,256} --out "/tmp/ab-$1" 2>&1 \
       | grep -E "^ +[0-9]+ +[0-9]+ +\||^  T=[0-9]+: graph|correct|rror|CPU"  # the bench's rows, or --baseline deepep's
   else
     # shellcheck disable=SC2086
     "${run[@]}" ${AB_ARGS:-} 2>&1
   fi)
}

: > "$out/ab.txt"
for _ in $(seq "${AB_ROUNDS:-2}"); do
  arm main "$root" >> "$out/ab.txt" 2>&1 || status=1
  for i in "${!branches[@]}"; do
    arm "${names[$i]}" "${branches[$i]}" >> "$out/ab.txt" 2>&1 || status=1
  done
  if [ -n "${AB_ENV:-}" ]; then
    arm "${names[0]}+$AB_ENV" "${branches[0]}" "$AB_ENV" >> "$out/ab.txt" 2>&1 || status=1
  fi
done
cat "$out/ab.txt"
exit "$status"
