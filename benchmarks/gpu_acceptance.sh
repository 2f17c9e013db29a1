#!/usr/bin/env bash
# xclay's GPU acceptance: every GPU question in one call of at most 8 minutes on an H100 or
# H200, from the project root of a copy of the repository:
#
#   bash benchmarks/gpu_wheels.sh                                        # here: fills .whl/
#   source .whl/install.sh && bash benchmarks/gpu_acceptance.sh           # there (carry .whl)
#   XCLAY_COMMIT=<short sha> ...      # where the copy has no .git: the commit results name
#   bash benchmarks/gpu_acceptance.sh --dry-run     # on a CPU: every step in its smoke form
#   STEPS="reads throughput" bash benchmarks/gpu_acceptance.sh            # some steps only
#   bash benchmarks/gpu_acceptance.sh [--dry-run] --print   # each step's limit and command
#
# The steps run in this order, each under its own time limit (the limits sum to 480 s),
# each writing its result JSONs under benchmarks/results/ (or $XCLAY_BENCH_RESULTS) before
# the next starts:
#
#   env         the device, driver, CUDA, torch/CuPy/kvikIO/nvCOMP, `xclay info`
#   gpu-tests   pytest -m gpu with the project's settings (warnings are errors)
#   pipeline    Clay large, 256 px, end to end from a zstd datacube with engine kvikio,
#               and the same encoder alone on the same batches (goal: >= 0.95)
#   reads       kvikio on zstd and uncompressed chunks against raw reads (goal: >= 0.8)
#   throughput  Clay large 256 px in bf16 and fp8, the fast path as a run sets it up
#               (goals: bf16 >= 800 chips/s, fp8 >= 1,200 within the gate)
#   gate        bf16, tf32, fp8 (tensor cores and emulated) against fp32 on real imagery
#   cluster     a run on a LocalCUDACluster (one worker per GPU, no dashboard) gives the
#               embeddings of the same run in one process
#   training    a 20 ms training step fed by ChipDataset (8 workers; kvikIO in process)
#               against the same step on batches already on the GPU (goal: >= 0.95)
#   summary     the goals against this code's results
#
# A step cut short by its limit leaves the results before it as they are. Every finished
# step leaves a marker, results/acceptance-step_<step>.json (its exit status, seconds, the files
# it wrote, the commit and a hash of the code: benchmarks/code_hash.sh); a step whose
# marker says it succeeded on this very code is skipped, so calling the script again
# continues where a cut-short call stopped. Logs and the results of this code go to
# $OUT/acceptance.tgz (or ./gpu-out) after every step.
#
# Not in the 8 minutes, run when named in STEPS: `sweep` (every Clay size and precision at
# 128 and 256 px, eager, with their checks) and `pipeline-none` (the pipeline step on an
# uncompressed datacube).
set -u
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
PRINT=0
for arg in "$@"; do
  case $arg in
  --dry-run) DRY=1 ;;
  --print) PRINT=1 ;;
  *) echo "usage: bash benchmarks/gpu_acceptance.sh [--dry-run] [--print]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
O=${OUT:-gpu-out}
mkdir -p "$O"
if [ -n "${XCLAY_BENCH_RESULTS:-}" ]; then
  RES=$XCLAY_BENCH_RESULTS
elif [ "$DRY" = 1 ]; then
  RES=$(mktemp -d -t xclay-acceptance-XXXXXX)
else
  RES=$PWD/benchmarks/results
fi
mkdir -p "$RES"
export XCLAY_BENCH_RESULTS=$RES PYTHONUNBUFFERED=1
COMMIT=${XCLAY_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}
[ -n "$COMMIT" ] && export XCLAY_COMMIT=$COMMIT
# The code of this call, hashed once at its start (every result of the call names it).
CODE=${XCLAY_CODE:-$(bash benchmarks/code_hash.sh)}
export XCLAY_CODE=$CODE
DEFAULT="env gpu-tests pipeline reads throughput gate cluster training summary"
STEPS=${STEPS:-$DEFAULT}
CUBE=${TMPDIR:-/tmp}/xclay-acceptance-zstd.zarr

# LIMITS="step=seconds ..." overrides a limit (the tests cut a step short so). A dry run's
# smoke forms get 4 times the GPU step's limit: they run on a CPU busy with other tests.
limit() {
  local over
  for over in ${LIMITS:-}; do
    [ "${over%%=*}" = "$1" ] && echo "${over#*=}" && return
  done
  if [ "$DRY" = 1 ]; then
    echo $((4 * $(gpu_limit "$1")))
  else
    gpu_limit "$1"
  fi
}

gpu_limit() {
  case $1 in
  env) echo 20 ;; gpu-tests) echo 70 ;; pipeline) echo 120 ;; reads) echo 50 ;;
  throughput) echo 100 ;; gate) echo 45 ;; cluster) echo 35 ;; training) echo 25 ;;
  summary) echo 15 ;;
  sweep) echo 240 ;; pipeline-none) echo 120 ;; *) echo 0 ;;
  esac
}

# The command of a step: on the GPU, or (dry run) its smoke form on the CPU. Empty: the
# step cannot run here, and the reason is printed instead.
command_of() {
  local b="$PY benchmarks"
  if [ "$DRY" = 1 ]; then
    case $1 in
    env) echo "$b/environment.py --smoke" ;;
    gpu-tests) echo "$b/gpu_tests.py --smoke" ;;
    pipeline | pipeline-none) echo "$b/embed_pipeline.py --smoke" ;;
    reads) echo "$b/read_engines.py --smoke --variants host-n kvikio xarray-gpu cupy-xarray raw --no-checksum-cost" ;;
    throughput | sweep) echo "$b/model_throughput.py --smoke" ;;
    gate) echo "$b/precision_gate.py --smoke" ;;
    cluster) echo "$b/cluster_run.py --smoke" ;;
    training) echo "$b/training_wait.py --smoke" ;;
    summary) echo "$b/acceptance_summary.py --smoke" ;;
    esac
    return
  fi
  case $1 in
  env) echo "$b/environment.py" ;;
  gpu-tests) echo "$b/gpu_tests.py" ;;
  pipeline) echo "$b/embed_pipeline.py --device cuda --model clay-large --compression zstd \
      --engine kvikio --size 4096 --chip-size 256 --batch-size 128 --repeats 5 \
      --data-repeats 1 --cube $CUBE" ;;
  pipeline-none) echo "$b/embed_pipeline.py --device cuda --model clay-large \
      --compression none --engine kvikio --size 4096 --chip-size 256 --batch-size 128 \
      --repeats 5 --data-repeats 1" ;;
  reads) echo "$b/read_engines.py --size 4096 --chunks 256 --compression zstd none \
      --shards 0 --variants host-n kvikio xarray-gpu cupy-xarray raw --repeats 3 --passes 4 --no-checksum-cost \
      --tag acceptance" ;;
  throughput) echo "$b/model_throughput.py --device cuda --sizes large --chip-sizes 256 \
      --precisions bf16 fp8 --repeats 5 --tag acceptance" ;;
  sweep) echo "$b/model_throughput.py --device cuda --sizes tiny large --chip-sizes 128 256 \
      --compile off --repeats 3 --tag eager" ;;
  gate) echo "$b/precision_gate.py --device cuda" ;;
  cluster) echo "$b/cluster_run.py" ;;
  training) echo "$b/training_wait.py --device cuda --size 4096 --workers 8 --step-ms 20 \
      --epochs 3" ;;
  summary) echo "$b/acceptance_summary.py --code $CODE" ;;
  esac
}

marker_ok() {  # the step's marker says it succeeded on this code
  local m=$RES/acceptance-step_$1.json
  [ -f "$m" ] && grep -q "\"code\": \"$CODE\"" "$m" && grep -q '"returncode": 0' "$m"
}

pack() {
  local files=("$O"/*.log)
  [ -e "${files[0]}" ] || files=()
  if [ "$RES" = "$PWD/benchmarks/results" ]; then
    # The results of this code (and the markers), relative to the project root.
    mapfile -t new < <(grep -l "\"code\": \"$CODE\"" benchmarks/results/*.json 2>/dev/null)
    tar czf "$O/acceptance.tgz" "${files[@]}" "${new[@]}" 2>/dev/null
  else
    tar czf "$O/acceptance.tgz" "${files[@]}" -C "$RES" . 2>/dev/null
  fi
}

total=0
for s in $DEFAULT; do total=$((total + $(gpu_limit "$s"))); done
if [ "$PRINT" = 1 ]; then
  for s in $STEPS; do printf '%s\t%s\t%s\n' "$s" "$(limit "$s")" "$(command_of "$s" | tr -s ' ')"; done
  exit 0
fi
if [ "$total" -gt 480 ]; then
  echo "the default steps' limits sum to ${total}s, more than 8 minutes" >&2
  exit 2
fi
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU here (torch.cuda.is_available() is False): use --dry-run on a CPU" >&2
  exit 2
fi
echo "xclay GPU acceptance$([ "$DRY" = 1 ] && echo ', dry run (smoke forms on the CPU)'):" \
  "code $CODE, commit ${COMMIT:-unknown}; results in $RES; steps: $STEPS"
T0=$SECONDS
failed=0
for s in $STEPS; do
  lim=$(limit "$s")
  if [ "$lim" = 0 ]; then
    echo "=== $s: unknown step (steps: $DEFAULT sweep pipeline-none)"
    failed=1
    continue
  fi
  if marker_ok "$s"; then
    echo "=== $s: skipped, done for code $CODE ($RES/acceptance-step_$s.json)"
    continue
  fi
  cmd=$(command_of "$s")
  if [ -z "$cmd" ]; then
    echo "=== $s: skipped, cannot run here"
    continue
  fi
  echo "=== $s (limit ${lim}s) at t=$((SECONDS - T0))s: $cmd" | tr -s ' '
  touch "$O/.started"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout -k 5 "$lim" $cmd >"$O/$s.log" 2>&1
  rc=$?
  seconds=$((SECONDS - start))
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "    cut short by its ${lim}s limit"
  [ "$rc" = 0 ] || failed=1
  wrote=$(find "$RES" -maxdepth 1 -name '*.json' -newer "$O/.started" -printf '%f\n' |
    grep -v '^acceptance-step_' | sort | sed 's/.*/"&"/' | paste -sd, -)
  cat >"$RES/acceptance-step_$s.json" <<JSON
{"step": "$s", "returncode": $rc, "seconds": $seconds, "limit_s": $lim, "dry_run": $([ "$DRY" = 1 ] && echo true || echo false),
 "command": "$(echo "$cmd" | tr -s ' ')", "code": "$CODE", "commit": "${COMMIT:-}", "files": [$wrote]}
JSON
  echo "    rc=$rc after ${seconds}s; wrote: ${wrote:-nothing}"
  tail -n "${TAILN:-12}" "$O/$s.log" | grep -v '^\s*$' | cut -c1-200 | sed 's/^/    | /'
  pack
done
echo "total $((SECONDS - T0))s"
exit $failed
