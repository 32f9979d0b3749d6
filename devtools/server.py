"""Start a real ComfyUI server (``main.py``) on loopback with this pack installed, for tests.

``comfy_server()`` builds a throw-away ``--base-directory`` whose ``custom_nodes/`` holds symlinks
to this pack (``comfyui-safecfg``) and to the development-only ``devtools/tiny_nodes``
(``safecfg_test_tiny_nodes``), starts ``python <comfy>/main.py --cpu --listen 127.0.0.1 --port P
--base-directory <tmp>``, waits for ``/object_info`` and always stops the process. Only loopback
HTTP, urllib only, proxies bypassed.

Flags beyond the obvious ones, and why:

* ``--database-url sqlite:///:memory:``: 0.3.75's default database lives in ``<comfy>/user/``,
  not under ``--base-directory``; keep the ComfyUI tree untouched and parallel servers apart.
* ``--disable-api-nodes``: no comfy.org API nodes (no network, faster start).
* ``--disable-all-custom-nodes --whitelist-custom-nodes <our links>``: only the packs linked here
  load, even if the ComfyUI tree has an ``extra_model_paths.yaml`` naming other custom_nodes dirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from .comfy import REPO_ROOT, TINY_NODES_DIR, find_comfy_dir

PACK_LINK_NAME = "comfyui-safecfg"
TINY_NODES_LINK_NAME = "safecfg_test_tiny_nodes"

# Loopback only: never let an http_proxy environment variable route these requests elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyServerError(RuntimeError):
    """The server failed to start, rejected a prompt, or a prompt failed; includes the log tail."""


def _python() -> str:
    venv_py = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv_py) if venv_py.is_file() else sys.executable


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Handle on a running server; see ``comfy_server()``."""

    def __init__(self, proc: subprocess.Popen, url: str, base_dir: Path, log_path: Path):
        self.proc = proc
        self.url = url
        self.base_dir = base_dir
        self.log_path = log_path
        self.client_id = str(uuid.uuid4())

    # -- low level ------------------------------------------------------------------------------
    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"<no server log: {exc}>"
        return text[-n_chars:]

    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0):
        body = None
        headers = {}
        if data is not None:
            body = json.dumps(data).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, headers=headers,
                                     method="POST" if body is not None else "GET")
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
        if "json" in ctype:
            return json.loads(raw.decode("utf-8"))
        return raw

    def get(self, path: str, timeout: float = 30.0):
        """GET ``path`` (JSON decoded when the server says so, else bytes)."""
        return self._request(path, timeout=timeout)

    def post(self, path: str, data: dict, timeout: float = 30.0):
        return self._request(path, data=data, timeout=timeout)

    # -- API ------------------------------------------------------------------------------------
    def object_info(self, node_id: str | None = None) -> dict:
        """``/object_info`` (or ``/object_info/<node_id>``)."""
        path = "/object_info" if node_id is None else "/object_info/" + urllib.parse.quote(node_id)
        return self.get(path, timeout=60.0)

    def queue(self, prompt: dict) -> str:
        """POST an API-format graph to ``/prompt``; returns the prompt_id.

        Raises ``ComfyServerError`` with ComfyUI's validation errors (``node_errors``) on HTTP 400."""
        try:
            res = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise ComfyServerError(f"/prompt rejected the graph (HTTP {exc.code}): {detail}") from None
        if not isinstance(res, dict) or "prompt_id" not in res:
            raise ComfyServerError(f"unexpected /prompt answer: {res!r}")
        if res.get("node_errors"):
            raise ComfyServerError(f"/prompt reported node errors: {res['node_errors']}")
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """Poll ``/history/<prompt_id>`` until the prompt finished; return its history entry.

        Raises ``ComfyServerError`` (with the execution error and log tail) if it failed or timed out.
        """
        deadline = time.monotonic() + timeout
        while True:
            hist = self.get("/history/" + urllib.parse.quote(prompt_id))
            entry = hist.get(prompt_id) if isinstance(hist, dict) else None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "success" and status.get("completed", True):
                    return entry
                errors = [m for m in status.get("messages", [])
                          if m and m[0] in ("execution_error", "execution_interrupted")]
                msg = "; ".join(
                    f"node {d.get('node_id')} ({d.get('node_type')}): {d.get('exception_type', ev)}: "
                    f"{d.get('exception_message', '')}" for ev, d in errors) or json.dumps(status)[:2000]
                raise ComfyServerError(f"prompt {prompt_id} failed: {msg}\n--- server log tail ---\n{self.log_tail()}")
            if self.proc.poll() is not None:
                raise ComfyServerError(f"server exited with {self.proc.returncode} while waiting for "
                                       f"{prompt_id}\n--- server log tail ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f}s\n"
                                       f"--- server log tail ---\n{self.log_tail()}")
            time.sleep(0.2)

    def run(self, prompt: dict, timeout: float = 60.0) -> dict:
        """``queue`` then ``wait``; returns the history entry."""
        return self.wait(self.queue(prompt), timeout=timeout)


def _make_base_dir(extra_custom_nodes) -> tuple[Path, list[str]]:
    base = Path(tempfile.mkdtemp(prefix="safecfg-server-"))
    custom = base / "custom_nodes"
    custom.mkdir()
    links = {PACK_LINK_NAME: REPO_ROOT, TINY_NODES_LINK_NAME: TINY_NODES_DIR}
    for extra in extra_custom_nodes or []:
        p = Path(extra).resolve()
        if not p.exists():
            raise ComfyServerError(f"extra custom node path {p} does not exist")
        name = p.name
        if name in links:
            raise ComfyServerError(f"custom node link name {name!r} already used")
        links[name] = p
    for name, target in links.items():
        (custom / name).symlink_to(target, target_is_directory=target.is_dir())
    for sub in ("input", "output", "temp", "user", "models"):
        (base / sub).mkdir()
    return base, list(links)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@contextlib.contextmanager
def comfy_server(extra_custom_nodes: list | tuple = (), *, startup_timeout: float = 60.0,
                 extra_args: list | tuple = (), keep_dir: bool | None = None) -> Iterator[ComfyServer]:
    """Run ``main.py`` on a free loopback port with this pack + tiny test nodes (+ ``extra_custom_nodes``).

    Yields a ``ComfyServer`` (``url``, ``object_info()``, ``queue(prompt)``, ``wait(prompt_id,
    timeout)``, ``run(prompt)``, ``log_tail()``). The process is always terminated; the base
    directory is removed unless ``keep_dir`` (or env ``SAFECFG_KEEP_SERVER_DIR=1``).
    """
    if keep_dir is None:
        keep_dir = os.environ.get("SAFECFG_KEEP_SERVER_DIR", "") == "1"
    comfy_dir = find_comfy_dir()
    base, link_names = _make_base_dir(extra_custom_nodes)
    log_path = base / "server.log"
    proc = None
    try:
        for attempt in range(3):
            port = _free_port()
            cmd = [_python(), "-u", str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(port), "--base-directory", str(base),
                   "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
                   "--disable-auto-launch", "--disable-all-custom-nodes",
                   "--whitelist-custom-nodes", *link_names, *map(str, extra_args)]
            env = dict(os.environ)
            env.pop("COMFYUI_DIR", None)  # the child runs main.py of comfy_dir directly
            env["PYTHONUNBUFFERED"] = "1"
            threads = os.environ.get("SAFECFG_TEST_THREADS", "1")
            if threads != "0":
                env.setdefault("OMP_NUM_THREADS", threads)  # see tests/conftest.py
            env["HF_HUB_OFFLINE"] = "1"
            env["DO_NOT_TRACK"] = "1"
            with open(log_path, "ab") as log_file:
                log_file.write(f"$ {' '.join(cmd)}\n".encode())
                log_file.flush()
                proc = subprocess.Popen(cmd, cwd=str(comfy_dir), stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
            server = ComfyServer(proc, f"http://127.0.0.1:{port}", base, log_path)
            deadline = time.monotonic() + startup_timeout
            ready = False
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                try:
                    info = server.get("/object_info", timeout=10.0)
                    if isinstance(info, dict) and info:
                        ready = True
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                    pass
                time.sleep(0.25)
            if ready:
                break
            exited_early = proc.poll() is not None
            tail = server.log_tail()
            _stop(proc)
            if proc.returncode is not None and "address already in use" in tail.lower() and attempt < 2:
                continue  # lost the port race; try another one
            if exited_early:
                why = f"exited with code {proc.returncode} before answering /object_info"
            else:
                why = f"did not answer /object_info within {startup_timeout:.0f}s (stopped)"
            raise ComfyServerError(f"ComfyUI server {why}\n--- server log tail ---\n{tail}")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        if not keep_dir:
            shutil.rmtree(base, ignore_errors=True)
