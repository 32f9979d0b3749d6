"""A real ComfyUI in this process, headless: the development layer's one way to find and start it.

Nothing here mocks torch, numpy or ComfyUI: :func:`start` imports the ComfyUI tree that
``scripts/bootstrap.sh`` prepared (or the one named by ``COMFYUI_DIR``), registers the builtin
extra nodes, this pack (as ``safecfg_pack``, :mod:`devtools.pack`) and, for tests, the
development-only ``devtools/tiny_nodes``, exactly as ComfyUI itself loads custom nodes.
:func:`run_prompt` runs an API-format graph through ``execution.PromptExecutor`` without the HTTP
server.

Quirks of ComfyUI 0.3.75 handled here (see also /work/shared/COMFYUI_RUNTIME.md):

* In library mode ComfyUI does not parse ``sys.argv``; ``comfy.cli_args.args.cpu`` is set by hand,
  before ``comfy.model_management`` is imported (it picks the device at import time).
* ``nodes.py`` puts ``<comfy>/comfy`` at the front of ``sys.path``; ``utils.extra_config`` (ComfyUI's
  top-level ``utils`` package) must be imported before ``nodes`` or ``import server`` (done by
  ``comfy_extras/nodes_images.py``) fails with "'utils' is not a package".
* ``nodes.load_custom_node`` never raises: it logs a warning and returns False. The warning text is
  captured here so a failed pack load can be reported clearly.
* ``PromptExecutor`` needs ``cache_args={"lru": 0, "ram": 0}`` (it reads ``cache_args["ram"]``
  after every node) and a server object with ``client_id``, ``last_node_id`` and ``send_sync``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from . import pack

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_NODES_DIR = REPO_ROOT / "devtools" / "tiny_nodes"
#: the tiny nodes' import identity (ComfyUI loads the folder; development code imports it by this name)
TINY_NODES_NAME = "devtools.tiny_nodes"
DEFAULT_COMFY_DIR = REPO_ROOT / ".comfyui"
COMFY_PATH_FILE = REPO_ROOT / ".venv" / "comfyui-path"

log = logging.getLogger("SafeCFG.devtools")

_lock = threading.RLock()
_state: dict[str, Any] = {
    "comfy_dir": None,  # Path once start() succeeded
    "settings": None,  # (cpu, pytorch_attention) of that start
    "nodes_loaded": False,
    "pack_loaded": False,
    "pack_error": None,  # str describing why the pack did not load
    "pack_node_ids": [],
    "tiny_node_ids": [],
    "extra_import_failed": [],
    "work_dir": None,
}


class ComfyRuntimeError(RuntimeError):
    """The ComfyUI runtime could not be set up."""


class PromptExecutionError(RuntimeError):
    """A graph failed validation or execution; the message carries ComfyUI's error text."""

    def __init__(self, message: str, *, node_id: str | None = None, node_type: str | None = None,
                 details: Any = None):
        super().__init__(message)
        self.node_id = node_id
        self.node_type = node_type
        self.details = details


# --------------------------------------------------------------------------------------------
# locating ComfyUI


def find_comfy_dir() -> Path:
    """The ComfyUI tree to use: $COMFYUI_DIR, else .venv/comfyui-path, else <repo>/.comfyui."""
    candidates: list[tuple[str, str]] = []
    env = os.environ.get("COMFYUI_DIR", "").strip()
    if env:
        candidates.append(("COMFYUI_DIR", env))
    elif COMFY_PATH_FILE.is_file():
        recorded = COMFY_PATH_FILE.read_text(encoding="utf-8").strip()
        if recorded:
            candidates.append((str(COMFY_PATH_FILE), recorded))
    candidates.append(("default", str(DEFAULT_COMFY_DIR)))
    problems = []
    for origin, raw in candidates:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = (REPO_ROOT / path)
        path = path.resolve()
        if (path / "nodes.py").is_file() and (path / "comfy").is_dir() and (path / "execution.py").is_file():
            return path
        problems.append(f"{origin}: {path} is not a ComfyUI tree (nodes.py/execution.py/comfy/ missing)")
        if origin == "COMFYUI_DIR":
            break  # an explicit override must not silently fall back
    raise ComfyRuntimeError("no usable ComfyUI found; run scripts/bootstrap.sh or set COMFYUI_DIR.\n  "
                            + "\n  ".join(problems))


def _run_coro(coro):
    """asyncio.run(), also when called from inside a running event loop (runs in a worker thread)."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if not in_loop:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class _CaptureWarnings(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # pragma: no cover - formatting problems must not hide the load result
            self.messages.append(str(record.msg))


@contextlib.contextmanager
def _held_root_logging():
    """Route root-logger records of WARNING and above into a list instead of the handlers."""
    root = logging.getLogger()
    saved = root.handlers[:]
    capture = _CaptureWarnings()
    root.handlers[:] = [capture]
    try:
        yield capture
    finally:
        root.handlers[:] = saved


def _load_node_dir(nodes_mod, path: Path) -> tuple[bool, list[str], str | None, Any]:
    """Load one custom-node directory through ComfyUI's own loader.

    Returns (ok, node ids it registered, error text or None, the module ComfyUI imported or None)."""
    if not (path / "__init__.py").is_file():
        return False, [], f"{path} has no __init__.py", None
    before = {k: v for k, v in nodes_mod.NODE_CLASS_MAPPINGS.items()}
    with _held_root_logging() as handler:
        try:
            ok = bool(_run_coro(nodes_mod.load_custom_node(str(path), module_parent="custom_nodes")))
        except Exception as exc:  # load_custom_node catches everything itself; belt and braces
            ok = False
            handler.messages.append(f"{type(exc).__name__}: {exc}")
    if ok:
        for m in handler.messages:  # warnings a pack logged while loading fine: pass them on
            log.warning("while loading %s: %s", path, m)
    registered = sorted(k for k, v in nodes_mod.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v)
    error = None
    if not ok:
        error = "\n".join(handler.messages) or "load_custom_node returned False (no message logged)"
    elif not registered:
        error = "loaded but registered no node ids"
    return ok and bool(registered), registered, error, sys.modules.get(str(path).replace(".", "_x_"))


# --------------------------------------------------------------------------------------------
# public API


def start(*, cpu: bool | None = None, pytorch_attention: bool = False, nodes: bool = True,
          test_nodes: bool = False) -> Path:
    """Import and initialise ComfyUI in this process (library mode); returns the ComfyUI directory.

    The one way development code starts ComfyUI. ``cpu``: ``True`` forces the CPU, ``None`` picks
    the device automatically (CUDA where there is one, else the CPU). ``pytorch_attention``: ComfyUI's
    ``--use-pytorch-cross-attention`` (on the CPU ComfyUI otherwise uses sub-quadratic attention;
    PyTorch's SDPA is exact and several times faster for the toy world's training). ``nodes``: load
    ComfyUI's nodes, its builtin ``comfy_extras`` (no API nodes, no ``custom_nodes/`` scan) and this
    pack through ComfyUI's own loader, registered as ``safecfg_pack`` (:mod:`devtools.pack`);
    ``test_nodes``: also the development-only ``devtools/tiny_nodes``.

    Idempotent: a second call with the same device and attention adds what the first did not load
    and returns; a different device or attention raises (the device is fixed once per process).
    A failure to load this pack is logged (see ``pack_loaded()``/``pack_error()``); a failure to
    load the tiny nodes raises.
    """
    with _lock:
        if cpu is None:  # ComfyUI itself needs --cpu where there is no CUDA device
            import torch

            cpu = not torch.cuda.is_available()
        settings = (bool(cpu), bool(pytorch_attention))
        if _state["comfy_dir"] is None:
            _init_library(cpu, bool(pytorch_attention))
            _state["settings"] = settings
        elif _state["settings"] != settings:
            raise ComfyRuntimeError(f"ComfyUI was already started with (cpu, pytorch_attention)="
                                    f"{_state['settings']}; cannot restart it with {settings} in this process")
        if (nodes or test_nodes) and not _state["nodes_loaded"]:
            _load_nodes()
        if test_nodes and not _state["tiny_node_ids"]:
            _load_tiny_nodes()
        return _state["comfy_dir"]


def started() -> bool:
    """True once :func:`start` has run in this process."""
    return _state["comfy_dir"] is not None


def settings() -> dict | None:
    """The ``cpu`` and ``pytorch_attention`` this process started ComfyUI with (None before :func:`start`)."""
    if _state["comfy_dir"] is None:
        return None
    cpu, attention = _state["settings"]
    return {"cpu": cpu, "pytorch_attention": attention}


def _require_started() -> None:
    if _state["comfy_dir"] is None or not _state["nodes_loaded"]:
        raise ComfyRuntimeError("ComfyUI is not started with its nodes: call devtools.comfy.start() first")


def _init_library(cpu: bool, pytorch_attention: bool) -> None:
    comfy_dir = find_comfy_dir()
    comfy_str = str(comfy_dir)
    if comfy_str in sys.path:
        sys.path.remove(comfy_str)
    sys.path.insert(0, comfy_str)

    import comfy.options  # noqa: F401  (library mode: argv is not parsed)
    from comfy.cli_args import args

    if "comfy.model_management" in sys.modules:
        mm = sys.modules["comfy.model_management"]
        if cpu and mm.cpu_state != mm.CPUState.CPU:
            raise ComfyRuntimeError("comfy.model_management was imported before devtools.comfy.start() "
                                    "and picked a non-CPU device; call start() first")
    if cpu:
        args.cpu = True
    if pytorch_attention:
        args.use_pytorch_cross_attention = True

    # Keep everything ComfyUI writes (SaveImage, PreviewImage, ...) out of the ComfyUI tree.
    import folder_paths

    work = Path(tempfile.mkdtemp(prefix="safecfg-comfy-"))
    for sub in ("output", "temp", "input", "user"):
        (work / sub).mkdir()
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_user_directory(str(work / "user"))
    _state["work_dir"] = work
    if os.environ.get("SAFECFG_KEEP_WORK_DIR", "") != "1":
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    # Order matters and import sorters (ruff I001 --fix) would reorder plain imports: ComfyUI's
    # top-level `utils` package must be imported before `nodes` (which puts <comfy>/comfy, holding a
    # `utils.py`, first on sys.path); the device is picked when comfy.model_management is imported,
    # after args.cpu was set above.
    with _held_root_logging() as held:
        importlib.import_module("utils.extra_config")
        importlib.import_module("comfy.model_management")
    _relog_startup(held.messages)
    _state["comfy_dir"] = comfy_dir


def _relog_startup(messages: list[str]) -> None:
    """Importing comfy.* and the builtin extras logs a warning/traceback per module that needs
    torchaudio (deliberately not installed): re-log what is not about that, and one summary line."""
    failed = sorted({m.split("IMPORT FAILED:", 1)[1].strip() for m in messages if "IMPORT FAILED:" in m})
    _state["extra_import_failed"] += failed
    for m in messages:
        if "torchaudio" not in m and "IMPORT FAILED" not in m and not m.strip().startswith(
                ("WARNING: some comfy_extras", "This issue might be caused", "Please do a: pip", "Traceback")):
            if m.strip() and not m.startswith("Cannot import"):
                log.warning("ComfyUI start-up: %s", m)
    if failed:
        log.info("builtin comfy_extras that did not import (expected without torchaudio): %s", ", ".join(failed))


def _progress_hook(*_args, **_kwargs) -> None:
    """The harness's progress hook: Cancel (``interrupt_current_processing``) stops a run at its next
    progress update, as in a server."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def _load_nodes() -> None:
    global _HEADLESS
    with _held_root_logging() as held:
        nodes = importlib.import_module("nodes")
        _run_coro(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _relog_startup(held.messages)
    _HEADLESS = _HeadlessServer()
    server_mod = importlib.import_module("server")
    if getattr(server_mod.PromptServer, "instance", None) is None:
        server_mod.PromptServer.instance = _HEADLESS
    import comfy.utils

    if comfy.utils.PROGRESS_BAR_HOOK is None:
        # as ComfyUI's main.py does (hijack_progress): every progress update checks for Cancel. 0.3.75
        # also checks in every layer's weight cast; 0.3.52 checks nowhere else while sampling
        comfy.utils.set_progress_bar_global_hook(_progress_hook)
    for required in ("SamplerCustomAdvanced", "RescaleCFG", "CFGGuider", "KSamplerSelect"):
        if required not in nodes.NODE_CLASS_MAPPINGS:
            raise ComfyRuntimeError(f"builtin node {required} missing after init_extra_nodes "
                                    f"(failed extras: {_state['extra_import_failed']})")

    ok, ids, err, module = _load_node_dir(nodes, REPO_ROOT)
    _state["pack_loaded"] = ok
    _state["pack_node_ids"] = ids
    _state["pack_error"] = err
    if ok:
        pack.register(module)
    else:
        log.warning("SafeCFG pack at %s FAILED to load; code needing its nodes will fail:\n%s", REPO_ROOT, err)
    _state["nodes_loaded"] = True


def _load_tiny_nodes() -> None:
    import nodes

    ok, ids, err, module = _load_node_dir(nodes, TINY_NODES_DIR)
    if not ok or "SafeCFGTestTinyModel" not in ids:
        raise ComfyRuntimeError(f"development node pack {TINY_NODES_DIR} failed to load:\n{err}")
    pack.alias(TINY_NODES_NAME, module)
    sys.modules[TINY_NODES_NAME + ".models"] = sys.modules[module.__name__ + ".models"]
    _state["tiny_node_ids"] = ids


def pack_loaded() -> bool:
    """True when this pack's ``comfy_entrypoint`` loaded and registered at least one node."""
    return bool(_state["pack_loaded"])


def pack_error() -> str | None:
    """Why the pack failed to load (ComfyUI's logged warning/traceback), or None."""
    return _state["pack_error"]


def pack_node_ids() -> list[str]:
    """Node ids this pack registered (empty if it failed to load)."""
    return list(_state["pack_node_ids"])


def work_dir() -> Path:
    """Temporary base dir holding ComfyUI's output/, temp/, input/, user/ for this process."""
    if _state["work_dir"] is None:
        raise ComfyRuntimeError("ComfyUI is not started: call devtools.comfy.start() first")
    return _state["work_dir"]


def get_node(node_id: str):
    """The node class registered under ``node_id`` in ``nodes.NODE_CLASS_MAPPINGS``."""
    _require_started()
    import nodes

    try:
        return nodes.NODE_CLASS_MAPPINGS[node_id]
    except KeyError:
        hint = ""
        if not pack_loaded():
            hint = f" (note: the SafeCFG pack failed to load: {pack_error()})"
        raise KeyError(f"node id {node_id!r} is not registered{hint}") from None


class _HeadlessServer:
    """The part of ``server.PromptServer`` that ``execution.PromptExecutor`` and nodes talk to.

    Also installed as ``server.PromptServer.instance`` (when no real server exists) so packs that
    register routes at import (``PromptServer.instance.routes.get(...)``) or send UI messages
    (``send_sync``/``send_progress_text``) work headless. Messages are recorded in ``messages``.
    """

    def __init__(self):
        from aiohttp import web

        self.routes = web.RouteTableDef()
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.prompt_queue = None
        self.messages: list[tuple[str, Any, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node_id": node_id}, sid))

    def queue_updated(self):
        pass


_HEADLESS: _HeadlessServer | None = None


def _format_validation_error(error, node_errors) -> str:
    lines = []
    if isinstance(error, dict):
        lines.append(f"{error.get('message', '')}: {error.get('details', '')}".strip(": "))
    elif error:
        lines.append(str(error))
    for nid, info in (node_errors or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {nid} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or "prompt validation failed"


def _executor(execution, server):
    """A classic-cache ``PromptExecutor``, whichever constructor this ComfyUI has: 0.3.75 takes
    ``cache_args`` (and reads ``cache_args["ram"]``), older releases (0.3.52) take ``cache_size``."""
    import inspect

    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    if "cache_args" in params:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_size=0)


def run_prompt(prompt: dict, *, prompt_id: str | None = None, extra_data: dict | None = None,
               return_executor: bool = False) -> dict:
    """Validate and execute an API-format graph headless; return the UI outputs.

    The result is ``executor.history_result["outputs"]``: ``{node_id: ui_dict}`` for output nodes
    (e.g. ``{"9": {"images": [{"filename": ..., "subfolder": ..., "type": "output"}]}}``).
    With ``return_executor=True`` returns ``(outputs, executor)`` so tests can inspect
    ``executor.caches`` / ``executor.status_messages``.
    Raises ``PromptExecutionError`` with ComfyUI's message (and node id/type) on failure.
    """
    _require_started()
    import execution

    prompt_id = prompt_id or str(uuid.uuid4())
    valid, error, outputs, node_errors = _run_coro(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise PromptExecutionError("invalid prompt:\n" + _format_validation_error(error, node_errors),
                                   details={"error": error, "node_errors": node_errors})

    server = _HEADLESS
    server.messages.clear()
    executor = _executor(execution, server)
    executor.execute(prompt, prompt_id, extra_data or {}, outputs)

    err_msgs = [d for ev, d in executor.status_messages if ev in ("execution_error", "execution_interrupted")]
    succeeded = any(ev == "execution_success" for ev, _ in executor.status_messages)
    if not executor.success or err_msgs or not succeeded:
        if err_msgs:
            d = err_msgs[0]
            msg = (f"node {d.get('node_id')} ({d.get('node_type')}) failed: "
                   f"{d.get('exception_type', 'interrupted')}: {d.get('exception_message', '')}")
            tb = d.get("traceback")
            if tb:
                msg += "\n" + "".join(tb if isinstance(tb, list) else [str(tb)])
            raise PromptExecutionError(msg, node_id=d.get("node_id"), node_type=d.get("node_type"), details=d)
        raise PromptExecutionError(f"execution did not succeed; messages: {executor.status_messages}")

    result = executor.history_result["outputs"]
    if return_executor:
        return result, executor
    return result
