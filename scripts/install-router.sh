#!/usr/bin/env bash
# Install LiteLLM's proxy (PyPI package `litellm[proxy]`) into a venv of its own: the router that
# puts several aic-vllm-proxy daemons (one per node) behind one URL (docs/router.md), and that
# tests/test_router.py starts.
#
# Usage: scripts/install-router.sh [VENV]     (default VENV: <repo>/.venv-router)
#
# Environment:
#   LITELLM_VERSION    litellm release to install (default 1.106.12)
#   PYTHON             interpreter for the venv (default python3.11, else python3)
#   FORCE=1            rebuild the venv even if it looks complete
#   INSTALLER=pip      use pip only (default: uv, installed into the venv, else pip)
#
# Idempotent: a complete venv (stamp file + a quick check of the installed version and of the
# `litellm` command) is left alone in about a second.  Needs no stdin.  Prints the time each step
# took and, at the end, the command on a line
#   LITELLM=/.../bin/litellm
set -euo pipefail

T0=$(date +%s)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$REPO_ROOT/.venv-router}
VERSION=${LITELLM_VERSION:-1.106.12}
# prisma: LiteLLM's proxy imports it to classify the error when it refuses a key; without it a
# request with a wrong or missing key gets 500 instead of 401 (seen with litellm 1.106.12).  Only
# the Python package: no database is used, prisma's engines are never fetched.
PRISMA_SPEC="prisma==0.15.0"
SPEC="litellm[proxy]==$VERSION"
STAMP_NAME=".aic-router-installed"
STAMP_TEXT="$SPEC $PRISMA_SPEC"

LOG_TAG=install-router
# shellcheck source=scripts/install-common.sh
source "$REPO_ROOT/scripts/install-common.sh"

# Quick check of a finished venv: the version as stamped, the command in place.
# Does not import litellm (that takes seconds).
venv_ok() {
  [[ -x "$PY" && -x "$VENV/bin/litellm" && -f "$VENV/$STAMP_NAME" ]] || return 1
  [[ "$(cat "$VENV/$STAMP_NAME")" == "$STAMP_TEXT" ]] || return 1
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$VERSION' or m.version('prisma') != '${PRISMA_SPEC#prisma==}')" 2>/dev/null
}

if [[ "${FORCE:-0}" != 1 ]] && venv_ok; then
  log "$VENV already has litellm $VERSION; nothing to do"
  echo "LITELLM=$VENV/bin/litellm"
  exit 0
fi

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

log "venv: $VENV (python: $($PYTHON -c 'import sys; print(sys.version.split()[0])'))"
if [[ "${FORCE:-0}" == 1 && -d "$VENV" ]]; then
  rm -rf "$VENV"
fi
rm -f "$VENV/$STAMP_NAME"
if [[ ! -x "$PY" ]]; then
  step "create venv" "$PYTHON" -m venv "$VENV"
fi

# The installer: uv when it can be had (it fetches and unpacks wheels in parallel), else pip.
# uv is told to compile bytecode as pip does: this machine sets PYTHONDONTWRITEBYTECODE=1, and
# without .pyc files every start of the router would compile LiteLLM's sources again.
# INSTALLER=pip forces pip.
INSTALLER=${INSTALLER:-auto}
UV=""
if [[ "$INSTALLER" != pip ]]; then
  if [[ -x "$VENV/bin/uv" ]] || pip_ install -q uv; then
    UV="$VENV/bin/uv"
  else
    log "could not install uv; using pip"
  fi
fi
TOOL=${UV:+uv}
TOOL=${TOOL:-pip}
if [[ -n "$UV" ]]; then
  step "$TOOL install $SPEC $PRISMA_SPEC" "$UV" pip install -q --compile-bytecode --python "$PY" "$SPEC" "$PRISMA_SPEC"
else
  step "$TOOL install $SPEC $PRISMA_SPEC" pip_ install -q "$SPEC" "$PRISMA_SPEC"
fi

# Sanity check: the proxy's command starts (it imports LiteLLM's proxy server and its web stack).
# LITELLM_LOCAL_MODEL_COST_MAP: LiteLLM's own price list, not a fetch from GitHub (three
# attempts, seconds, when there is no network).
step "check: litellm --version" env LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/litellm" --version

echo "$STAMP_TEXT" >"$VENV/$STAMP_NAME"
venv_ok || { log "ERROR: post-install check failed"; exit 1; }

log "venv size: $(du -sh "$VENV" | cut -f1)"
log "total time: $(( $(date +%s) - T0 ))s"
echo "LITELLM=$VENV/bin/litellm"
