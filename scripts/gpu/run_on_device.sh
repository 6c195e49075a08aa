#!/usr/bin/env bash
# GPU validation and benchmarks in one call on a machine with an NVIDIA GPU, CUDA and
# PyTorch but no Rust: everything built here travels in .gpu/ (see scripts/gpu/prepare.sh).
# Writes logs, JSON and Markdown tables to $OUT (default /tmp/dynsparse-gpu). Every step
# has its own time limit (T_* variables, seconds), so the whole run stays bounded (about
# 15 minutes at most with the defaults, much less typically) and a hung tool costs one step.
# SANITIZERS=0, PEERS=0 and PROFILE=0 leave those steps out.
set -u
OUT=${OUT:-/tmp/dynsparse-gpu}
mkdir -p "$OUT"
G=.gpu
BIN=$G/dynsparse
M=/tmp/dynsparse-models
export PYTHONUNBUFFERED=1
NV=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>/dev/null || true)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${NV}:${LD_LIBRARY_PATH:-}
export DYNSPARSE_CACHE=/tmp/dynsparse-cache
log() { echo "== $(date +%T) $*"; }

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(cat $G/COMMIT 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
  nproc
} | tee "$OUT/device.txt"

# The models are built on the host's CPUs while the sanitizers hold the GPU.
log "models (in the background)"
(
  timeout ${T_MODELS:-150} python3 scripts/gpu/parity.py make $M > "$OUT/models.log" 2>&1 || exit 1
  for a in resnet18 resnet50; do
    $BIN convert --arch $a --input $M/$a.pth --output $M/$a.dsm >> "$OUT/models.log" 2>&1
  done
  $BIN convert --arch mobilenet_v2 --input $G/mobilenet_v2/checkpoint.pth --output $M/mobilenet_v2.dsm >> "$OUT/models.log" 2>&1
  $BIN convert --arch efficientnet_lite0 --input $G/efficientnet_lite0/checkpoint.pth --output $M/efficientnet_lite0.dsm >> "$OUT/models.log" 2>&1
) &
MODELS=$!

if [ "${SANITIZERS:-1}" = 1 ]; then
log "compute-sanitizer memcheck (demo model, small kernel cases)"
timeout ${T_MEMCHECK:-90} compute-sanitizer --tool memcheck --error-exitcode 9 \
  $BIN cuda-check --cases 10 --seed 7 --model models/demo/demo.dsm --batch 2 --keep 1,0.5 --reps 2 \
  > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|kernel checks" "$OUT/memcheck.log"
fi

wait $MODELS || { echo "building the models failed:"; tail -20 "$OUT/models.log"; }
tail -4 "$OUT/models.log"

log "kernel checks, model checks, timing"
timeout ${T_CHECK:-240} $BIN cuda-check --cases ${CASES:-60} \
  --model $M/resnet50.dsm --model $M/mobilenet_v2.dsm --model $M/efficientnet_lite0.dsm --model $M/resnet18.dsm \
  --batch 1,8,64 --keep 1,0.75,0.5,0.25 --reps ${REPS:-40} --json "$OUT/cuda_check.json" \
  2>&1 | tee "$OUT/cuda_check.md"
echo "cuda-check rc=${PIPESTATUS[0]}"

log "the benchmark harness on the GPU (dynsparse bench --device cuda)"
for a in resnet50 resnet18; do
  timeout ${T_BENCH:-60} $BIN bench --device cuda --peers --model $M/$a.dsm --batch 1,8,64 --runs 20 \
    --keep 0.75,0.5,0.25 --json "$OUT/bench_cuda_$a.json" --plot "$OUT/bench_cuda_$a.svg" \
    2>&1 | tee "$OUT/bench_cuda_$a.md"
done
timeout ${T_BENCH:-60} $BIN bench --device cuda --peers --model $M/mobilenet_v2.dsm --batch 1,8,64 --runs 20 \
  --json "$OUT/bench_cuda_mobilenet_v2.json" 2>&1 | tee "$OUT/bench_cuda_mobilenet_v2.md"

log "logits against PyTorch"
{
for a in resnet18 resnet50; do
  timeout ${T_INFER:-30} $BIN infer --device cuda --model $M/$a.dsm --tensor $M/input_b3.npy --json > "$OUT/$a.cuda.json" \
    && python3 scripts/gpu/parity.py compare "$OUT/$a.cuda.json" $M/${a}_logits_b3.npy 1e-2
done
for a in mobilenet_v2 efficientnet_lite0; do
  timeout ${T_INFER:-30} $BIN infer --device cuda --model $M/$a.dsm --tensor $G/$a/input_b3.npy --json > "$OUT/$a.cuda.json" \
    && python3 scripts/gpu/parity.py compare "$OUT/$a.cuda.json" $G/$a/logits_b3.npy 1e-2
done
# Gated through Runtime on the GPU against the CPU engine under the same policy.
for a in resnet18 resnet50; do
  for d in cuda cpu; do
    timeout ${T_INFER:-30} $BIN infer --device $d --keep 0.5 --channel-round 8 --model $M/$a.dsm \
      --tensor $M/input_b3.npy --json > "$OUT/$a.$d.keep.json"
  done
  python3 scripts/gpu/parity.py pair "$OUT/$a.cuda.keep.json" "$OUT/$a.cpu.keep.json"
done
} 2>&1 | tee "$OUT/parity.txt"

if [ "${PEERS:-1}" = 1 ]; then
  log "PyTorch + cuDNN peers"
  timeout ${T_PEERS:-150} python3 benches/peers/torch_gpu.py --batches 1,8,64 --json "$OUT/torch.json" \
    2>&1 | tee "$OUT/torch.md" | tail -60
fi
if [ "${PROFILE:-1}" = 1 ]; then
log "tail-effect staircases of the CUDA kernels (dynsparse profile --device cuda)"
for b in 1 64; do
  timeout ${T_PROFILE:-60} $BIN profile --device cuda --batch $b --runs 10 \
    --out "$OUT/profile_cuda_b$b.json" --plot "$OUT/profile_cuda_b$b.svg" 2>&1 | tee "$OUT/profile_cuda_b$b.txt"
done
fi

if [ "${SANITIZERS:-1}" = 1 ]; then
# Without the timing step (--reps 0): under racecheck the process ended there with a
# failure status and no message on the H200 (2026-12-04), after every check had passed.
log "compute-sanitizer racecheck"
timeout ${T_RACECHECK:-90} compute-sanitizer --tool racecheck --error-exitcode 9 \
  $BIN cuda-check --cases 4 --seed 8 --model models/demo/demo.dsm --batch 2 --keep 0.5 --reps 0 \
  > "$OUT/racecheck.log" 2>&1
echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY|kernel checks" "$OUT/racecheck.log"
fi

log "done"
