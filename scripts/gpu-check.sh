#!/usr/bin/env bash
# Check vLLM's sleep mode through the proxy on a real NVIDIA GPU (issue 14), end to end, in
# under 8 minutes. Not part of CI: run it by hand on a GPU machine.
#
# Usage: scripts/gpu-check.sh
#
# Needs: an NVIDIA GPU and driver (nvidia-smi), vLLM installed in a Python environment, and
# THIS PROJECT INSTALLED IN THAT SAME ENVIRONMENT (the thing under test), e.g.
#     /path/to/vllm-env/bin/pip install -e /path/to/aic-vllm-proxy
#     AIC_GPU_CHECK_PYTHON=/path/to/vllm-env/bin/python scripts/gpu-check.sh
# It installs nothing and downloads nothing.
#
# What it does:
#  1. builds a tiny random-weight Llama model locally (tests/realvllm/make_tiny_model.py; torch,
#     transformers and tokenizers come with vLLM) and copies it, so there are two models, A
#     (tiny-a) and B (tiny-b);
#  2. writes a catalogue: both on the same GPU, `sleep = 1`, each with a GPU share (default 0.6)
#     such that both cannot run at once: loading one evicts, that is parks, the other;
#  3. starts `python -m aic_vllm_proxy serve --config CATALOGUE` on a free port and checks:
#     POST /load A (cold), POST /load B (cold; A parks: /status shows A `sleeping`, same pid),
#     the GPU memory of A's process group asleep against awake (nvidia-smi
#     --query-compute-apps; the proxy's own rule: at most a tenth, or 2 GiB, is left), a
#     /v1/completions request naming A (A wakes, the same process; B parks; B's memory checked
#     too), POST /load B (wakes it), POST /switch A then B (each wakes);
#  4. prints a table of timings (wall clock, and the answers' load_seconds, total_seconds, woke),
#     then one summary line, last:
#         gpu-check: PASS (cold 41.2 s, wake 1.3 s, memory released 14.1 -> 0.4 GiB)
#         gpu-check: FAIL <reason>
#     and exits 0 (PASS) or 1 (FAIL).
# Every wait has a timeout within a global deadline; on exit (also on Ctrl-C, a failure or the
# deadline) the proxy and every vLLM process group it started are stopped, then killed if left.
# The proxy's own check after a sleep (NVML through nvidia-ml-py, the `gpu` extra) stops an
# instance whose memory was not released and says so in /status: then A is not `sleeping` and
# the check fails with that error. Without nvidia-ml-py the proxy skips its check; this
# script's nvidia-smi comparison still runs. In a container whose pid namespace hides the
# processes from nvidia-smi, A's memory is estimated from the GPU's totals (said in the notes).
#
# Environment:
#   AIC_GPU_CHECK_PYTHON         python of vLLM's environment, with the project installed
#                                (default: python3)
#   AIC_GPU_CHECK_GPU            the GPU to use (default: the first of CUDA_VISIBLE_DEVICES, else 0)
#   AIC_GPU_CHECK_UTILIZATION    each model's --gpu-memory-utilization (default 0.6; above 0.5)
#   AIC_GPU_CHECK_VLLM_COMMAND   the proxy's --vllm-command (default: the `vllm` next to that
#                                python, else `vllm` on PATH, with `serve`; the proxy runs in the
#                                work folder, so give absolute paths)
#   AIC_GPU_CHECK_VLLM_ARGS      vLLM arguments of both models (default: --dtype float16
#                                --max-model-len 1024; add --enforce-eager for a faster cold start)
#   AIC_GPU_CHECK_WORKDIR        folder for the models, catalogue and logs (default: a new
#                                temporary folder, removed after a PASS; kept after a FAIL)
#   AIC_GPU_CHECK_DEADLINE       seconds for the whole script, cleanup included (default 450)
#   AIC_GPU_CHECK_SWITCH=0       skip the /switch steps
# Test-only (tests/test_gpu_check.py runs this script against the project's simulator):
#   AIC_GPU_CHECK_MODEL_A, AIC_GPU_CHECK_MODEL_B   models to use instead of building the tiny
#                                one (for the simulator any names; both or neither)
#   AIC_VLLM_SIM_GPU_STATE       the simulator's GPU state folder (docs/simulator.md): when set,
#                                GPU memory is read from its files instead of nvidia-smi, and
#                                nvidia-smi is not required
set -uo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${AIC_GPU_CHECK_PYTHON:-python3}
DEADLINE=${AIC_GPU_CHECK_DEADLINE:-450}
CLEANUP=45  # seconds kept at the end for stopping the proxy and its vLLM instances
UTILIZATION=${AIC_GPU_CHECK_UTILIZATION:-0.6}
VLLM_ARGS=${AIC_GPU_CHECK_VLLM_ARGS:---dtype float16 --max-model-len 1024}
T0=$(date +%s)

fail() {  # the summary line of a check that could not even start
  echo "gpu-check: FAIL $*"
  exit 1
}

left() {  # left CAP: seconds until the deadline minus the cleanup time, at most CAP (at least 1)
  local n=$((DEADLINE - CLEANUP - ($(date +%s) - T0)))
  ((n > $1)) && n=$1
  ((n < 1)) && n=1
  echo "$n"
}

log() { printf '[gpu-check +%ss] %s\n' "$(($(date +%s) - T0))" "$*"; }

[[ "$PY" == */* && "$PY" != /* ]] && PY=$PWD/$PY  # the checks below run it from other folders
command -v "$PY" >/dev/null 2>&1 || fail "no python '$PY' (set AIC_GPU_CHECK_PYTHON to vLLM's environment's python)"
# From /: a python started in the repository would import the project from its source tree.
if ! IMPORT_ERROR=$(cd / && "$PY" -c 'import aic_vllm_proxy.cli, aic_vllm_proxy.web.app' 2>&1); then
  fail "the project is not importable by $PY ($(tail -n 1 <<<"$IMPORT_ERROR")): install it into vLLM's environment ($PY -m pip install -e $REPO_ROOT) or set AIC_GPU_CHECK_PYTHON"
fi
if [[ -z "${AIC_VLLM_SIM_GPU_STATE:-}" ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  fail "nvidia-smi not found: this check needs an NVIDIA GPU and its driver"
fi

PY_BIN=$(dirname "$(command -v "$PY")")
if [[ -n "${AIC_GPU_CHECK_VLLM_COMMAND:-}" ]]; then
  VLLM_COMMAND=$AIC_GPU_CHECK_VLLM_COMMAND
elif [[ -x "$PY_BIN/vllm" ]]; then
  VLLM_COMMAND="$PY_BIN/vllm serve"  # the vLLM of that python's environment
elif command -v vllm >/dev/null 2>&1; then
  VLLM_COMMAND="vllm serve"
else
  fail "no vllm command (next to $PY or on PATH): is vLLM installed there?"
fi

GPU=${AIC_GPU_CHECK_GPU:-}
if [[ -z "$GPU" ]]; then
  GPU=${CUDA_VISIBLE_DEVICES:-0}
  GPU=${GPU%%,*}
  GPU=${GPU:-0}
fi

CREATED_WORKDIR=""
if [[ -n "${AIC_GPU_CHECK_WORKDIR:-}" ]]; then
  WORKDIR=$AIC_GPU_CHECK_WORKDIR
  mkdir -p "$WORKDIR" || fail "cannot create $WORKDIR"
  WORKDIR=$(cd "$WORKDIR" && pwd)  # the proxy runs in it: paths must not be relative to here
else
  WORKDIR=$(mktemp -d -t gpu-check.XXXXXX) || fail "cannot create a temporary folder"
  CREATED_WORKDIR=$WORKDIR
fi
SUMMARY=$WORKDIR/summary
GROUPS_FILE=$WORKDIR/groups
rm -f "$SUMMARY" "$GROUPS_FILE"
: >"$GROUPS_FILE"
CHILD=""

# On exit, whatever happened: stop the check (it stops the proxy and its vLLM instances), then
# kill every process group it recorded that is still alive, then print the summary line last.
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  trap - EXIT INT TERM HUP
  if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null  # timeout(1) passes it on to the check
    for _ in $(seq 200); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$CHILD" 2>/dev/null  # timeout(1) leads a process group: the check is in it
  fi
  local pgid
  while read -r pgid; do
    [[ -n "$pgid" ]] || continue
    if kill -0 -- "-$pgid" 2>/dev/null; then
      log "process group $pgid is still alive: killing it"
      kill -KILL -- "-$pgid" 2>/dev/null
    fi
  done <"$GROUPS_FILE"
  local line status=1
  if [[ -s "$SUMMARY" ]]; then
    line=$(tail -n 1 "$SUMMARY")
  else
    line="gpu-check: FAIL ${FAILURE:-the check ended without a result} (logs: $WORKDIR)"
  fi
  if [[ "$line" == "gpu-check: PASS"* ]]; then
    status=0
    [[ -n "$CREATED_WORKDIR" ]] && rm -rf "$CREATED_WORKDIR"
  else
    log "models, catalogue and logs kept in $WORKDIR"
  fi
  echo "$line"
  exit "$status"
}
trap cleanup EXIT
trap 'FAILURE="interrupted"; exit 1' INT TERM HUP

MODEL_A=${AIC_GPU_CHECK_MODEL_A:-}
MODEL_B=${AIC_GPU_CHECK_MODEL_B:-}
if [[ -z "$MODEL_A" && -z "$MODEL_B" ]]; then
  MODEL_A=$WORKDIR/models/tiny-a
  MODEL_B=$WORKDIR/models/tiny-b
  log "building the tiny model with $PY ..."
  rm -rf "$MODEL_A" "$MODEL_B"
  timeout "$(left 180)" "$PY" "$REPO_ROOT/tests/realvllm/make_tiny_model.py" "$MODEL_A" ||
    { FAILURE="could not build the tiny model (torch, transformers, tokenizers in $PY?)"; exit 1; }
  cp -r "$MODEL_A" "$MODEL_B" || { FAILURE="could not copy the tiny model"; exit 1; }
  log "models: $MODEL_A, $MODEL_B"
elif [[ -z "$MODEL_A" || -z "$MODEL_B" ]]; then
  FAILURE="set both AIC_GPU_CHECK_MODEL_A and AIC_GPU_CHECK_MODEL_B, or neither"
  exit 1
fi

SWITCH=()
[[ "${AIC_GPU_CHECK_SWITCH:-1}" == 0 ]] && SWITCH=(--no-switch)

# The check itself, in the background so that the traps run at once on a signal. It keeps to
# its own deadline and then stops what it started; timeout(1) ends it if it overruns anyway.
CHECK_SECONDS=$(left "$DEADLINE")
timeout --kill-after=5 "$((CHECK_SECONDS + CLEANUP - 10))" "$PY" "$REPO_ROOT/scripts/gpu_check.py" \
  --workdir "$WORKDIR" --summary "$SUMMARY" --groups "$GROUPS_FILE" --deadline "$CHECK_SECONDS" \
  --gpu "$GPU" --utilization "$UTILIZATION" --vllm-command "$VLLM_COMMAND" --vllm-args "$VLLM_ARGS" \
  --model "$MODEL_A" --model "$MODEL_B" "${SWITCH[@]}" &
CHILD=$!
wait "$CHILD"
rc=$?
CHILD=""
[[ -s "$SUMMARY" ]] || FAILURE="the check exited with status $rc without a result"
exit "$rc"
