#!/usr/bin/env bash
# `make test-comfy`: ComfyUI's own test suites (tests-unit, tests/execution) with this pack installed
# and without it; the pass/fail/skip counts must be equal. Tests that need the internet are deselected
# by name (DESELECT below). Runs in the bootstrap's ComfyUI tree (.comfyui/), whose custom_nodes/ holds
# the pack's link; the link is removed for the second run and always put back.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
comfy="$(cat "$here/.venv/comfyui-path")"
link="$comfy/custom_nodes/comfyui-safecfg"
export PATH="$here/.venv/bin:$PATH"
python -m pip install --quiet --disable-pip-version-check -r "$comfy/tests-unit/requirements.txt"
DESELECT=(
  # these two fetch a front-end release from GitHub
  "tests-unit/app_test/frontend_manager_test.py::test_init_frontend_invalid_version"
  "tests-unit/app_test/frontend_manager_test.py::test_init_frontend_invalid_provider"
)
args=(-q -p no:cacheprovider -o addopts= tests-unit tests/execution)
for d in "${DESELECT[@]}"; do
  case "$d" in *::*) args+=(--deselect "$d");; *) args+=(--ignore "$d");; esac
done
run() {  # $1 label -> prints the summary line, writes results/comfy-suites-$1.txt
  (cd "$comfy" && timeout 3000 python -m pytest "${args[@]}" > "$here/results/comfy-suites-$1.txt" 2>&1) || true
  tail -1 "$here/results/comfy-suites-$1.txt"
}
mkdir -p "$here/results"
[ -L "$link" ] || ln -sfn "$here" "$link"
with="$(run with-pack)"
rm -f "$link"
trap 'ln -sfn "$here" "$link"' EXIT
without="$(run without-pack)"
ln -sfn "$here" "$link"
echo "with the pack:    $with"
echo "without the pack: $without"
strip() { echo "$1" | sed -E 's/ in [0-9.]+s.*//; s/^=+ //'; }
if [ "$(strip "$with")" != "$(strip "$without")" ]; then
  echo "ComfyUI's suites differ with the pack installed" >&2
  exit 1
fi
echo "same counts with and without the pack"
