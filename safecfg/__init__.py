"""SafeCFG's method in plain torch: redirectors, the HGR network, HED, HGR files, detection, HGR
training and safe fine-tuning.

Nothing in this package imports ComfyUI, ``nodes/``, ``toyworld/``, ``devtools/`` or ``tests/``
(a test imports every module in a process where ComfyUI cannot be imported); ``nodes/`` adapts it to
ComfyUI, and the command lines (``commands/``) drive it.
"""

from .hgr_file import HGRFileError, load_hgr, save_hgr
from .hgr_net import HGRConfig, HGRNet, LearnedHGR
from .redirect import ConceptRedirector, Redirection, Redirector, blend, hed

__all__ = [
    "ConceptRedirector", "HGRConfig", "HGRFileError", "HGRNet", "LearnedHGR",
    "Redirection", "Redirector", "blend", "hed", "load_hgr", "save_hgr",
]
__version__ = "0.1.0"
