#!/usr/bin/env bash
# The GPU checks in one call, as much of them as the time budget holds, in this order: the CUDA tests; the cost
# table's eager time rows, model by model; the step memory of the plain and the Tf-FD step of every model; the
# compiled rows, model by model. Each part runs under its own time limit, so one that runs long leaves the next ones
# theirs; a part prints its rows when its rounds end, so one stopped at its limit prints none, but its JSON keeps the
# rounds timed up to a minute before (complete: false), and the same call again with the same OUT goes on from them
# (overhead.py --resume). Results go to $OUT (or benchmarks/results/gpu/): gpu.log and one JSON per part (at most 8
# files). The exit status is 1 when any part failed or was stopped, 0 when all that ran finished.
#
#   bash benchmarks/gpu.sh                                  # resnet50, resnet18, vit_small_patch16_224
#   MODELS=resnet50 BUDGET=300 bash benchmarks/gpu.sh       # one model, five minutes
#   DRY_RUN=1 bash benchmarks/gpu.sh                        # print the parts' commands, run none
#   DEVICE=cpu MODELS=test_resnet BATCH=2 IMG=32 ROUNDS=3 bash benchmarks/gpu.sh   # the flow on a CPU, ~3 minutes
#
# BUDGET (seconds, default 480: the device's 15 minutes also hold the machine's start and a rerun) bounds the whole
# run; TEST_LIMIT (240), EAGER_LIMIT (90 per model), MEMORY_LIMIT (150) and COMPILED_LIMIT (240 per model) bound the
# parts. BATCH (256), ROUNDS (50), IMG (224). A machine whose timm is older than the package needs gets it from wheels
# in WHEELS (default .whl/, ignored by git), installed into /tmp/site when present (benchmarks/README.md, "Compiled
# rows, the floor, and the GPU run").
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${BUDGET:-480}
device=${DEVICE:-cuda}
wheels=${WHEELS:-.whl}
out=${OUT:-benchmarks/results/gpu}
dry=${DRY_RUN:-}
mkdir -p "$out"
log="$out/gpu.log"
: > "$log"
failed=0
export PYTHONUNBUFFERED=1
if [ -z "$dry" ] && compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || { echo "gpu.sh: could not install the wheels in $wheels/" | tee -a "$log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $((budget - (SECONDS - start))); }
limit() { local want=$1 l; l=$(left); echo $((want < l ? want : l)); }
part() {  # part NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds (what is left of the budget at most)
  local name=$1 lim
  lim=$(limit "$2")
  shift 2
  if [ -n "$dry" ]; then
    echo "== $name (limit ${lim} s): $*" | tee -a "$log"
    return 0
  fi
  if [ "$lim" -lt 20 ]; then
    echo "== $name: skipped, ${lim} s left for it" | tee -a "$log"
    return 0
  fi
  echo "== $name (limit ${lim} s, $(date -u +%H:%M:%S) UTC)" | tee -a "$log"
  timeout -k 15 "$lim" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    failed=1
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "== $name: stopped at its ${lim} s limit" | tee -a "$log"
    else
      echo "== $name: exit status $rc" | tee -a "$log"
    fi
  fi
  return 0
}

python3 - "$device" <<'EOF' 2>&1 | tee -a "$log"
import sys
import torch, timm
try:
    import timm_tffd
except ImportError as e:  # a timm older than the package needs
    sys.exit(f'gpu.sh: cannot import timm_tffd with timm {timm.__version__}: {e} (carry a newer timm in .whl/)')
device = sys.argv[1]
print(f'torch {torch.__version__}, timm {timm.__version__}, timm_tffd {timm_tffd.__version__}')
if device == 'cuda':
    if not torch.cuda.is_available():
        sys.exit('gpu.sh: torch sees no CUDA device')
    print(f'{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}')
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
[ -z "$dry" ] && [ -n "$(command -v nvidia-smi)" ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm \
  --format=csv | tee -a "$log"

models=${MODELS:-resnet50,resnet18,vit_small_patch16_224}
flags=(--device "$device" --amp --channels-last --batch-size "${BATCH:-256}" --img-size "${IMG:-224}"
       --rounds "${ROUNDS:-50}")
part "CUDA tests" "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_losses.py \
  tests/test_wrap.py -k cuda
for m in ${models//,/ }; do
  part "$m eager" "${EAGER_LIMIT:-90}" python3 benchmarks/overhead.py "${flags[@]}" --models "$m" --floor \
    --configs baseline,baseline-copy,inter,intra,inter+intra --no-memory --json "$out/eager_$m.json" --resume
done
part "memory" "${MEMORY_LIMIT:-150}" python3 benchmarks/overhead.py "${flags[@]}" --models "$models" \
  --configs baseline,inter+intra --no-time --json "$out/memory.json"
for m in ${models//,/ }; do  # compiling takes minutes; the compiled step's memory is left out (a probe compiles again)
  part "$m compiled" "${COMPILED_LIMIT:-240}" python3 benchmarks/overhead.py "${flags[@]}" --models "$m" --floor \
    --configs baseline,inter+intra --compiled --no-memory --json "$out/compiled_$m.json" --resume
done
echo "== done in $((SECONDS - start)) s$([ "$failed" -eq 1 ] && echo ', a part failed or was stopped')" | tee -a "$log"
exit "$failed"
