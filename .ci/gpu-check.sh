#!/usr/bin/env bash
# One pass of every GPU check of nanofail, about 9 minutes on one H100 or H200.
# Run `bash .ci/gpu-check.sh` from the project root on a machine with one CUDA GPU; everything lands in
# $OUT (default gpu-out/): summary.txt (the figures, also printed) and gpu.tgz (every log and
# results.json, no checkpoints). BUDGET (default 520) is the second at which the science runs stop.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; BUDGET=${BUDGET:-520}
mkdir -p "$OUT/logs" "$OUT/runs"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
T0=$SECONDS

say "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
python3 -c "import torch, numpy, einops; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'numpy', numpy.__version__)" 2>&1 | tee -a "$OUT/summary.txt"

# Timings first, on an otherwise idle GPU.
say "== Mamba scan modes (python mamba_min.py), then at the paper preset's size (b=256 d_in=768 l=36)"
timeout 60 python3 mamba_min.py > "$OUT/logs/scan.log" 2>&1; say "scan exit $?"
timeout 40 python3 -c "import mamba_min; mamba_min.benchmark(b=256, d_in=768, lengths=(36,))" >> "$OUT/logs/scan.log" 2>&1
say "paper-size scan exit $?"; cat "$OUT/logs/scan.log" >> "$OUT/summary.txt"

say "== paper-preset throughput (100 steps, the last 25 timed; no evaluation until the end) [$((SECONDS - T0)) s]"
for variant in "gpt" "gpt --compile" "mamba" "mamba --compile"; do
  name=$(echo "tput-$variant" | tr -d ' -')
  case $variant in *compile*) limit=120 ;; *) limit=60 ;; esac
  # shellcheck disable=SC2086
  timeout $limit python3 nanofail.py --preset paper --model $variant --n_train 20000 --n_test 200 --max_iters 100 \
    --eval_interval 0 --log_interval 25 > "$OUT/logs/$name.log" 2>&1
  say "$variant exit $?: $(grep 'it/s' "$OUT/logs/$name.log" | tail -1)"
done

say "== science runs side by side on the one GPU, and the tests beside them [$((SECONDS - T0)) s]"
LEFT=$(( BUDGET - (SECONDS - T0) )); [ "$LEFT" -lt 120 ] && LEFT=120
start() {  # name, then a command: runs in the background until LEFT, logged as logs/name.log
  local name=$1; shift
  ( timeout "$LEFT" "$@" > "$OUT/logs/$name.log" 2>&1; echo "$name exit $?" >> "$OUT/logs/exits.txt" ) &
}
run() {  # name, then nanofail flags
  local name=$1; shift
  start "$name" python3 nanofail.py "$@" --out_dir "$OUT/runs/$name"
}
start tests env NANOFAIL_TEST_DEVICE=cuda python3 -m pytest -q test_nanofail.py
# G(2,5) teacherless, batch 256, constant lr 5e-4. On an H100 (RESULTS.md) depth shortened the plateaus:
# 8 x 128 had n3 at step 5000 and n2 at 0.96 by 7000, where 4 x 128 takes 10,000+ steps for n2.
# Does n1, the third lookup, follow, on three seeds? And the paper's own 12 x 384 model?
TL5="--teacherless --n_train 200000 --batch_size 256 --lr 5e-4 --min_lr_frac 1 --max_iters 60000 --eval_interval 1000 --log_interval 500"
for seed in 1337 2 3; do run g25-tl-8L-s$seed $TL5 --n_layer 8 --seed $seed; done
run g25-next-8L ${TL5/--teacherless/} --n_layer 8
run g25-tl-paper --preset paper $TL5 --warmup_iters 1000
run g55-next-8L --deg 5 ${TL5/--teacherless/} --n_layer 8
run mamba-g24-tl-lr5e-4 --model mamba --path_len 4 --n_layer 4 $TL5
wait
say "$(tail -1 "$OUT/logs/tests.log")"
cat "$OUT/logs/exits.txt" >> "$OUT/summary.txt"
for d in "$OUT"/runs/*/; do
  python3 - "$d" <<'PY' | tee -a "$OUT/summary.txt"
import json, os, sys
d = sys.argv[1]
try:
    r = json.load(open(os.path.join(d, "results.json")))
except Exception as e:
    print(f"{os.path.basename(d.rstrip('/'))}: no results ({type(e).__name__})"); sys.exit()
f = r["final"]
print(f"{os.path.basename(d.rstrip('/'))}: step {f['step']} exact {f['test_exact_match']:.3f} "
      f"forced {' '.join(f'{a:.2f}' for a in f['forced_token_acc'])} | exact over evals: "
      + " ".join(f"{h['test_exact_match']:.2f}" for h in r["history"]))
PY
done
find "$OUT/runs" -name 'ckpt.pt*' -delete
tar czf "$OUT/gpu.tgz" -C "$OUT" logs runs && rm -rf "$OUT/logs" "$OUT/runs"
say "== done in $((SECONDS - T0)) s"
