#!/usr/bin/env bash
# Every GPU check of nanofail in one pass, about 9 minutes on one H100 or H200:
#   1. the test suite on the GPU, alone;  2. throughput of the g25 model and the paper preset,
#   eager, --compile, and --compile with CUDA graphs;  3. in the time left, teacherless G(2,5) with
#   --preset g25 on several seeds side by side, scored on the original test file, and one
#   next-token control.
# Run `bash .ci/gpu-check.sh` from the project root. Everything lands in $OUT (default gpu-out/):
# summary.txt (also printed) and gpu.tgz (logs and results.json, no checkpoints). BUDGET (default
# 520) is the second at which the science runs stop. DRY_RUN=1 only parses every nanofail command
# line on the CPU (CI runs it, so the commands keep up with the flags).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; BUDGET=${BUDGET:-520}; DRY=${DRY_RUN:-}
T=../shared/ntf-data/deg_2_path_5_nodes_50_test_20000.txt
mkdir -p "$OUT/logs" "$OUT/runs"; : > "$OUT/commands.txt"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
nf() {  # seconds, then flags: python nanofail.py with a time limit; a dry run only notes the flags
  local limit=$1; shift
  if [ -n "$DRY" ]; then echo "$(printf '%q ' "$@")" >> "$OUT/commands.txt"
  else timeout "$limit" python3 nanofail.py "$@"; fi
}
T0=$SECONDS

if [ -z "$DRY" ]; then
  say "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
    | tee -a "$OUT/summary.txt"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
    torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/summary.txt"
  say "== the tests on the GPU, alone (no -x) [$((SECONDS - T0)) s]"
  NANOFAIL_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q test_nanofail.py \
    > "$OUT/logs/tests.log" 2>&1
  say "tests exit $?: $(tail -1 "$OUT/logs/tests.log")"
fi

say "== throughput: 100 steps, the last 25 timed; MFU = GFLOP/s / 989 TFLOP/s (bf16 dense)" \
  "[$((SECONDS - T0)) s]"
for model in "g25" "paper"; do
  for mode in "eager" "compile" "cudagraphs"; do
    case $mode in eager) flags=(); limit=60 ;; compile) flags=(--compile); limit=120 ;;
                  cudagraphs) flags=(--compile --compile_mode reduce-overhead); limit=120 ;; esac
    log="$OUT/logs/tput-$model-$mode.log"
    nf $limit --preset "$model" "${flags[@]}" --n_train 20000 --n_test 200 --max_iters 100 \
      --fresh_after 0 --eval_interval 0 --log_interval 25 > "$log" 2>&1
    rc=$?; line=$(grep 'it/s' "$log" | tail -1)
    mfu=$(echo "$line" | sed -n 's/.* \([0-9]*\) GFLOP\/s.*/\1/p' \
      | awk '{if ($1) printf "MFU %.1f%%", $1 / 9890}')
    [ -z "$DRY" ] && say "$model $mode exit $rc: $line $mfu"
  done
done

say "== teacherless G(2,5), --preset g25, seeds side by side, toward the paper's budget" \
  "[$((SECONDS - T0)) s]"
LEFT=$(( BUDGET - (SECONDS - T0) )); [ "$LEFT" -lt 60 ] && LEFT=60
run() {  # name, then flags: one run in the background until LEFT seconds have passed
  local name=$1; shift
  ( nf "$LEFT" "$@" --test_file "$T" --out_dir "$OUT/runs/$name" > "$OUT/logs/$name.log" 2>&1
    echo "$name exit $?" >> "$OUT/logs/exits.txt" ) &
}
# the paper's 500 epochs of the 200,000-graph pool (no new graphs: --fresh_after 0)
PAPER_BUDGET="--fresh_after 0 --max_iters 390625 --eval_interval 2000 --log_interval 1000"
for seed in 1337 2 3 4 5 6; do
  run "g25-tl-s$seed" --preset g25 --teacherless --seed "$seed" $PAPER_BUDGET
done
run g25-next-s1337 --preset g25 $PAPER_BUDGET
wait

if [ -n "$DRY" ]; then  # every noted command line must parse, in one process
  python3 - "$OUT/commands.txt" <<'PY'
import shlex, sys
import nanofail as nf
lines = [ln for ln in open(sys.argv[1]) if ln.strip()]
for ln in lines:
    nf.parse_config(shlex.split(ln))
print(f"dry run: {len(lines)} nanofail command lines parse")
PY
  status=$?; rm -rf "$OUT"; exit $status
fi
cat "$OUT/logs/exits.txt" >> "$OUT/summary.txt"
python3 assets/figures.py --odds "$OUT"/runs/*/ | tee -a "$OUT/summary.txt"  # k of n reached 0.95
find "$OUT/runs" -name 'ckpt.pt*' -delete
tar czf "$OUT/gpu.tgz" -C "$OUT" logs runs && rm -rf "$OUT/logs" "$OUT/runs"
say "== done in $((SECONDS - T0)) s"
