#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv: torch, torchvision, detectron2
# (from the registry's source release when no detectron2 is importable, see tools/install_detectron2.py)
# and d2_detr itself in editable mode with all its extras (tests: dev; ONNX export: export; panoptic quality
# evaluation: panoptic). Idempotent: a re-run with nothing changed returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.d2_detr_setup
want=$(cat setup.py tools/install_detectron2.py tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] preparing $VENV (first run: about 3 minutes) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip, without the warnings of a configured local package index that lacks a package (its status is kept).
pipq() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# The torch pair the project is tested with (setup.py states the oldest it supports).
pipq install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -c "import torch, torchvision" || { echo "[setup] torch failed to install" >&2; exit 1; }
"$VENV/bin/python" tools/install_detectron2.py
pipq install -q -e ".[dev,export,panoptic]"
"$VENV/bin/python" -c "import d2_detr, detectron2.modeling, detectron2.evaluation, onnx, onnxruntime, panopticapi" \
  || { echo "[setup] the environment does not import; see the messages above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done: $VENV"
