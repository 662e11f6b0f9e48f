#!/usr/bin/env bash
# The GPU check of nanofail: one pass on one lent H100 or H200, over within 9 minutes, the most
# valuable facts first. Every stage has a hard time limit, and a stage that fails or is cut does
# not stop the next:
#   (a) the test suite on the GPU, alone                                                <= 180 s
#   (b) the default demo: GPT and Mamba, next-token and teacherless, 4 side by side     <= 150 s
#   (c) throughput of --preset g25 and --preset paper: eager, --compile, CUDA graphs,
#       one run at a time, the compile time apart from the steady it/s                  <= 120 s
#   (d) until second $END (515): teacherless --preset g25 on as many seeds as fit side by side,
#       and one next-token control, scored on the original G(2,5) test file
# Usage, from anywhere: `bash .ci/gpu-check.sh`. Everything lands in $OUT (default gpu-out/):
# summary.md (printed too; what README and RESULTS quote) and gpu.tgz (every log and results.json,
# no checkpoints). The test file is TEST_FILE, or deg_2_path_5_nodes_50_test_*.txt in
# ../shared/ntf-data/ or, inside the repo, shared/ntf-data/ (the device tool carries a shared/ in
# the checkout, not the one beside it): without it (d) is skipped. NSEEDS overrides the seed count,
# PEAK_TFLOPS the bf16 peak for MFU. DRY_RUN=1 (CI, no GPU) trains nothing: every nanofail command
# line is parsed with today's flags, and the summary is built from nothing.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1  # logs fill as the runs go: a run cut by its time limit keeps its lines
OUT=${OUT:-gpu-out}; END=${END:-515}; DRY=${DRY_RUN:-}; PY=${PYTHON:-python3}
LOGS=$OUT/logs; RUNS=$OUT/runs
mkdir -p "$LOGS" "$RUNS"
: > "$LOGS/commands.tsv"; : > "$LOGS/times.txt"; : > "$LOGS/notes.txt"; : > "$LOGS/stages.txt"
T0=$SECONDS

note() { echo "$*" | tee -a "$LOGS/notes.txt"; }       # a line the summary quotes as it is
stage() { echo "$1 $((SECONDS - T0))" >> "$LOGS/stages.txt"; echo "== $1 [$((SECONDS - T0)) s]"; }
# limit SECONDS CMD...: SIGINT at the limit (nanofail then names the step it reached, pytest prints
# its counts so far), SIGKILL 10 s later if that did not stop it; exit 124 when cut.
limit() { timeout -s INT -k 10 "$@"; }

# one NAME SECONDS FLAGS...: `python nanofail.py FLAGS` under a time limit, its output in
# logs/NAME.log, its exit status and start and end times in logs/times.txt. A dry run only notes
# the flags, to parse them below.
one() {
  local name=$1 seconds=$2 start rc
  shift 2
  printf '%s\t%s\n' "$name" "$(printf '%q ' "$@")" >> "$LOGS/commands.tsv"
  [ -n "$DRY" ] && return
  start=$(date +%s.%N)
  limit "$seconds" "$PY" nanofail.py "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name $rc $start $(date +%s.%N)" >> "$LOGS/times.txt"
}

stage machine
if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$LOGS/machine.txt" 2>&1
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    >> "$LOGS/machine.txt" 2>&1
  # which code ran: the commit, if the copy has its .git (+: with uncommitted changes)
  (git rev-parse --short HEAD && git status --porcelain -uno | head -1 | sed 's/.*/+ changes/') \
    2>/dev/null | tr '\n' ' ' >> "$LOGS/machine.txt"
  cat "$LOGS/machine.txt"; echo
fi

# (a) First and alone: whether the code works on CUDA at all is the most valuable fact, and a
# test that times something must not share the GPU. No -x: every failure is listed.
stage tests
if [ -z "$DRY" ]; then
  NANOFAIL_TEST_DEVICE=cuda limit 180 "$PY" -m pytest -q test_nanofail.py > "$LOGS/tests.log" 2>&1
  echo "tests $?" >> "$LOGS/times.txt"
  tail -1 "$LOGS/tests.log"
fi

# (b) The README's four demo commands with their defaults as they are today (only --out_dir is
# added, for results.json), side by side: small models leave the GPU mostly idle, and one thread
# each keeps four processes from crowding the CPU.
stage demo
demo() { OMP_NUM_THREADS=1 one "$1" 150 "${@:2}" --out_dir "$RUNS/$1" & }
demo demo-gpt
demo demo-gpt-tl --teacherless
demo demo-mamba --model mamba
demo demo-mamba-tl --model mamba --teacherless
wait

# (c) One run at a time, so each it/s is the GPU's alone. A progress line every 50 steps: the first
# window holds the compilation (and CUDA-graph recording), the later ones the steady speed. A small
# data set (--n_train, --n_test) and no new graphs (--fresh_after 0) keep the start short; the
# evaluation comes once, after the last timed window. Eager first (cheap and sure), then compiled,
# each run cut where the stage's 120 s run out.
stage throughput
SHORT="--n_train 20000 --n_test 200 --fresh_after 0 --max_iters 400 --log_interval 50"
SHORT="$SHORT --eval_interval 0"
stage_end=$((SECONDS + 120))
for run in "g25 eager" "paper eager" "g25 compile" "g25 cudagraphs" "paper cudagraphs" \
           "paper compile"; do
  read -r preset mode <<< "$run"
  case $mode in
    eager) flags=""; cap=40 ;;
    compile) flags="--compile"; cap=90 ;;
    cudagraphs) flags="--compile --compile_mode reduce-overhead"; cap=90 ;;
  esac
  left=$((stage_end - SECONDS))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ -z "$DRY" ] && [ "$cap" -lt 15 ]; then  # too little time for a steady window
    echo "tput-$preset-$mode skipped" >> "$LOGS/times.txt"
    continue
  fi
  one "tput-$preset-$mode" "$cap" --preset "$preset" $flags $SHORT
done

# (d) Where teacherless G(2,5) stands after the minutes left, seed by seed: each run is cut at
# second $END, and an evaluation every 500 steps (results.json) says where it stood. One CPU core
# each (a process launching small kernels keeps its core busy), two spare, one for the control;
# about 3 GiB of GPU memory each at most.
stage g25
TF=${TEST_FILE:-$(ls ../shared/ntf-data/deg_2_path_5_nodes_50_test_*.txt \
                    shared/ntf-data/deg_2_path_5_nodes_50_test_*.txt 2>/dev/null | head -1)}
[ -n "$DRY" ] && TF=${TF:-shared/ntf-data/deg_2_path_5_nodes_50_test_20000.txt}  # parsed only
gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
NSEEDS=${NSEEDS:-$(( $(nproc) - 3 ))}
[ -n "$gib" ] && [ "$NSEEDS" -gt $((gib / 1024 / 3)) ] && NSEEDS=$((gib / 1024 / 3))
[ "$NSEEDS" -lt 1 ] && NSEEDS=1
left=$((END - (SECONDS - T0)))
if [ -z "$DRY" ] && [ ! -f "$TF" ]; then
  note "(d) skipped: no deg_2_path_5_nodes_50_test_*.txt in ../shared/ntf-data/ or" \
       "shared/ntf-data/ (copy it into shared/ntf-data/ of the checkout, or set TEST_FILE)"
elif [ -z "$DRY" ] && [ "$left" -lt 45 ]; then
  note "(d) skipped: $left s left before second $END, too few for an evaluation"
else
  note "(d) $NSEEDS teacherless seeds and 1 next-token control side by side for $left s" \
       "(to second $END), scored on $TF ($(wc -l 2>/dev/null < "$TF" || echo '?') graphs)"
  EVAL="--test_file $TF --eval_interval 500 --log_interval 100"
  for seed in 1337 $(seq 2 "$NSEEDS"); do
    OMP_NUM_THREADS=1 one "g25-tl-s$seed" "$left" --preset g25 --teacherless --seed "$seed" \
      $EVAL --out_dir "$RUNS/g25-tl-s$seed" &
  done
  OMP_NUM_THREADS=1 one g25-next-s1337 "$left" --preset g25 --seed 1337 $EVAL \
    --out_dir "$RUNS/g25-next-s1337" &
  wait
fi
stage end

status=0
if [ -n "$DRY" ]; then  # every noted command line must parse, in one process
  "$PY" - "$LOGS/commands.tsv" <<'PY' || status=1
import shlex, sys
import nanofail as nf
lines = [ln.split("\t")[1] for ln in open(sys.argv[1]) if ln.strip()]
for flags in lines:
    nf.parse_config(shlex.split(flags))
print(f"dry run: {len(lines)} nanofail command lines parse")
PY
fi

# The summary, from the logs and each run's results.json; quotable as it is.
PEAK_TFLOPS=${PEAK_TFLOPS:-} "$PY" - "$OUT" "$DRY" > "$OUT/summary.md" <<'PY' || status=1
import json, os, re, statistics, sys
out, dry = sys.argv[1], sys.argv[2]
logs = os.path.join(out, "logs")

def read(name):
    path = os.path.join(logs, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""

def results(name):  # the run's results.json (every evaluation), or None
    path = os.path.join(out, "runs", name, "results.json")
    return json.load(open(path)) if os.path.exists(path) else None

PROGRESS = re.compile(r"step\s+(\d+)/\d+ \| loss \S+ \| lr \S+ \| ([\d.]+) it/s (\d+) GFLOP/s")

def progress(name):  # (step, it/s, GFLOP/s) of each progress line
    return [(int(s), float(i), float(g)) for s, i, g in PROGRESS.findall(read(name + ".log"))]

machine = read("machine.txt").splitlines() or ["no nvidia-smi"]
gpu = machine[0]
# the bf16 dense peak: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756
peak = float(os.environ.get("PEAK_TFLOPS") or (
    756 if "PCIe" in gpu else 989 if re.search("H100|H200", gpu) else 0))
runs = {}  # name -> flags, exit status, wall seconds
for line in read("commands.tsv").splitlines():
    name, flags = line.split("\t")
    flags = re.sub(r"--out_dir \S+ ?", "", flags).strip()  # where it went: not part of the command
    runs[name] = dict(flags=flags, rc=None, wall=None)
for line in read("times.txt").splitlines():
    name, rc, *span = line.split()
    wall = float(span[1]) - float(span[0]) if len(span) == 2 else None
    runs.setdefault(name, dict(flags="")).update(rc=rc, wall=wall)

def how(name):  # how the run ended, in words
    rc = runs.get(name, {}).get("rc")
    if rc in (None, "skipped"):
        return "not run" if rc is None else "skipped: stage time spent"
    if rc in ("0", "124", "137"):  # 124: stopped at the limit; 137: killed 10 s after
        return "done" if rc == "0" else "cut at its limit"
    last = [ln for ln in read(name + ".log").splitlines() if ln.strip()][-1:] or ["(no output)"]
    return f"exit {rc}: {last[0][:120]}"

def forced(entry):
    return " ".join(f"{a:.3f}" for a in entry["forced_token_acc"])

def cmd(name):
    return "`" + f"python nanofail.py {runs[name]['flags']}".strip() + "`"

def secs(x):
    return "" if x is None else f"{x:.0f}"

print("# nanofail GPU check" + (" (DRY RUN: nothing trained)" if dry else ""))
print()
print(f"- GPU: {gpu}; bf16 dense peak for MFU: {peak:.0f} TFLOP/s" if peak else f"- GPU: {gpu}")
print("- " + " | ".join(machine[1:]) if machine[1:] else "- torch: unknown")
marks = [line.split() for line in read("stages.txt").splitlines()]
spans = [f"{a} {int(t1) - int(t0)} s" for (a, t0), (_, t1) in zip(marks, marks[1:])]
print(f"- stages: {', '.join(spans)}; whole check {marks[-1][1] if marks else '?'} s")

print("\n## (a) Tests on the GPU\n")
print("`NANOFAIL_TEST_DEVICE=cuda python -m pytest -q test_nanofail.py`, alone, limit 180 s: "
      f"exit {runs.get('tests', {}).get('rc', 'not run')}")
counts = re.findall(r"^=*\s*(\d+ \w+.* in [\d.]+s.*?)\s*=*$", read("tests.log"), re.M)
print(f"\n    {counts[-1] if counts else 'no counts in the log'}")
for line in re.findall(r"^(?:FAILED|ERROR) .*$", read("tests.log"), re.M):
    print(f"    {line[:160]}")

print("\n## (b) The default demo, 4 runs side by side on the one GPU (limit 150 s)\n")
print("| run | command | wall s | ended | step | exact match | forced s n1 ... g |")
print("|---|---|---|---|---|---|---|")
for name in ("demo-gpt", "demo-gpt-tl", "demo-mamba", "demo-mamba-tl"):
    if name not in runs:
        continue
    r = results(name)
    last = r["history"][-1] if r else None
    row = [name, cmd(name), secs(runs[name]["wall"]), how(name)]
    row += [f"{last['step']}/{r['config']['max_iters']}", f"{last['test_exact_match']:.3f}",
            forced(last)] if last else ["", "", ""]
    print("| " + " | ".join(row) + " |")

print("\n## (c) Throughput, one run at a time (stage limit 120 s)\n")
print("it/s and GFLOP/s: the median of the progress lines after the first; the first window holds "
      "the compilation, so compile ~ its seconds less those of a steady window. "
      "MFU = GFLOP/s / the bf16 peak.\n")
print("| preset | mode | command | ended | wall s | compile s | it/s | GFLOP/s | MFU |")
print("|---|---|---|---|---|---|---|---|---|")
for name in [n for n in runs if n.startswith("tput-")]:
    _, preset, mode = name.split("-", 2)
    lines = progress(name)
    row = [preset, mode, cmd(name) if runs[name]["flags"] else "", how(name),
           secs(runs[name]["wall"])]
    if len(lines) >= 2:
        its = statistics.median(i for _, i, _ in lines[1:])
        gflops = statistics.median(g for _, _, g in lines[1:])
        window = lines[0][0]  # steps in each window: the first line's step
        row += [f"{window / lines[0][1] - window / its:.1f}", f"{its:.1f}", f"{gflops:.0f}",
                f"{100 * gflops / (peak * 1000):.1f} %" if peak else ""]
    else:
        row += ["", "", "", ""]
    print("| " + " | ".join(row) + " |")

print("\n## (d) G(2,5), --preset g25, seeds side by side\n")
for line in read("notes.txt").splitlines():
    print(line)
g25 = [n for n in runs if n.startswith("g25-")]
if g25:
    print("\nstep: the last one trained; the evaluation columns are the last results.json entry.\n")
    print("| run | command | ended | step | it/s | eval step | exact match | forced s n1 n2 n3 g |"
          " exact at each evaluation |")
    print("|---|---|---|---|---|---|---|---|---|")
for name in g25:
    lines, r = progress(name), results(name)
    stop = re.findall(r"interrupted at step (\d+)", read(name + ".log"))
    step = stop[-1] if stop else str(lines[-1][0]) if lines else ""
    row = [name, cmd(name), how(name), step, f"{lines[-1][1]:.1f}" if lines else ""]
    if r:
        last = r["history"][-1]
        trail = " ".join(f"{h['test_exact_match']:.2f}" for h in r["history"])
        row += [str(last["step"]), f"{last['test_exact_match']:.3f}", forced(last), trail]
    else:
        row += ["", "", "", ""]
    print("| " + " | ".join(row) + " |")
PY
cat "$OUT/summary.md"
if [ -n "$DRY" ]; then
  rm -rf "$OUT"
  exit $status
fi
find "$RUNS" -name 'ckpt.pt*' -delete  # the results.json stay; checkpoints are too large to keep
tar czf "$OUT/gpu.tgz" -C "$OUT" logs runs && rm -rf "$LOGS" "$RUNS"
echo "== done in $((SECONDS - T0)) s: $OUT/summary.md, $OUT/gpu.tgz"
exit $status
