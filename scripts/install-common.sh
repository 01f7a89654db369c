# shellcheck shell=bash
# Shared by scripts/install-vllm-cpu.sh and scripts/install-router.sh (sourced, not run):
# quiet pip, timed steps, and pip without this machine's pip.conf warning.
# The sourcing script sets T0 (its start, in seconds), LOG_TAG (its name in log lines) and
# VENV (the venv it installs into) first.

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export PIP_PROGRESS_BAR=off

log() { printf '[%s +%ss] %s\n' "$LOG_TAG" "$(( $(date +%s) - T0 ))" "$*"; }

step() {  # step NAME CMD... : run CMD, print how long it took
  local name=$1 t
  shift
  t=$(date +%s)
  log "$name ..."
  "$@"
  log "$name done in $(( $(date +%s) - t ))s"
}

PY="$VENV/bin/python"

# pip, minus the one warning per package that this machine's pip.conf causes
# ("Location 'file:///opt/...' is ignored: it is neither a file nor a directory").
pip_() {
  "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
