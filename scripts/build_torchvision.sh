#!/usr/bin/env bash
# Make `import torchvision` (and so timm and transformers' vision code) work with
# the torch already installed in the venv.
#
#   bash scripts/build_torchvision.sh               # venv: $VLFORGE_VENV, default .venv
#   bash scripts/build_torchvision.sh --wheel-only  # build the CPU wheel into the cache, install nothing
#                                                   # (scripts/install.sh runs this while uv fetches the rest)
#
# Idempotent: does nothing when a working torchvision is importable.
#
# * CUDA/ROCm torch: the regular torchvision wheel from the index, held to the
#   installed torch by constraints.txt.
# * CPU torch: PyPI carries only CUDA builds of torchvision; their _C.so links
#   libtorch_cuda, fails to load, and the import dies with "operator
#   torchvision::nms does not exist" (which also breaks transformers). So we
#   build torchvision from source against the installed torch
#   (--no-build-isolation). vlforge uses only torchvision's Python code (timm
#   imports FrozenBatchNorm2d and transforms; images are decoded with PIL), so by
#   default the wheel has no compiled code: no C++ ops (torchvision.ops.nms,
#   roi_align, ...: "Couldn't load custom C++ ops" if called) and no image codecs
#   (torchvision.io), and the build takes seconds. VLFORGE_TORCHVISION_OPS=1
#   compiles the CPU ops (about 3 minutes on 2 cores); VLFORGE_TORCHVISION_IO=1
#   compiles the ops and torchvision.io's image codecs (about 6 minutes). PyPI
#   has no torchvision sdist; the source is the upstream release tarball that
#   Debian ships as pytorch-vision's .orig.tar.gz, fetched with apt's downloader
#   and checked against the sha256 in Debian's signed Sources index. The release matching torch 2.x is 0.(x+15); if Debian
#   does not serve that one, the newest older release is built (torchvision's C++
#   ops only use long-stable torch APIs). The built wheel is kept in
#   $VLFORGE_CACHE/wheels (default ~/.cache/vlforge/wheels): later installs take
#   seconds.
#
# Overrides: VLFORGE_TORCHVISION_SRC=/path/to/vision-checkout-or-tarball builds
# that source instead of fetching one (e.g. a checkout of the matching tag).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_ONLY=0
[ "${1:-}" = --wheel-only ] && WHEEL_ONLY=1
VENV=${VLFORGE_VENV:-.venv}
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"
WHEELS=${VLFORGE_CACHE:-$HOME/.cache/vlforge}/wheels

IO=${VLFORGE_TORCHVISION_IO:-0}
OPS=${VLFORGE_TORCHVISION_OPS:-0}
[ "$IO" = 1 ] && OPS=1  # the image codecs are built only with the ops
QUIET=(-W "ignore:Failed to load image Python extension")  # no image.so unless VLFORGE_TORCHVISION_IO=1
works() {
  "$PY" "${QUIET[@]}" - "$OPS" "$IO" <<'EOF' >/dev/null 2>&1
import os, sys, torch, torchvision
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import functional
if sys.argv[1] == "1":
    from torchvision.ops import nms
    assert nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.ones(1), 0.5).tolist() == [0]
assert sys.argv[2] != "1" or os.path.exists(os.path.join(os.path.dirname(torchvision.__file__), "image.so"))
EOF
}
report() { echo "torchvision $("$PY" "${QUIET[@]}" -c 'import torchvision; print(torchvision.__version__)') works with torch $TORCH"; }

read -r TORCH ACCEL PYTAG < <("$PY" -c '
import sys, torch
gpu = torch.version.cuda or torch.version.hip
print(torch.__version__.split("+")[0], "gpu" if gpu else "cpu", f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)

if works; then report; exit 0; fi

if [ "$ACCEL" = gpu ]; then
  [ "$WHEEL_ONLY" = 1 ] && exit 0  # nothing to build: the index's wheel is installed by a plain run
  $PIP install -q -c constraints.txt torchvision
  works || { echo "torchvision from the index does not import with torch $TORCH" >&2; exit 1; }
  report; exit 0
fi

# Each kind of build is cached as its own wheel: a Python-only one (pure: none-any), ops, ops + codecs.
case "$OPS$IO" in
  00) LOCAL="cpu.py.torch$TORCH" WHAT="Python code only" ;;
  10) LOCAL="cpu.torch$TORCH" WHAT="CPU ops, about 3 minutes on 2 cores" ;;
  *) LOCAL="cpu.io.torch$TORCH" WHAT="CPU ops and image codecs, about 6 minutes on 2 cores" ;;
esac
cached() { ls "$WHEELS"/torchvision-*+"$LOCAL"-{"$PYTAG"-*,py*-none-any}.whl 2>/dev/null | sort -V | tail -1; }

if [ -z "$(cached)" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
  if [ -n "${VLFORGE_TORCHVISION_SRC:-}" ]; then
    SRC=$VLFORGE_TORCHVISION_SRC
  else
    command -v apt-get >/dev/null || {
      echo "no apt-get here: set VLFORGE_TORCHVISION_SRC to a torchvision source tree, or install a CPU torchvision by hand" >&2
      exit 1
    }
    APT="$WORK/apt"
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/parts"
    for suite in trixie sid experimental; do
      echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main"
    done >"$APT/sources.list"
    APTOPT=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/parts"
            -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o APT::Sandbox::User=root)
    echo "fetching Debian's source index for pytorch-vision"
    apt-get "${APTOPT[@]}" -qq update
    WANT="0.$(( $(echo "$TORCH" | cut -d. -f2) + 15 ))"
    mapfile -t VERSIONS < <(apt-cache "${APTOPT[@]}" showsrc pytorch-vision | sed -n 's/^Version: //p' | sort -u -r -V)
    ORDERED=()
    for v in "${VERSIONS[@]}"; do
      if [[ $v == "$WANT".* ]]; then ORDERED+=("$v"); fi
    done
    for v in "${VERSIONS[@]}"; do
      up=${v%%-*}
      if [[ $up != "$WANT".* ]] && [ "$(printf '%s\n%s\n' "$up" "$WANT.999" | sort -V | head -1)" = "$up" ]; then ORDERED+=("$v"); fi
    done
    TARBALL=
    for v in "${ORDERED[@]}"; do
      read -r URI FILE _ SUM < <(apt-get "${APTOPT[@]}" source --print-uris "pytorch-vision=$v" 2>/dev/null | tr -d "'" | grep '\.orig\.tar') || continue
      if /usr/lib/apt/apt-helper download-file "$URI" "$WORK/$FILE" "$SUM" >/dev/null 2>&1; then
        TARBALL="$WORK/$FILE"; echo "using torchvision ${v%%-*} source ($FILE, $SUM)"; break
      fi
      echo "Debian does not serve $FILE here; trying an older release"
    done
    [ -n "$TARBALL" ] || { echo "no torchvision <= $WANT source could be fetched from Debian" >&2; exit 1; }
    SRC=$TARBALL
  fi
  if [ -f "$SRC" ]; then
    mkdir "$WORK/src" && tar -xf "$SRC" -C "$WORK/src" --strip-components=1 && SRC="$WORK/src"
  else
    cp -r "$SRC" "$WORK/src" && SRC="$WORK/src"
  fi
  TV=$(head -1 "$SRC/version.txt" | sed 's/[a-z].*//')
  # setuptools >= 81 no longer ships pkg_resources, which older setup.py files import. The
  # extensions not asked for (see the top) are taken out of setup.py's list. Without the ops,
  # _meta_registrations' one unconditional fake-kernel registration (for torchvision::nms, an op
  # only _C.so defines) is made conditional like the others, so `import torchvision` works.
  "$PY" - "$SRC" "$OPS" "$IO" <<'EOF'
import os, sys
src, with_ops, with_io = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
def patch(rel, old, new, hint=""):
    p = os.path.join(src, rel)
    s = open(p).read()
    if s.count(old) != 1:
        sys.exit(f"build_torchvision.sh: {rel} of this torchvision release does not hold {old!r} once{hint}")
    open(p, "w").write(s.replace(old, new))
FULL = "; VLFORGE_TORCHVISION_IO=1 builds everything without this patch"
if "from pkg_resources import" in open(os.path.join(src, "setup.py")).read():
    patch(
        "setup.py",
        "from pkg_resources import DistributionNotFound, get_distribution, parse_version",
        "from importlib.metadata import PackageNotFoundError as DistributionNotFound, distribution as get_distribution\n"
        "from packaging.version import parse as parse_version",
    )
if not with_io:
    patch("setup.py", "make_image_extension(),", "", FULL)
if not with_ops:
    patch("setup.py", "make_C_extension(),", "", FULL)
    patch(
        "torchvision/_meta_registrations.py",
        '@torch.library.register_fake("torchvision::nms")',
        '@(torch.library.register_fake("torchvision::nms") if torchvision.extension._has_ops() else (lambda fn: fn))',
        FULL,
    )
EOF
  $PIP install -q -c constraints.txt setuptools wheel packaging ninja
  mkdir -p "$WHEELS"
  echo "building torchvision $TV for CPU against torch $TORCH ($WHAT)"
  START=$(date +%s)
  env PATH="$(cd "$VENV/bin" && pwd):$PATH" FORCE_CUDA=0 TORCHVISION_USE_NVJPEG=0 TORCHVISION_USE_VIDEO_CODEC=0 TORCHVISION_USE_FFMPEG=0 \
    BUILD_VERSION="$TV+$LOCAL" MAX_JOBS="$(nproc)" \
    $PIP wheel -q --no-build-isolation --no-deps -w "$WHEELS" "$SRC" >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log" >&2; exit 1; }
  echo "built $(basename "$(cached)") in $(( $(date +%s) - START )) s"
fi
[ "$WHEEL_ONLY" = 1 ] && exit 0

$PIP install -q -c constraints.txt "$(cached)"
works || { echo "the built torchvision does not import" >&2; exit 1; }
report
