"""`make workflows` (``python -m devtools.build_workflows``): write every example workflow of
workflows/catalog.py as the front end's own UI-format JSON (workflows/<name>.json) and render its
preview (workflows/<name>.png).

A real ComfyUI server with this pack and headless Chromium: each API-format graph is loaded with the
front end's ``loadApiJson``, laid out, serialised with ``app.graph.serialize()``, then run as the
browser test runs it (toy model in place of checkpoints) and screenshotted.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import browser, comfy
from .server import comfy_server

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    comfy.start(cpu=True, test_nodes=True)  # the catalog reads the pack's defaults (safecfg_pack)
    from workflows.catalog import FAMILY, WORKFLOWS

    out_dir = REPO / "workflows"
    with comfy_server() as server, browser.front_end(server.url) as page:
        for name, build in WORKFLOWS.items():
            wf = browser.load_api_and_serialize(page, build(), name)
            wf.setdefault("extra", {})["safecfg"] = {"workflow": name, "doc": (build.__doc__ or "").strip()}
            if name in FAMILY:  # the tiny model family the browser test runs it on
                wf["extra"]["safecfg"]["family"] = FAMILY[name]
            path = out_dir / f"{name}.json"
            path.write_text(json.dumps(wf, indent=1) + "\n")
            # the preview shows the workflow as shipped, after a run (toy model where a checkpoint is)
            res = browser.run_workflow(page, server, wf, name, screenshot=out_dir / f"{name}.png")
            if res["missing"]:
                raise SystemExit(f"{name}: missing node types {res['missing']}")
            # reload the workflow as shipped so that a checkpoint workflow's preview shows its loaders
            if res["replaced"]:
                browser.load_workflow(page, wf, name)
                browser.fit_view(page)
                page.screenshot(path=str(out_dir / f"{name}.png"))
            print(f"wrote {path.relative_to(REPO)} and its preview ({len(wf['nodes'])} nodes)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
