"""The pack's one import identity: ``safecfg_pack``.

ComfyUI's loader imports a custom-node folder under a module name made from its path (dots replaced
by ``_x_``), and that is how a user's ComfyUI imports this pack. :func:`devtools.comfy.start` loads
the pack exactly that way; :func:`register` then makes the module objects ComfyUI created reachable
as ``safecfg_pack``, ``safecfg_pack.nodes.*`` and ``safecfg_pack.safecfg.*``, so development code
writes ``from safecfg_pack.safecfg import redirect`` and gets the very modules the nodes use, never a
second copy. Plain ``import safecfg`` is for processes without ComfyUI (the core is plain torch).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

PACK_NAME = "safecfg_pack"
#: the pack's Python packages that ComfyUI reaches through its entrypoint
PACK_PACKAGES = ("nodes", "safecfg")


def alias(public: str, module: ModuleType, packages: tuple[str, ...] = ()) -> None:
    """Register ``module`` as ``public`` in ``sys.modules``, and each module of its ``packages``
    (imported here under the loaded name, recursively) as ``public.<package>.<module>``."""
    existing = sys.modules.get(public)
    if existing is not None and existing is not module:
        raise RuntimeError(f"{public!r} is already another module ({getattr(existing, '__file__', '?')}); "
                           "the pack must be loaded once per process")
    sys.modules[public] = module
    for package in packages:
        pkg = importlib.import_module(f"{module.__name__}.{package}")
        sys.modules[f"{public}.{package}"] = pkg
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            sub = importlib.import_module(info.name)
            sys.modules[public + info.name[len(module.__name__):]] = sub


def register(module: ModuleType) -> ModuleType:
    """Make the pack module ComfyUI loaded (and its ``nodes``/``safecfg`` modules) ``safecfg_pack``."""
    alias(PACK_NAME, module, PACK_PACKAGES)
    return module


def module() -> ModuleType:
    """The pack as loaded by :func:`devtools.comfy.start`."""
    try:
        return sys.modules[PACK_NAME]
    except KeyError:
        raise RuntimeError("the SafeCFG pack is not loaded: call devtools.comfy.start() first") from None
