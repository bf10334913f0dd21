#!/usr/bin/env bash
# Set up vlm from a fresh clone: a virtualenv in .venv with the CPU build of torch, vlm-core and
# every first-party plugin (editable), then run the main job: the bundled demo model.
# Nothing is downloaded except packages from PyPI. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

step() { printf '\n==> %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# torch first, pinned: a bare `torch` requirement on a machine without torch pulls a multi-GB CUDA build
step "installing torch==$TORCH_VERSION (CPU)"
"${PIP[@]}" install -q "torch==$TORCH_VERSION"

step "installing vlm-core and first-party plugins"
plugins=()
for dir in plugins/*/; do
  [ -f "$dir/pyproject.toml" ] && plugins+=(-e "$dir")
done
"${PIP[@]}" install -q -c constraints.txt "torch==$TORCH_VERSION" -e ".[test,dev]" "${plugins[@]}"
# vlm-core again, as a "strict" editable install: core/ and kernels/ become `vlm` and `vlm.kernels`
# through a tree of links (build/__editable__.*) on sys.path, which mypy and IDEs resolve; the
# default mode serves that mapping through an import hook they cannot see. A module added under
# core/ or kernels/ needs this script (or this line) run again.
"${PIP[@]}" install -q --no-deps -e . --config-settings editable_mode=strict

step "vlmrun plugins"
"$VENV/bin/vlmrun" plugins

step "main job: vlmrun demo (the bundled InternVL model answers questions about bundled pictures)"
"$VENV/bin/vlmrun" demo
step "done. Tests: $VENV/bin/python -m pytest -q"
