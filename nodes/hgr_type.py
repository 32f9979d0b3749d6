"""The ``HGR`` wire type: a redirector plus what the sampler needs to drive it."""

from __future__ import annotations

from dataclasses import dataclass, field

from comfy_api.latest import io

from ..safecfg.redirect import Redirector

HGRType = io.Custom("HGR")


@dataclass
class HGRHandle:
    """What travels along an ``HGR`` wire. Nodes never mutate a handle they receive.

    ``concept_conds`` holds one ComfyUI conditioning per harmful concept; the sampler evaluates them
    in the same batched model call as positive/negative. ``latent_format``/``latent_channels`` are
    the model family a learned HGR was trained for (empty for the concept redirector, which works
    with any CFG model).
    """

    redirector: Redirector
    name: str
    latent_format: str = ""
    latent_channels: int | None = None
    concept_conds: list = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    #: a text-embedding HGR (the paper's form): the text embedding's width and the family it was
    #: trained for
    text_width: int | None = None
    text_family: str = ""

    def check_model(self, model_patcher, node: str) -> None:
        """Fail early, naming the node, if this HGR cannot drive ``model_patcher``."""
        lf = model_patcher.model.latent_format
        fam, ch = type(lf).__name__, int(getattr(lf, "latent_channels", 4))
        if self.text_width is not None:
            cfg = getattr(getattr(model_patcher.model, "model_config", None), "unet_config", {}) or {}
            width = cfg.get("context_dim")
            if width is not None and int(width) != self.text_width:
                raise ValueError(f"{node}: text HGR '{self.name}' reads {self.text_width}-wide text embeddings "
                                 f"({self.text_family or 'its family'}) but the model's text conditioning is "
                                 f"{width} wide ({fam}). Load an HGR trained for this model family, train one with "
                                 "HGRTrain, or use HGRConceptRedirector, which works with any model.")
            return
        if self.latent_channels is not None and self.latent_channels != ch:
            raise ValueError(f"{node}: HGR '{self.name}' works on {self.latent_channels}-channel latents but the "
                             f"model has {ch}-channel latents ({fam}). Load an HGR trained for this model family, "
                             "train one with HGRTrain, or use HGRConceptRedirector, which works with any model.")
        if self.latent_format and self.latent_format != fam:
            raise ValueError(f"{node}: HGR '{self.name}' was trained for the {self.latent_format} latent family but "
                             f"the model is {fam}. Load an HGR trained for this model family, train one with "
                             "HGRTrain, or use HGRConceptRedirector, which works with any model.")


def handle_for(hgr, name: str) -> HGRHandle:
    """The ``HGR`` wire value for a loaded learned HGR file (latent or text kind)."""
    if getattr(hgr, "kind", "") == "text":  # the paper's form: acts on the text embedding
        return HGRHandle(hgr, name=name, categories=hgr.categories, text_width=hgr.config.embed_dim,
                         text_family=hgr.family)
    return HGRHandle(hgr, name=name, latent_format=hgr.latent_format, latent_channels=hgr.config.latent_channels,
                     categories=hgr.categories)
