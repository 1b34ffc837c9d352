#!/usr/bin/env bash
# The GPU checks in one call: the CUDA tests, then the cost table's eager rows (with step memory) for each model, then
# its compiled rows for each model while time is left. Each part runs under its own time limit, so one that runs long
# leaves the next ones theirs, and each part's rows are printed as they come (a part stopped at its limit keeps the
# rows it printed). Results go to $OUT (or benchmarks/results/gpu/): one log, and one JSON per finished part.
#
#   bash benchmarks/gpu.sh                                  # resnet50, resnet18, vit_small_patch16_224
#   MODELS=resnet50 BUDGET=300 bash benchmarks/gpu.sh       # one model, five minutes
#   DEVICE=cpu MODELS=test_resnet BATCH=2 IMG=32 ROUNDS=3 bash benchmarks/gpu.sh   # the flow on a CPU, in a minute
#
# BUDGET (seconds, default 570) bounds the whole run; TEST_LIMIT (240), EAGER_LIMIT (120 per model) and
# COMPILED_LIMIT (240 per model) bound the parts. BATCH (256), ROUNDS (50), IMG (224). A machine whose timm is older
# than the package needs gets it from wheels in .whl/ (installed into /tmp/site when present; see benchmarks/README.md,
# "Compiled rows, the floor, and the GPU run").
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${BUDGET:-570}
device=${DEVICE:-cuda}
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
log="$out/gpu.log"
: > "$log"
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu.sh: could not install the wheels in .whl/" | tee -a "$log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $((budget - (SECONDS - start))); }
limit() { local want=$1 l; l=$(left); echo $((want < l ? want : l)); }
part() {  # part NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds (what is left of the budget at most)
  local name=$1 lim
  lim=$(limit "$2")
  shift 2
  if [ "$lim" -lt 20 ]; then
    echo "== $name: skipped, ${lim} s left for it" | tee -a "$log"
    return 0
  fi
  echo "== $name (limit ${lim} s, $(date -u +%H:%M:%S) UTC)" | tee -a "$log"
  timeout "$lim" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "== $name: stopped at its ${lim} s limit" | tee -a "$log"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && echo "== $name: exit status $rc" | tee -a "$log"
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
[ -n "$(command -v nvidia-smi)" ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$log"

models=${MODELS:-resnet50,resnet18,vit_small_patch16_224}
flags=(--device "$device" --amp --channels-last --batch-size "${BATCH:-256}" --img-size "${IMG:-224}"
       --rounds "${ROUNDS:-50}" --floor)
part "CUDA tests" "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_losses.py \
  tests/test_wrap.py -k cuda
for m in ${models//,/ }; do
  part "$m eager" "${EAGER_LIMIT:-120}" python3 benchmarks/overhead.py "${flags[@]}" --models "$m" \
    --configs baseline,baseline-copy,inter,intra,inter+intra --json "$out/eager_$m.json"
done
for m in ${models//,/ }; do  # compiling takes minutes: time only (a memory probe would compile again)
  part "$m compiled" "${COMPILED_LIMIT:-240}" python3 benchmarks/overhead.py "${flags[@]}" --models "$m" \
    --configs baseline,inter+intra --compiled --no-memory --json "$out/compiled_$m.json"
done
echo "== done in $((SECONDS - start)) s" | tee -a "$log"
