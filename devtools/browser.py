"""Drive the real ComfyUI front end (the pinned ``comfyui-frontend-package`` served by a real server)
in headless Chromium (the Debian package) through Playwright.

Everything here goes through the front end's own code paths: ``app.loadApiJson`` / ``app.loadGraphData``
load workflows, ``app.graph.serialize()`` writes UI-format JSON, ``app.graphToPrompt()`` converts a
graph to the API prompt and the front end's API client queues it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

EXTENSION = "SafeCFG.HarmBadges"


def chromium_path() -> str:
    for cand in (os.environ.get("SAFECFG_CHROMIUM", ""), shutil.which("chromium") or "",
                 shutil.which("chromium-browser") or "", "/usr/bin/chromium"):
        if cand and Path(cand).is_file():
            return cand
    raise RuntimeError("Chromium not found: run scripts/bootstrap.sh (it installs the Debian 'chromium' package) "
                       "or set SAFECFG_CHROMIUM=/path/to/chromium")


@contextlib.contextmanager
def front_end(url: str, *, width: int = 1600, height: int = 1000) -> Iterator:
    """A page with the ComfyUI front end loaded and this pack's web extension registered."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _preset_settings(url)
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensions && "
                                   f"window.app.extensions.some(e => e.name === '{EXTENSION}')", timeout=120_000)
            # first-run dialogs and banners would sit over the canvas
            page.keyboard.press("Escape")
            page.evaluate("""() => { for (const el of document.querySelectorAll('div,section')) {
                if (el.childElementCount < 6 && (el.textContent || '').startsWith('Introducing Nodes 2.0')) {
                    const b = el.parentElement && el.parentElement.querySelector('button:last-of-type');
                    if (b) b.click(); break; } } }""")
            page.errors = errors
            yield page
        finally:
            browser.close()


def _preset_settings(url: str) -> None:
    """A fresh user: no template browser on first load; the classic canvas nodes (the web extension
    draws on the canvas)."""
    import json
    import urllib.request

    data = json.dumps({"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/settings", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    opener.open(req, timeout=30).read()


def registered_types(page) -> set[str]:
    return set(page.evaluate("() => Object.keys(LiteGraph.registered_node_types)"))


def load_api_and_serialize(page, api: dict, name: str) -> dict:
    """API-format graph -> the front end's own UI-format workflow (nodes laid out by the front end)."""
    return page.evaluate("""async ([api, name]) => {
        await app.loadApiJson(api, name);
        app.graph.arrange(80);
        // example workflows reproduce their images: fixed seeds, not randomised after every run
        for (const n of app.graph._nodes)
            for (const w of n.widgets || []) if (w.name === 'control_after_generate') w.value = 'fixed';
        app.canvas.deselectAll?.();
        app.canvas.fitViewToSelectionAnimated({duration: 1});
        await new Promise(r => setTimeout(r, 300));
        return JSON.parse(JSON.stringify(app.graph.serialize()));  // drop undefined fields
    }""", [api, name])


def load_workflow(page, workflow: dict, name: str) -> list[str]:
    """Load a UI-format workflow; returns the node types the front end does not know (missing)."""
    return page.evaluate("""async ([wf, name]) => {
        const missing = [...new Set(wf.nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t]))];
        await app.loadGraphData(wf, true, true, name);
        return missing;
    }""", [workflow, name])


def substitute_toy_model(page) -> int:
    """Put the bundled toy-world model where the workflow loads a checkpoint; shrink latents to 64 px.
    Returns how many checkpoint loaders were replaced."""
    return page.evaluate("""() => {
        const g = app.graph;
        let n = 0;
        for (const old of [...g._nodes]) {
            if (old.type === 'EmptyLatentImage') {
                for (const w of old.widgets) if (w.name === 'width' || w.name === 'height') w.value = 64;
            }
            if (old.type !== 'CheckpointLoaderSimple') continue;
            const toy = LiteGraph.createNode('HGRDemoModelLoader');
            toy.pos = [...old.pos];
            g.add(toy);
            for (let slot = 0; slot < 3; slot++) {
                for (const id of [...(old.outputs[slot].links || [])]) {
                    const link = g.links instanceof Map ? g.links.get(id) : g.links[id];
                    if (!link) continue;
                    toy.connect(slot, g.getNodeById(link.target_id), link.target_slot);
                }
            }
            g.remove(old);
            n++;
        }
        g.setDirtyCanvas(true, true);
        return n;
    }""")


def fit_view(page) -> None:
    page.evaluate("""async () => { app.canvas.deselectAll?.(); app.canvas.fitViewToSelectionAnimated({duration: 1});
        await new Promise(r => setTimeout(r, 300)); app.canvas.draw(true, true); }""")


def set_widget(page, node_type: str, name: str, value) -> None:
    page.evaluate("""([t, name, value]) => {
        for (const n of app.graph._nodes) if (n.type === t)
            for (const w of n.widgets || []) if (w.name === name) w.value = value;
    }""", [node_type, name, value])


def queue(page) -> str:
    """Convert with the front end's graphToPrompt and queue through its API client; the prompt id."""
    return page.evaluate("""async () => {
        const p = await app.graphToPrompt();
        const api = (window.comfyAPI && window.comfyAPI.api && window.comfyAPI.api.api) || app.api;
        const r = await api.queuePrompt(0, p);
        return r.prompt_id;
    }""")


def node_states(page) -> dict:
    """The web extension's per-node state (scores, flags, badge text, blurred draws) by node type."""
    return page.evaluate("""() => {
        app.canvas.draw(true, true);
        const out = {};
        for (const n of app.graph._nodes) if (n.safecfg)
            out[String(n.id)] = {type: n.type, scores: n.safecfg.scores, flags: n.safecfg.flags,
                                 badge: n.safecfg.badge || null, blurredDraws: n.safecfg.blurredDraws,
                                 imgs: (n.imgs || []).length};
        return out;
    }""")


def wait_for_previews(page, timeout: float = 30.0) -> dict:
    """Wait until every detector/filter node that has scores shows its preview images and a badge."""
    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        fit_view(page)  # only nodes in view are drawn
        states = node_states(page)
        if states and all(s["badge"] and s["imgs"] == len(s["scores"]) for s in states.values()):
            # draw a few frames so that the preview widgets draw (and blur) the images
            for _ in range(3):
                page.evaluate("() => app.canvas.draw(true, true)")
                page.wait_for_timeout(100)
            return node_states(page)
        page.wait_for_timeout(250)
    return states


# what the browser test changes before running a workflow, so that it runs in seconds on a CPU
QUICK = {"HGRTrain": {"data": "toyworld_hgr_mini.json", "fit_steps": 20},
         "HGRSafeFinetune": {"prompts": "toyworld_hgr_mini.json", "steps": 10}}


def run_workflow(page, server, workflow: dict, name: str, *, screenshot: Path | None = None,
                 timeout: float = 300.0) -> dict:
    """Load a UI-format workflow in the front end, substitute the toy model for checkpoints, queue it
    through the front end, wait for success; returns the history entry, the extension's node states,
    the missing node types and how many checkpoint loaders were replaced."""
    missing = load_workflow(page, workflow, name)
    if missing:
        return {"missing": missing}
    replaced = substitute_toy_model(page)
    for node_type, values in QUICK.items():
        for key, value in values.items():
            set_widget(page, node_type, key, value)
    prompt_id = queue(page)
    history = server.wait(prompt_id, timeout=timeout)
    states = wait_for_previews(page) if any(n["type"] in ("HGRHarmDetector", "HGRHarmFilter")
                                            for n in workflow["nodes"]) else {}
    if screenshot is not None:
        fit_view(page)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
    return {"missing": [], "replaced": replaced, "history": history, "states": states, "prompt_id": prompt_id}
