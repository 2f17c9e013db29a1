#!/usr/bin/env bash
# xclay's GPU acceptance, in one call on a CUDA machine (about 12 minutes on an H100/H200),
# from the project root after `source .whl/install.sh` (wheels: ../shared/tools/device-wheels.sh).
# Each step has its own time limit, writes its log under $OUT (or ./gpu-out) and prints its
# tail; benchmark JSONs land in benchmarks/results/ and are packed into $OUT/results.tgz.
#
#   bash benchmarks/gpu_acceptance.sh                    # every step
#   STEPS="pytest read" bash benchmarks/gpu_acceptance.sh  # a subset
#   STEPS="env pytest model fast gate" ...               # the encoder's steps only
#
# Steps (the figures they produce are the GPU issue's goals; docs/benchmarks.md):
#   env     nvidia-smi and `xclay info` (kvikIO mode and threads, nvCOMP, GDS)
#   pytest  the gpu tests, with the project's own pytest settings (no overrides)
#   model   encoder-only throughput, Clay tiny and large, 128 and 256 px, fp32 tf32 bf16 fp8,
#           eager (no compile), each with its check against strict fp32 on 32 chips
#   fast    the default fast path (compiled, static batches, measured attention kernel):
#           Clay large 128/256 px bf16 and fp8, Clay tiny 256 px bf16; compile seconds
#   gate    bf16, tf32, fp8 (tensor cores and emulated) against fp32 on real imagery
#   pipe    end to end / encoder only, Clay large and tiny, zstd and uncompressed, engine auto
#           (kvikio on the GPU), 1,024 chips of 256 px a measurement
#   read    read engines against the raw-read ceiling, 256 px chunks, 2,048 chip reads a
#           measurement
set -u
O=${OUT:-gpu-out}; mkdir -p "$O"
STEPS=${STEPS:-"env pytest model fast gate pipe read"}
T0=$SECONDS
step() {
  local name=$1 lim=$2; shift 2
  echo "=== $name (limit ${lim}s) at t=$((SECONDS - T0))s"
  timeout -k 5 "$lim" "$@" >"$O/$name.log" 2>&1
  echo "rc=$? at t=$((SECONDS - T0))s"
  tail -n "${TAILN:-16}" "$O/$name.log" | cut -c1-220
}
for s in $STEPS; do
  case $s in
  env) step env 60 bash -c "nvidia-smi -L; python3 -m xclay.cli info" ;;
  pytest) step pytest 150 python3 -m pytest -p no:cacheprovider -m gpu -rfE --tb=short -q ;;
  model) step model 180 python3 benchmarks/model_throughput.py --device cuda --sizes tiny large \
           --chip-sizes 128 256 --compile off --repeats 3 --tag eager ;;
  fast) step fast 300 bash -c "python3 benchmarks/model_throughput.py --device cuda --sizes large \
          --chip-sizes 128 256 --precisions bf16 fp8 --repeats 5 --tag fast-large && python3 \
          benchmarks/model_throughput.py --device cuda --sizes tiny --precisions bf16 --repeats 5 --tag fast-tiny" ;;
  gate) step gate 120 python3 benchmarks/precision_gate.py --device cuda ;;
  pipe) step pipe 240 bash -c "for c in zstd none; do for m in clay-large clay-tiny; do \
          python3 benchmarks/embed_pipeline.py --size 8192 --device cuda --model \$m \
          --compression \$c --batch-size 64 --repeats 3 --cube /tmp/xclay-pipe-\$c.zarr \
          | tail -9; done; done" ;;
  read) step read 150 python3 benchmarks/read_engines.py --size 4096 --chunks 256 \
          --compression none zstd --shards 0 4 --repeats 3 --passes 8 ;;
  *) echo "unknown step $s" ;;
  esac
  tar czf "$O/results.tgz" benchmarks/results/*cuda* 2>/dev/null
done
echo "total $((SECONDS - T0))s"
