# SafeCFG for ComfyUI. `make test` and `make bench` bootstrap a fresh machine on their own
# (.venv with pinned torch, a real ComfyUI 0.3.75 in .comfyui/). COMFYUI_DIR=/path/to/ComfyUI
# runs everything against another ComfyUI checkout instead.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap test lint pytest bench bench-families bench-train demo eval eval-samplers calibrate attack workflows toy-train toy-train-vae \
	toy-train-oracle toy-train-unet toy-train-text-hgr toy-train-text-hgr-adversarial clean-env test-comfy test-matrix

bootstrap:
	bash scripts/bootstrap.sh

lint: bootstrap
	$(PY) -m ruff check .

# pytest exits 5 when it collects nothing: that is a failure here (a test suite must run).
pytest: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test: lint pytest

# ComfyUI's own test suites with and without this pack: the same counts (scripts/test_comfy.sh)
test-comfy: bootstrap
	bash scripts/test_comfy.sh

# the whole suite on the oldest declared ComfyUI (0.3.52) and on 0.3.75 -> results/test_matrix.json (~20 min)
test-matrix: bootstrap
	bash scripts/test_matrix.sh

bench: bootstrap
	$(PY) -m benchmarks.bench_sampling --out results/bench.json

# the same on a full-size flow-matching transformer (SD3.5 Medium, random weights) -> results/bench_families.json
bench-families: bootstrap
	$(PY) -m benchmarks.bench_families --out results/bench_families.json

# What training an HGR for SD1.5 at 512x512 costs, from counted FLOPs -> results/train_estimate.json
bench-train: bootstrap
	$(PY) -m benchmarks.estimate_training

# UI-format workflows/*.json and their preview PNGs, through the real front end (headless Chromium)
workflows: bootstrap
	$(PY) -m devtools.build_workflows

# The bundled toy-world model (weights/toyworld/), reproducible from seeds; every stage resumes
# from .toytrain/ when interrupted. Measured on this 2-core CPU: VAE ~20 min, oracle ~45 min, UNet ~105 min.
toy-train: toy-train-vae toy-train-oracle toy-train-unet

toy-train-vae: bootstrap
	$(PY) -m toyworld.train_vae

# the strict judge: 5000 steps, then resumed to 8000 (the learning rate decays again from step 5000; ~45 min)
toy-train-oracle: bootstrap
	$(PY) -m toyworld.train_oracle --fresh --steps 5000
	$(PY) -m toyworld.train_oracle --steps 8000

# the bundled UNet: 3500 steps, then resumed with a longer cosine schedule to 6497 steps, then fine-tuned
# 1600 steps with half of the captions in the held-out templates (toyworld/grammar.py), which the
# generator must draw and SafeCFG never trains on (~30 min)
toy-train-unet: bootstrap
	$(PY) -m toyworld.train_unet --steps 3500
	$(PY) -m toyworld.train_unet --steps 6497
	$(PY) -m toyworld.train_unet --init --held-out-p 0.5 --steps 1600 --lr 4e-4

# The paper's text HGR for the toy model (weights/hgr/toyworld/toyworld_text_hgr.safetensors): teacher data with
# composed scenes (training templates only), 1000 fit steps and one on-policy round (600 steps), then a
# second on-policy round sampled with that HGR (800 steps), then its rewriter of the prompt's own
# embedding (1200 steps on the same pairs' embeddings); ~45 min on this CPU
toy-train-text-hgr: bootstrap
	$(PY) -m toyworld.hgr_data --composed
	$(PY) -m commands.train_hgr --toy --kind text --data data/toyworld_hgr_composed.json \
		--out .toytrain/toyworld_text_hgr_r1.safetensors --cache .toytrain/text_hgr_cache \
		--fit-steps 1000 --on-policy-rounds 1 --round-fit-steps 600
	$(PY) -m commands.train_hgr --toy --kind text --data data/toyworld_hgr_composed.json \
		--out .toytrain/toyworld_text_hgr_r2.safetensors --cache .toytrain/text_hgr_cache \
		--init .toytrain/toyworld_text_hgr_r1.safetensors --on-policy-rounds 1 --round-fit-steps 800
	$(PY) -m commands.train_hgr --toy --kind text --data data/toyworld_hgr_composed.json \
		--out weights/hgr/toyworld/toyworld_text_hgr.safetensors --init .toytrain/toyworld_text_hgr_r2.safetensors \
		--rewrite-steps 1200

# An experiment, not bundled (README, "Adversarial robustness"): AdvUnlearn-style training of the
# bundled text HGR. The adaptive attack of `make attack` against it on harmful *training* prompts
# (data/toyworld_hgr_adversarial.json: the found prefixes before harmful prompts with their safe
# targets, and before clean ones, beside a subsample of the composed data), then one on-policy round
# (600 steps) and the rewriter refitted on that data (~28 min on this CPU), then the attacks against
# the result at the strength calibration chose for it (2.0)
toy-train-text-hgr-adversarial: bootstrap
	$(PY) -m toyworld.adversarial_data --hgr weights/hgr/toyworld/toyworld_text_hgr.safetensors
	$(PY) -m commands.train_hgr --toy --kind text --data data/toyworld_hgr_adversarial.json \
		--out .toytrain/toyworld_text_hgr_adv.safetensors --cache .toytrain/text_hgr_adv_cache \
		--init weights/hgr/toyworld/toyworld_text_hgr.safetensors --on-policy-rounds 1 --round-fit-steps 600 \
		--rewrite-steps 1200
	$(PY) -m toyworld.attack --text-hgr .toytrain/toyworld_text_hgr_adv.safetensors --methods "plain,text_hgr[2.0]" \
		--out .toytrain/attack_text_hgr_adv.json

# The demo workflow, headless through ComfyUI's executor, with the bundled model -> results/demo_grid.png
demo: bootstrap
	$(PY) -m toyworld.demo

# The toy-world benchmark of every method -> results/eval.json, results/eval_tradeoff.png
eval: bootstrap
	$(PY) -m toyworld.eval

# The harmful splits under dpmpp_2m/karras, euler_ancestral and uni_pc against Euler, for the concept
# redirector and both learned HGRs -> results/eval_samplers.json (~25 min; each sampler's run is kept)
eval-samplers: bootstrap
	$(PY) -m toyworld.eval.samplers

# Red-team attacks against every method (Ring-A-Bell, adaptive prefix, soft-prompt bound, text-free)
# -> results/attack.json, attack_samples.png; ~30 min on this CPU
attack: bootstrap
	$(PY) -m toyworld.attack

# Concept-redirector settings and detection threshold on a calibration split (no held-out names)
calibrate: bootstrap
	$(PY) -m toyworld.calibrate

clean-env:
	rm -rf .venv .comfyui
