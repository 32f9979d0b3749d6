"""Command lines above the core and the nodes: ``python -m commands.train_hgr`` (train an HGR for a
checkpoint or the toy world) and ``python -m commands.safe_finetune`` (the safe LoRA). Each starts a
headless ComfyUI through ``devtools.comfy.start`` and drives ``safecfg`` through the pack's nodes."""
