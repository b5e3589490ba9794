#!/usr/bin/env bash
# The whole GPU story in one call: correctness at real shapes, then timing against peers, then
# end-to-end training steps; JSON + markdown under $OUT (or benchmarks/results/), summary last.
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine (device tool: carry .whl)
#   bash benchmarks/gpu_suite.sh --dry-run    # CPU, tiny shapes, Triton interpreter (CI)
#
# Options: --dry-run | --no-install | --budget SECONDS (default 510 GPU, 600 dry-run) |
#          --only step1,step2 (names below) | --with-gpu-tests (also `pytest -m gpu`)
#
# On the device machine (one call; ~8 min; the wheels come from `bash benchmarks/make_wheels.sh`
# run here first): run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600).
# Then copy $OUT's TAG.json/TAG.md into benchmarks/results/, run
# `python -m benchmarks.render_results` (README table) and commit both.
#
# Order, each step's own budget (s) and what it should take on an H100. Every budget is cut to
# what is left of the global --budget (510 s), so one hang cannot eat the lease; a step with
# < 10 s left is skipped, so the least important steps come last:
#   install       60  ~10  .whl/*.whl -> /tmp/site (PYTHONPATH)
#   install_pkg  150  ~40  pip install --no-build-isolation --no-deps -e .  (CMake builds _merge)
#   nvidia_smi    20   ~1
#   env           60  ~15  torch/triton/transformers/peer versions, GPU, driver; peers importable?
#   check_*      120  ~40  each kernel's --check at real shapes vs its torch reference; a failure
#                          is LOUD, skips that kernel's timing and the end-to-end steps, exit 1
#   aot           45  ~30  python -m r7b_fast.kernels.aot (registers, spills, smem, wgmma, sm_90)
#   time_*     75/80  ~60  each kernel's benchmark vs peers (attention: --budget 60)
#   train        200 ~150  benchmarks/train_step.py: SFT + DPO steps, ours vs HF vs HF+Liger
#   trl          150  ~90  benchmarks/trl_dpo.py: TRL's DPOTrainer vs +Liger vs our drop-in (alone: --only install,env,trl)
#   train_compile 150 ~120 train_step.py --matrix: ours SFT, regional torch.compile off/on, MFU (R7B layers)
#   merge         60  ~30  CPU-side benchmarks, when present
#   packing       40  ~15
# Files: DEST/TAG.json, DEST/TAG.md, DEST/TAG.log (DEST = $OUT, else benchmarks/results/; TAG =
# <UTC date>-<card>, card cpu-dryrun for --dry-run): 3 files, as the device machine returns at
# most 8. Every part writes into a scratch folder ($R7B_RESULTS_DIR) consolidated after each
# step, so a run killed mid-way still leaves its results.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY=0 INSTALL=1 BUDGET="" ONLY="" GPU_TESTS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-install) INSTALL=0 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=",$2,"; shift ;;
    --with-gpu-tests) GPU_TESTS=1 ;;
    -h | --help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
# The GPU machine has no network: nothing may wait on a connection (pip's version check, the Hub).
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  BUDGET=${BUDGET:-600}
  CARD=cpu-dryrun
else
  BUDGET=${BUDGET:-510}
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
  case "$name" in
    *H100*) CARD=h100 ;; *H200*) CARD=h200 ;; *A100*) CARD=a100 ;;
    "") echo "gpu_suite: no GPU found (nvidia-smi); use --dry-run on a CPU" >&2; exit 2 ;;
    *) CARD=$(echo "$name" | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z' | cut -c1-16) ;;
  esac
fi
TAG=$(date -u +%Y-%m-%d)-$CARD
DEST=${OUT:-$REPO/benchmarks/results}
mkdir -p "$DEST"
PARTS=$(mktemp -d "${TMPDIR:-/tmp}/r7b-suite.XXXXXX")
export R7B_RESULTS_DIR=$PARTS
LOG=$DEST/$TAG.log
: >"$LOG"
exec 3>&1 4>&2 > >(tee -a "$LOG") 2>&1
finish() { # restore stdout/stderr so tee sees EOF and flushes before the script ends
  exec 1>&3 2>&4 3>&- 4>&-
  sleep 1
  exit "$1"
}
START=$(date +%s)
FAILED=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }

record() { # step status seconds budget command
  "$PY" - "$@" >>"$PARTS/steps.jsonl" <<'EOF'
import json, sys
s, st, sec, b, cmd = sys.argv[1:6]
print(json.dumps({"step": s, "status": st, "seconds": int(sec), "budget_s": int(b), "command": cmd}))
EOF
}

consolidate() {
  "$PY" -m benchmarks.render_results --consolidate "$PARTS" --dest "$DEST" --tag "$TAG" >/dev/null ||
    echo "gpu_suite: consolidation failed" >&2
}

# step NAME BUDGET_S CMD...: runs CMD under `timeout`, cut to the global budget; sets STATUS.
step() {
  local name=$1 budget=$2
  shift 2
  STATUS=skipped
  if ! wanted "$name"; then return 0; fi
  local avail=$(($(left) - 15))
  if [ "$avail" -lt 10 ]; then
    echo "=== [$name] SKIPPED: no time left in the ${BUDGET}s budget"
    record "$name" "no-time" 0 "$budget" "$*"
    return 0
  fi
  [ "$budget" -gt "$avail" ] && budget=$avail
  echo "=== [$name] (budget ${budget}s, $(left)s left): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$budget" "$@"
  rc=$?
  local dt=$(($(date +%s) - t0))
  case $rc in
    0) STATUS=ok ;;
    124 | 137) STATUS=timeout ;;
    *) STATUS="fail($rc)" ;;
  esac
  echo "=== [$name] $STATUS in ${dt}s"
  record "$name" "$STATUS" "$dt" "$budget" "$*"
  consolidate
}

# part NAME: present when benchmarks/NAME.py exists
present() { [ -f "$REPO/benchmarks/$1.py" ]; }

# ---------------------------------------------------------------------------- install
if [ "$INSTALL" = 1 ] && wanted install; then
  if ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY" = 1 ]; then
    # CPU: the venv already has the peers; prove the wheel set resolves for the GPU's Python 3.12.
    step install 60 "$PY" -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux2014_x86_64 --target /tmp/r7b-site-dry .whl/*.whl
  elif ls .whl/*.whl >/dev/null 2>&1; then
    step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
  else
    echo "=== [install] no .whl/ wheels: peers must already be installed (bash benchmarks/make_wheels.sh)"
  fi
  if [ "$DRY" = 0 ]; then
    # no build isolation (no network): the build uses the carried setuptools (PEP 639 license
    # metadata needs >= 77) ahead of the image's own, then the image's pybind11 and cmake
    step install_pkg 150 env PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
      "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e .
  fi
fi
if [ "$DRY" = 0 ] && [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# ---------------------------------------------------------------------------- environment
[ "$DRY" = 1 ] || step nvidia_smi 20 nvidia-smi
if [ "$DRY" = 1 ]; then
  step env 60 "$PY" -m benchmarks._common --env --no-imports
else
  step env 60 "$PY" -m benchmarks._common --env
fi

# ---------------------------------------------------------------------------- correctness
# Each kernel benchmark's --check compares the kernel with its torch reference at the real
# shapes (tiny shapes on the CPU) and exits non-zero when it is wrong.
declare -A OK
for k in linear_logprobs attention; do
  OK[$k]=0
  if present "$k"; then
    step "check_$k" 120 "$PY" -m "benchmarks.$k" --check
    if [ "$STATUS" = ok ] || ! wanted "check_$k"; then
      OK[$k]=1
    elif [ "$STATUS" != skipped ]; then
      FAILED=1
      echo "!!!!!!!!!!!!!!!! [check_$k] $STATUS: $k is WRONG or did not finish; its timing is skipped !!!!!!!!!!!!!!!!"
    fi
  else
    echo "=== [check_$k] benchmarks/$k.py not present"
    record "check_$k" "missing" 0 0 "benchmarks/$k.py"
  fi
done
if [ "$GPU_TESTS" = 1 ]; then
  # --dry-run: the same tests at their tiny CPU shapes through the interpreter (their code checked)
  step gpu_tests 120 env R7B_GPU_TESTS_ON_CPU=$DRY "$PY" -m pytest -q -m gpu tests
  [ "$STATUS" = ok ] || [ "$STATUS" = skipped ] || FAILED=1
fi

# ---------------------------------------------------------------------------- AOT report
# (compiles for sm_90 without a GPU; the interpreter must be off, also in --dry-run)
step aot 45 env -u TRITON_INTERPRET "$PY" -m r7b_fast.kernels.aot

# ---------------------------------------------------------------------------- kernel timing
# (--dry-run: the smallest shapes and budgets: it proves the plumbing, times nothing useful)
if [ "$DRY" = 1 ]; then LL_ARGS=(--reps 1 --shape 16 32 40) ATT_ARGS=(--budget 5); else
  LL_ARGS=() ATT_ARGS=(--budget 60); fi
if [ "${OK[linear_logprobs]}" = 1 ]; then
  step time_linear_logprobs 75 "$PY" -m benchmarks.linear_logprobs ${LL_ARGS[@]+"${LL_ARGS[@]}"}
  [ "$STATUS" = ok ] || [ "$STATUS" = skipped ] || FAILED=1
fi
if [ "${OK[attention]}" = 1 ]; then
  step time_attention 80 "$PY" -m benchmarks.attention ${ATT_ARGS[@]+"${ATT_ARGS[@]}"}
  [ "$STATUS" = ok ] || [ "$STATUS" = skipped ] || FAILED=1
fi

# ---------------------------------------------------------------------------- end to end
if [ "${OK[linear_logprobs]}" = 1 ] && [ "${OK[attention]}" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    step train 240 "$PY" -m benchmarks.train_step --dry-run
  else
    step train 200 "$PY" -m benchmarks.train_step
  fi
  [ "$STATUS" = ok ] || [ "$STATUS" = skipped ] || FAILED=1
else
  echo "=== [train] skipped: a kernel check failed or is missing"
  record train "skipped(check)" 0 0 "benchmarks/train_step.py"
fi

# ---------------------------------------------------------------------------- TRL drop-in
# TRL's DPOTrainer vs TRL + use_liger_kernel vs r7b_fast.integrations.trl.DPOTrainer, R7B layer
# shapes (2 layers, vocab 256000), bf16; --dry-run: tiny model, every variant, one short round.
if [ "${OK[linear_logprobs]}" = 1 ] && [ "${OK[attention]}" = 1 ] && present trl_dpo; then
  if [ "$DRY" = 1 ]; then
    step trl 150 "$PY" -m benchmarks.trl_dpo --dry-run
  else
    step trl 150 "$PY" -m benchmarks.trl_dpo --budget 90
  fi
  [ "$STATUS" = ok ] || [ "$STATUS" = skipped ] || FAILED=1
fi

# ---------------------------------------------------------------------------- torch.compile
# Our SFT step with regional torch.compile off / on (r7b_fast.compile), R7B layer shapes, 4 layers,
# one 8192-token row; each cell in its own process (first step = compile time); MFU per cell.
# --dry-run: the tiny model on the CPU, dynamo only (backend eager): the plumbing.
if [ "${OK[linear_logprobs]}" = 1 ] && [ "${OK[attention]}" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    step train_compile 150 "$PY" -m benchmarks.train_step --matrix --dry-run --ac-modes none
  else
    step train_compile 150 "$PY" -m benchmarks.train_step --matrix
  fi
  [ "$STATUS" = ok ] || [ "$STATUS" = skipped ] || FAILED=1
fi

# ---------------------------------------------------------------------------- CPU-side parts
if present merge; then
  if [ "$DRY" = 1 ]; then
    step merge 60 "$PY" -m benchmarks.merge --experts 2 --size-mb 4 --scale-experts "" --big 0 --reps 1 \
      --no-mergekit
  else
    step merge 60 "$PY" -m benchmarks.merge --experts 3 --size-mb 400 --scale-experts "" --big 0 --reps 1
  fi
fi
if present packing; then
  if [ "$DRY" = 1 ]; then
    step packing 60 "$PY" -m benchmarks.packing --n 20000 --reps 1 --trl-reps 0
  else
    step packing 40 "$PY" -m benchmarks.packing
  fi
fi

# ---------------------------------------------------------------------------- summary
echo
echo "=== gpu_suite $TAG: $(($(date +%s) - START))s; files: $DEST/$TAG.{json,md,log}"
"$PY" -m benchmarks.render_results --consolidate "$PARTS" --dest "$DEST" --tag "$TAG" || FAILED=1
rm -rf "$PARTS"
if [ "$FAILED" = 1 ]; then
  echo "gpu_suite: FAILED (see the steps above)"
  finish 1
fi
echo "gpu_suite: ok"
finish 0
