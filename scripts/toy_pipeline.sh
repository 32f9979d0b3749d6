#!/usr/bin/env bash
# Everything downstream of the toy-world model, in order (each step resumable or cheap to redo):
# the learned toy HGR, the concept/detector calibration, the two safe LoRAs, the benchmark and demo.
# Run after `make toy-train`. About 75 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m commands.train_hgr --toy --out weights/hgr/toyworld_hgr.safetensors --cache .toytrain/hgr_cache_v2 --fit-steps 5000
$PY -m toyworld.calibrate --methods ''  # the detection threshold, which the safe fine-tune reads
$PY -m toyworld.pool  # the unlabelled fine-tuning pool (and its labels, for the supervised baseline only)
$PY -m commands.safe_finetune --toy --out weights/loras/toyworld_safe_lora.safetensors --max-prompts 384 --steps 500
$PY -m commands.safe_finetune --toy --supervised --out weights/loras/toyworld_supervised_lora.safetensors \
    --max-prompts 384 --steps 500
$PY -m toyworld.calibrate  # every method's setting, the same budget for each (LoRAs and HGR included)
$PY -m toyworld.eval
$PY -m toyworld.demo
