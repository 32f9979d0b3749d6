# SafeCFG for ComfyUI. `make test` and `make bench` bootstrap a fresh machine on their own
# (.venv with pinned torch, a real ComfyUI 0.3.75 in .comfyui/). COMFYUI_DIR=/path/to/ComfyUI
# runs everything against another ComfyUI checkout instead.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap test lint pytest bench clean-env

bootstrap:
	bash scripts/bootstrap.sh

lint: bootstrap
	$(PY) -m ruff check .

# pytest exits 5 when it collects nothing: that is a failure here (a test suite must run).
pytest: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test: lint pytest

bench: bootstrap
	$(PY) -m benchmarks.bench_sampling --out results/bench.json

clean-env:
	rm -rf .venv .comfyui
