"""The development layer: the one place that finds and starts a headless ComfyUI and loads this pack.

Tests, the toy world's commands (demo, eval, calibration, training), benchmarks, workflow building
and the command lines all start ComfyUI through :func:`devtools.comfy.start`, and reach the pack's
code under one module name, ``safecfg_pack`` (:mod:`devtools.pack`). ComfyUI never loads this
folder as part of the pack: the pack's entrypoint imports ``nodes/`` only.

Modules:

* ``comfy``: find the ComfyUI tree, start it in library mode (``cpu=True`` or the automatic device),
  load the builtin nodes, this pack and optional node folders through ComfyUI's own loader, and run
  API-format graphs headless through ``execution.PromptExecutor``.
* ``pack``: the pack's single import identity (``safecfg_pack``).
* ``tiny_nodes``: a development-only node pack of tiny, seeded, real ComfyUI models (``models``).
* ``server``, ``browser``: a real ComfyUI server on loopback and its front end in headless Chromium.
"""
