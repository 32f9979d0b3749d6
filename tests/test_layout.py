"""The layout's rules: the core never imports ComfyUI, the pack has one import identity, and only the
development layer edits the import path or loads files by path."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nodes
import pytest

from devtools import comfy as runtime
from devtools import pack

REPO = Path(__file__).resolve().parents[1]
# names a process with the core alone must never import (ComfyUI's top-level modules, and every
# layer above the core); `nodes` is both ComfyUI's module and the pack's adapter folder
FORBIDDEN = ["comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "comfyui_version",
             "folder_paths", "node_helpers", "nodes", "execution", "server", "latent_preview", "toyworld",
             "devtools", "commands", "tests", "benchmarks", "workflows", pack.PACK_NAME]

CORE_ONLY = textwrap.dedent('''
    import importlib, importlib.abc, json, pkgutil, sys
    FORBIDDEN = set(json.loads(sys.argv[1]))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{name} is not importable in this process")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import comfy  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    import safecfg
    mods = ["safecfg"] + [m.name for m in pkgutil.walk_packages(safecfg.__path__, "safecfg.")]
    for m in mods:
        importlib.import_module(m)
    leaked = sorted(n for n in sys.modules if n.split(".")[0] in FORBIDDEN)
    print("RESULT " + json.dumps({"blocked": blocked, "modules": mods, "leaked": leaked}))
''')


def _py_files():
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                yield Path(root, f)


def test_every_core_module_imports_where_comfyui_cannot_be_imported():
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY, json.dumps(FORBIDDEN)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["blocked"], "the subprocess could still import ComfyUI: the check would prove nothing"
    expected = {"safecfg." + p.stem for p in (REPO / "safecfg").glob("*.py") if p.stem != "__init__"}
    assert expected <= set(res["modules"]), expected - set(res["modules"])
    assert res["leaked"] == [], f"the core imported {res['leaked']}"


def test_core_imports_only_torch_numpy_safetensors_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy", "safetensors", "__future__"}
    bad = []
    for path in sorted((REPO / "safecfg").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] not in allowed]
    assert bad == []


def test_import_path_edits_and_loads_by_file_path_only_in_the_development_layer():
    # the needles are split so that this file does not match them itself
    needles = ["sys." + "path", "spec_from_file" + "_location", "SourceFile" + "Loader"]
    allowed = {REPO / "tests" / "conftest.py"}
    found = []
    for path in _py_files():
        if path.is_relative_to(REPO / "devtools") or path in allowed:
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    assert found == []


def test_the_pack_has_one_import_identity():
    assert runtime.pack_loaded(), runtime.pack_error()
    top = pack.module()
    loaded_name = top.__name__  # the name ComfyUI's loader gave it (made from the folder's path)
    assert loaded_name != pack.PACK_NAME and sys.modules[loaded_name] is top
    aliased = [n for n in sys.modules if n.startswith(pack.PACK_NAME + ".")]
    assert f"{pack.PACK_NAME}.safecfg.redirect" in aliased and f"{pack.PACK_NAME}.nodes.sampling" in aliased
    for name in aliased:
        assert sys.modules[name] is sys.modules[loaded_name + name[len(pack.PACK_NAME):]], name
    # the node classes ComfyUI registered are the ones development code imports
    from safecfg_pack.nodes import guidance_nodes, hgr_nodes

    assert nodes.NODE_CLASS_MAPPINGS["HGRSafeCFGGuider"] is guidance_nodes.HGRSafeCFGGuider
    assert nodes.NODE_CLASS_MAPPINGS["HGRConceptRedirector"] is hgr_nodes.HGRConceptRedirector
    # and no second copy of the core was imported under its plain name in this process
    plain = sorted(n for n in sys.modules if n == "safecfg" or n.startswith("safecfg."))
    assert plain == []


@pytest.mark.slow
def test_development_entry_points_use_the_one_identity():
    """Starting ComfyUI and importing every command, benchmark and tool loads the core once, as
    ``safecfg_pack``, never as plain ``safecfg``."""
    code = textwrap.dedent('''
        import importlib, json, sys
        from devtools import comfy
        comfy.start(cpu=True)
        for m in ["commands.train_hgr", "commands.safe_finetune", "toyworld.eval.run", "toyworld.calibrate",
                  "toyworld.demo", "benchmarks.bench_sampling", "benchmarks.estimate_training",
                  "workflows.catalog", "devtools.build_workflows"]:
            importlib.import_module(m)
        from toyworld.eval.baselines import Methods  # noqa: F401
        plain = sorted(n for n in sys.modules if n == "safecfg" or n.startswith("safecfg."))
        print("RESULT " + json.dumps({"plain": plain, "pack": "safecfg_pack.safecfg.redirect" in sys.modules}))
    ''')
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    assert res["pack"] and res["plain"] == []


def test_start_refuses_another_device_in_the_same_process():
    with pytest.raises(runtime.ComfyRuntimeError, match="already started"):
        runtime.start(cpu=True, pytorch_attention=True)
