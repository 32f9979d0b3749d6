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
REPO_ROOT = Path(__file__).resolve().parents[1]
# the newest comfyui-frontend-package on the registry, unpacked by scripts/bootstrap.sh; ComfyUI
# serves it with --front-end-root (the pinned one comes with ComfyUI's requirements)
NEWEST_FRONT_END = REPO_ROOT / ".frontends" / "1.58.1"


def front_end_args(root: Path | None) -> list[str]:
    """The server arguments that serve the front end unpacked at ``root`` (none: the pinned one)."""
    if root is None:
        return []
    static = root / "static"
    if not (static / "index.html").is_file():
        raise RuntimeError(f"no front end at {static}: run scripts/bootstrap.sh (it unpacks "
                           f"comfyui-frontend-package=={root.name} there)")
    return ["--front-end-root", str(static)]


def chromium_path() -> str:
    for cand in (os.environ.get("SAFECFG_CHROMIUM", ""), shutil.which("chromium") or "",
                 shutil.which("chromium-browser") or "", "/usr/bin/chromium"):
        if cand and Path(cand).is_file():
            return cand
    raise RuntimeError("Chromium not found: run scripts/bootstrap.sh (it installs the Debian 'chromium' package) "
                       "or set SAFECFG_CHROMIUM=/path/to/chromium")


@contextlib.contextmanager
def front_end(url: str, *, width: int = 1600, height: int = 1000, vue_nodes: bool = False) -> Iterator:
    """A page with the ComfyUI front end loaded and this pack's web extension registered; ``vue_nodes``
    turns the "Nodes 2.0" (Vue) renderer on, else the classic canvas draws the nodes."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            _preset_settings(url, vue_nodes)
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


def _preset_settings(url: str, vue_nodes: bool) -> None:
    """A fresh user: no template browser on first load; the renderer asked for."""
    import json
    import urllib.request

    data = json.dumps({"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": bool(vue_nodes)}).encode()
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


#: the stock loaders a family workflow's tiny model stands in for, and the tiny node's output for each
#: of their outputs (MODEL 0, CLIP 1, VAE 2)
FAMILY_LOADERS = {"CheckpointLoaderSimple": [0, 1, 2], "UNETLoader": [0], "CLIPLoader": [1], "DualCLIPLoader": [1],
                  "TripleCLIPLoader": [1], "QuadrupleCLIPLoader": [1], "VAELoader": [2]}


def substitute_tiny_family(page, family: str) -> int:
    """Put one tiny model of ``family`` (``SafeCFGTestTinyModel``: MODEL, CLIP, VAE) where the workflow's
    stock loaders are (``FAMILY_LOADERS``); shrink latents to 64 px (9 frames for video). Returns how
    many loaders were replaced."""
    return page.evaluate("""([family, loaders]) => {
        const g = app.graph;
        let tiny = null, n = 0;
        for (const old of [...g._nodes]) {
            if (['EmptyLatentImage', 'EmptySD3LatentImage', 'EmptyHunyuanLatentVideo'].includes(old.type)) {
                for (const w of old.widgets) {
                    if (w.name === 'width' || w.name === 'height') w.value = 64;
                    if (w.name === 'length') w.value = 9;
                }
            }
            const map = loaders[old.type];
            if (!map) continue;
            if (!tiny) {
                tiny = LiteGraph.createNode('SafeCFGTestTinyModel');
                tiny.pos = [...old.pos];
                g.add(tiny);
                for (const w of tiny.widgets) if (w.name === 'family') w.value = family;
            }
            for (let slot = 0; slot < map.length; slot++) {
                for (const id of [...(old.outputs[slot].links || [])]) {
                    const link = g.links instanceof Map ? g.links.get(id) : g.links[id];
                    if (!link) continue;
                    tiny.connect(map[slot], g.getNodeById(link.target_id), link.target_slot);
                }
            }
            g.remove(old);
            n++;
        }
        g.setDirtyCanvas(true, true);
        return n;
    }""", [family, FAMILY_LOADERS])


def fit_view(page) -> None:
    """Every node in view (from the nodes' own positions and sizes: the same in both renderers)."""
    page.evaluate("""async () => {
        app.canvas.deselectAll?.();
        const ns = app.graph._nodes;
        if (!ns.length) return;
        const title = 34;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const c = app.canvas.canvas.getBoundingClientRect();
        const scale = Math.min(1.5, (c.width - 80) / (x1 - x0), (c.height - 120) / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(c.width - (x1 - x0) * scale) / 2 / scale - x0,
                                (c.height - (y1 - y0) * scale) / 2 / scale - y0];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        await new Promise(r => setTimeout(r, 300)); }""")


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


def reports(page) -> dict:
    """The pack's report widget of every detector/filter node, by node id: the summary line, the
    flags and scores it lists, and how many reveal buttons it has."""
    return page.evaluate("""() => {
        const out = {};
        for (const r of document.querySelectorAll('.safecfg-report[data-safecfg-node]')) {
            const rows = [...r.querySelectorAll('.safecfg-row')];
            out[r.dataset.safecfgNode] = {
                summary: (r.querySelector('.safecfg-summary') || {}).textContent || '',
                flags: rows.map(x => x.dataset.flagged === 'true'),
                scores: rows.map(x => x.textContent),
                buttons: r.querySelectorAll('.safecfg-reveal-button').length};
        }
        return out;
    }""")


def wait_for_reports(page, n_nodes: int, timeout: float = 30.0) -> dict:
    """Wait until ``n_nodes`` detector/filter nodes show their report after a run."""
    deadline = time.monotonic() + timeout
    reps = {}
    while time.monotonic() < deadline:
        reps = reports(page)
        if len([r for r in reps.values() if r["flags"]]) >= n_nodes:
            return reps
        page.wait_for_timeout(250)
    return reps


# what the browser test changes before running a workflow, so that it runs in seconds on a CPU
QUICK = {"HGRTrain": {"data": "toyworld_hgr_mini.json", "fit_steps": 20},
         "HGRSafeFinetune": {"prompts": "toyworld_hgr_mini.json", "steps": 10}}


def run_workflow(page, server, workflow: dict, name: str, *, screenshot: Path | None = None,
                 timeout: float = 300.0) -> dict:
    """Load a UI-format workflow in the front end, substitute the toy model for checkpoints (a tiny model
    of the family for a family workflow's loaders: ``extra.safecfg.family``), queue it
    through the front end, wait for success (and for the reports of detector/filter nodes); returns
    the history entry, the missing node types and how many checkpoint loaders were replaced."""
    missing = load_workflow(page, workflow, name)
    if missing:
        return {"missing": missing}
    family = ((workflow.get("extra") or {}).get("safecfg") or {}).get("family")
    replaced = substitute_tiny_family(page, family) if family else substitute_toy_model(page)
    for node_type, values in QUICK.items():
        for key, value in values.items():
            set_widget(page, node_type, key, value)
    prompt_id = queue(page)
    history = server.wait(prompt_id, timeout=timeout)
    n_scoring = sum(n["type"] in ("HGRHarmDetector", "HGRHarmFilter") for n in workflow["nodes"])
    if n_scoring:
        wait_for_reports(page, n_scoring)
    if screenshot is not None:
        fit_view(page)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
    return {"missing": [], "replaced": replaced, "history": history, "prompt_id": prompt_id}


# -- visual filtering, in page pixels ------------------------------------------------------------
# The checks below look at what the page shows, in either renderer: the classic canvas draws a
# node's preview images on the canvas, Nodes 2.0 (Vue) shows them as <img> elements in the node.

# JS: pan the canvas (both renderers follow it) until element ``el`` is inside the viewport
_PAN = """const pan = async (el) => {
    let r = el.getBoundingClientRect();
    if (r.top < 60 || r.bottom > window.innerHeight - 10) {
        app.canvas.ds.offset[1] -= (r.top - 120) / app.canvas.ds.scale;
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        await new Promise(res => setTimeout(res, 500));
        r = el.getBoundingClientRect();
    }
    return {x: r.x, y: r.y, width: r.width, height: r.height};
};"""


def is_vue(page) -> bool:
    return bool(page.evaluate("() => !!document.querySelector('[data-node-id]:not(.safecfg-report)')"))


def show_node(page, node_id: int, scale: float = 1.25) -> None:
    """Put one node at the top left of the view, at ``scale`` (less if it would not fit), and let
    both renderers redraw."""
    page.evaluate("""([id, scale]) => {
        const n = app.graph.getNodeById(id);
        scale = Math.min(scale, (window.innerHeight - 160) / (n.size[1] + 40));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [-n.pos[0] + 90 / scale, -n.pos[1] + 90 / scale];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true); }""", [node_id, scale])
    page.wait_for_timeout(400)


def preview_rect(page, node_id: int, index: int) -> dict | None:
    """Where the page shows preview image ``index`` of a node: its client rectangle (x, y, width,
    height), after selecting that image the way a user does (the Vue renderer's "View image i" dot;
    the classic canvas's selected image)."""
    return page.evaluate("""async ([id, index]) => {
        """ + _PAN + """
        const wait = (ms) => new Promise(r => setTimeout(r, ms));
        const node = app.graph.getNodeById(id);
        const el = document.querySelector(`[data-node-id="${id}"]`);
        if (el) {
            let img = el.querySelector(`img[alt="Gallery thumbnail ${index + 1}"]`);
            if (!img) {
                const dot = el.querySelector(`button[aria-label^="View image ${index + 1} of"]`);
                if (dot) { dot.click(); await wait(400); }
                img = el.querySelector('img[alt^="Node output"]');
            }
            if (!img) return null;
            for (let i = 0; i < 40 && !(img.complete && img.naturalWidth); i++) await wait(100);
            return await pan(img);
        }
        node.imageIndex = index;  // what a click on a thumbnail sets on the classic canvas
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        await wait(300);
        const report = document.querySelector(`.safecfg-report[data-safecfg-node="${id}"]`);
        const area = () => {  // below the node's report, to the node's bottom edge
            const c = app.canvas.canvas.getBoundingClientRect();
            const s = app.canvas.ds.scale, o = app.canvas.ds.offset;
            const left = c.x + (node.pos[0] + o[0]) * s, right = left + node.size[0] * s;
            const bottom = c.y + (node.pos[1] + node.size[1] + o[1]) * s;
            const top = report ? report.getBoundingClientRect().bottom : c.y + (node.pos[1] + o[1]) * s;
            return {x: left, y: top, width: right - left, height: bottom - top};
        };
        let r = area();
        if (r.y < 60 || r.y + r.height > window.innerHeight - 10) {
            app.canvas.ds.offset[1] -= (r.y - 120) / app.canvas.ds.scale;
            app.canvas.setDirty(true, true); app.canvas.draw(true, true);
            await wait(500);
            r = area();
        }
        return r;
    }""", [node_id, index])


def reveal(page, node_id: int, index: int) -> dict | None:
    """Click the reveal button of image ``index`` in the node's report (a real click); the client
    rectangle of the sharp image it shows, once loaded."""
    sel = f'.safecfg-report[data-safecfg-node="{node_id}"] .safecfg-row[data-index="{index}"] .safecfg-reveal-button'
    page.evaluate("async (sel) => { " + _PAN + " await pan(document.querySelector(sel)); }", sel)
    page.locator(sel).click()
    return page.evaluate("""async ([id, index]) => {
        """ + _PAN + """
        const wait = (ms) => new Promise(r => setTimeout(r, ms));
        for (let i = 0; i < 50; i++) {
            const img = document.querySelector(
                `.safecfg-report[data-safecfg-node="${id}"] img.safecfg-reveal[data-index="${index}"]`);
            if (img && img.complete && img.naturalWidth) {
                img.scrollIntoView({block: 'nearest'});  // inside the report, which scrolls
                return await pan(img);
            }
            await wait(100);
        }
        return null;
    }""", [node_id, index])


def shown_image(page, rect: dict, size: tuple[int, int]):
    """The image the page shows inside ``rect``: the screenshot of that region, cropped to where it is
    brighter than the node's dark background (the images themselves are light), resized to ``size``
    (width, height); a float32 array (H, W, 3) in [0, 1]."""
    import io

    import numpy as np
    from PIL import Image

    clip = {k: float(rect[k]) for k in ("x", "y", "width", "height")}
    shot = Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")
    a = np.asarray(shot, dtype=np.float32) / 255.0
    bright = a.mean(axis=2) > 0.3

    def longest_run(mask):  # the longest stretch of True (captions and labels are thin and apart)
        best, start = (0, -1), None
        for i, m in enumerate([*mask.tolist(), False]):
            if m and start is None:
                start = i
            elif not m and start is not None:
                best = max(best, (i - start, start))
                start = None
        return best[1], best[1] + best[0] - 1

    frac = bright.mean(axis=1)
    r0, r1 = longest_run(frac >= 0.5 * frac.max()) if frac.max() > 0 else (-1, -2)
    if r1 < r0:
        raise AssertionError(f"no image shown in {rect}")
    cfrac = bright[r0:r1 + 1].mean(axis=0)
    c0, c1 = longest_run(cfrac >= 0.5)
    if c1 < c0:
        raise AssertionError(f"no image shown in {rect}")
    rows, cols = [r0, r1], [c0, c1]
    crop = shot.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    return np.asarray(crop.resize(size, Image.BOX), dtype=np.float32) / 255.0
