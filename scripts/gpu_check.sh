#!/usr/bin/env bash
# The GPU check, in one command, for a fresh CUDA machine where torch is preinstalled:
#
#   scripts/gpu_check.sh [LOG]        # LOG: default gpu_check.log; also $OUT/gpu_check.log when $OUT is set
#
# 1. the machine: nvidia-smi, CPU model, python / torch / triton / transformers versions;
# 2. installs vlm-core and the four first-party plugins (editable) if they do not import, without
#    touching torch or triton (constraints.txt pins a CPU torch's triton: those lines are dropped);
# 3. the Triton kernel tests, compiled (TRITON_INTERPRET=0) on CUDA tensors;
# 4. every family's parity test, vlm on cuda against transformers on cuda (VLM_TEST_DEVICE=cuda);
# 5. benchmarks/decode.py on cuda at batch 1, 8, 16.
#
# Every step runs (a failed one does not stop the rest) under `timeout`, and all of them together
# fit in GPU_CHECK_BUDGET_S seconds (default 460, under 8 minutes). Each step's exit code goes to
# the log and to the summary at its end; the script exits 1 if any step failed (or timed out).
set -euo pipefail

START_DIR=$PWD
cd "$(dirname "$0")/.."
ROOT=$PWD

LOG=${1:-gpu_check.log}
case "$LOG" in /*) ;; *) LOG="$START_DIR/$LOG" ;; esac
mkdir -p "$(dirname "$LOG")"
: >"$LOG"
LOGS=("$LOG")
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  if [ "$(realpath -m "$OUT/gpu_check.log")" != "$(realpath -m "$LOG")" ]; then
    : >"$OUT/gpu_check.log"
    LOGS+=("$OUT/gpu_check.log")
  fi
fi
# everything from here on goes to the terminal and to every log
exec > >(tee -a "${LOGS[@]}") 2>&1
TEE_PID=$!

BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
DEADLINE=$((SECONDS + BUDGET_S))
# no step may reach a model hub (the tests and the benchmark write their own checkpoints)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY=$candidate
      break
    fi
  done
  PY=${PY:-python3}
fi

SUMMARY=()
FAILED=0

# step NAME MAX_SECONDS COMMAND...: run COMMAND under timeout (MAX_SECONDS, or less if the budget
# is running out), record its exit code; never stops the script.
step() {
  local name=$1 limit=$2 rc=0 start=$SECONDS left
  shift 2
  left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  printf '\n==> [%s] %s\n    (timeout %ss, %s UTC)\n' "$name" "$*" "$limit" "$(date -u +%H:%M:%S)"
  if [ "$limit" -lt 5 ]; then
    echo "<== [$name] SKIPPED: the ${BUDGET_S}s budget is spent"
    rc=125
  else
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "<== [$name] TIMED OUT after ${limit}s"
    fi
  fi
  echo "<== [$name] exit $rc after $((SECONDS - start))s"
  SUMMARY+=("$(printf '%-12s exit %3s  %4ss' "$name" "$rc" "$((SECONDS - start))")")
  if [ "$rc" -ne 0 ]; then FAILED=1; fi
  return 0
}

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S') UTC, repo $ROOT, python $PY, log ${LOGS[*]}"
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed paths"

# -- 1. the machine ------------------------------------------------------------------------------
step nvidia-smi 30 nvidia-smi
step cpu 10 bash -c 'lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Socket)" || grep -m1 "model name" /proc/cpuinfo; free -g 2>/dev/null | head -2'
step versions 60 "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.replace("\n", " "), platform.platform())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version(),
      "| cuda available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
for name in ("triton", "transformers", "tokenizers", "numpy"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "not importable:", type(e).__name__, e)
# the check is meaningless without a GPU: fail this step so the summary says so
sys.exit(0 if torch.cuda.is_available() else 1)
EOF

# -- 2. install vlm and its plugins if needed ------------------------------------------------------
PLUGINS=(plugins/llama plugins/internvl plugins/qwen2_vl plugins/llava)
IMPORTS="import vlm, vlm_plugin_llama, vlm_plugin_internvl, vlm_plugin_qwen2vl, vlm_plugin_llava"
if "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
  echo
  echo "==> [install] vlm and the four plugins import already: not installing"
  "$PY" -c "import vlm; print('vlm from', vlm.__file__)"
else
  # constraints.txt is the CPU test environment's pip freeze. Keep its pins (transformers above all:
  # the parity references are that version's models) but drop torch, triton, nvidia-* and torch's
  # own dependencies, so that pip keeps the machine's CUDA torch and the triton it was built with.
  CONSTRAINTS=$(mktemp "${TMPDIR:-/tmp}/gpu_check_constraints.XXXXXX")
  grep -viE '^(torch|triton|nvidia-|sympy|mpmath|networkx|filelock|fsspec|jinja2|markupsafe|typing.extensions|setuptools)([=<>!~ ;[]|$)' \
    constraints.txt >"$CONSTRAINTS" || true
  EDITABLE=(-e ".[test]")
  for plugin in "${PLUGINS[@]}"; do EDITABLE+=(-e "$plugin"); done
  PIP=("$PY" -m pip --disable-pip-version-check install --timeout 20 --retries 1)
  export PIP_BREAK_SYSTEM_PACKAGES=1  # a GPU box's system python may be marked externally managed
  step install 180 "${PIP[@]}" -c "$CONSTRAINTS" "${EDITABLE[@]}"
  if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    # no index reachable (or the pins do not fit this python): install only our packages, with
    # whatever dependencies the machine has; the import check below says whether that is enough
    step install-nodeps 90 "$PY" -m pip --disable-pip-version-check install --no-deps --no-build-isolation \
      "${EDITABLE[@]}"
  fi
  step import 60 "$PY" -c "$IMPORTS; import torch, transformers; print('vlm from', vlm.__file__); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__)"
  rm -f "$CONSTRAINTS"
fi

# -- 3. Triton kernels, compiled, on CUDA tensors ---------------------------------------------------
step kernels 150 env TRITON_INTERPRET=0 VLM_KERNELS=auto "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
  tests/test_kernels.py tests/test_kernels_attention.py tests/test_kernels_quant.py

# -- 4. parity: vlm on cuda against transformers on cuda -------------------------------------------
step parity 210 env VLM_TEST_DEVICE=cuda TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider --durations=5 \
  plugins/llama/tests/test_parity.py plugins/internvl/tests/test_parity.py \
  plugins/qwen2_vl/tests/test_parity.py plugins/llava/tests/test_parity.py

# -- 5. decode throughput on cuda --------------------------------------------------------------------
step benchmark 150 env TRITON_INTERPRET=0 "$PY" benchmarks/decode.py --device cuda --batch 1 8 16

echo
echo "== summary ($((SECONDS))s of a ${BUDGET_S}s budget; exit 124/137: timed out, 125: skipped) =="
printf '  %s\n' "${SUMMARY[@]}"
echo "GPU_CHECK EXIT $FAILED"

# let tee write the last lines before the script (and the machine's session) ends
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
exit "$FAILED"
