#!/usr/bin/env bash
# Everything downstream of the toy-world model, in order (each step resumable or cheap to redo):
# both learned toy HGRs, their calibration, the two safe LoRAs, every method's calibration, the
# benchmark and demo. Run after `make toy-train`. About 2 h 30 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m commands.train_hgr --toy --out weights/hgr/toyworld/toyworld_hgr.safetensors --cache .toytrain/hgr_cache_v2 --fit-steps 5000
make toy-train-text-hgr
# the text HGR's strength and both detection thresholds, which the safe fine-tune reads
$PY -m toyworld.calibrate --methods text_hgr
$PY -m toyworld.pool  # the unlabelled fine-tuning pool (and its labels, for the supervised baseline only)
# the unsupervised safe LoRA from the whole pool, driven by the text HGR (its paper-form branch: the
# fine-tune reads the prompt as given) at 1.25, the strength calibrated before the HGR had its rewriter
$PY -m commands.safe_finetune --toy --out weights/loras/toyworld/toyworld_safe_lora.safetensors --steps 1500 --strength 1.25
# the supervised baseline: the same prompts and steps, with the labels
$PY -m commands.safe_finetune --toy --supervised --out weights/loras/toyworld/toyworld_supervised_lora.safetensors --steps 1500
$PY -m toyworld.calibrate  # every method's setting, the same budget for each (LoRAs and HGRs included)
$PY -m toyworld.eval
$PY -m toyworld.demo
