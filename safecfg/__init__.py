"""SafeCFG's method in plain torch: redirectors, the HGR network, HED and HGR files.

Nothing in this package imports ComfyUI; ``nodes/`` adapts it to ComfyUI.
"""

from .hgr_file import HGRFileError, load_hgr, save_hgr
from .hgr_net import HGRConfig, HGRNet, LearnedHGR
from .redirect import ConceptRedirector, IdentityRedirector, Redirection, Redirector, blend, hed

__all__ = [
    "ConceptRedirector", "HGRConfig", "HGRFileError", "HGRNet", "IdentityRedirector", "LearnedHGR",
    "Redirection", "Redirector", "blend", "hed", "load_hgr", "save_hgr",
]
__version__ = "0.1.0"
