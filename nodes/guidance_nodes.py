"""Nodes that put an HGR into sampling: the SafeCFG guider and the KSampler model patch."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from .hgr_type import HGRHandle, HGRType
from .sampling import SafeCFGGuider, is_text, patch_model, text_negative, text_positive

CATEGORY = "SafeCFG"

STRENGTH_TIP = ("How far harmful guidance is redirected: 0 = plain CFG (bit-identical), 1 = as trained (a text HGR: "
                "its correction Delta(c) at full scale, and its rewriter in full if it has one; a latent HGR or "
                "concept redirector: fully redirected). Above 1 extrapolates: a text HGR's correction is scaled "
                "further (its rewriter stays at full), the others move past the redirected direction (the toy "
                "world's calibrated strengths: text HGR 1.0, latent HGR 1.25). Clean prompts are nearly "
                "unchanged, not untouched (the toy-world benchmark in the README measures by how much).")
START_TIP = ("Fraction of the schedule at which SafeCFG starts acting (0 = first step). Neutral 0.0. Harmful "
             "content is decided early, so keep it at 0.0-0.1.")
END_TIP = ("Fraction of the schedule at which SafeCFG stops acting (1 = last step). Neutral 1.0. 0.5-1.0 is "
           "typical; a window that contains no step gives plain CFG.")
HGR_TIP = "The redirector: a learned HGR (HGRLoader) or a concept redirector (HGRConceptRedirector)."


def window_inputs() -> list:
    return [
        io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01, tooltip=STRENGTH_TIP),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=START_TIP),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=END_TIP),
    ]


class HGRSafeCFGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRSafeCFGGuider",
            display_name="SafeCFG Guider",
            category=CATEGORY,
            description=("Classifier-free guidance with harmful directions redirected by an HGR, for "
                         "SamplerCustomAdvanced. Clean prompts give the same image as CFGGuider."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to sample."),
                io.Conditioning.Input("positive", tooltip="The prompt conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative (unconditional) conditioning."),
                HGRType.Input("hgr", tooltip=HGR_TIP),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale, as in CFGGuider. Typical 4-8; at 1.0 the negative is still "
                                       "evaluated while SafeCFG is active so redirection keeps working."),
                *window_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced's guider input.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, hgr: HGRHandle, cfg, strength, start_percent,
                end_percent) -> io.NodeOutput:
        hgr.check_model(model, "HGRSafeCFGGuider")
        guider = SafeCFGGuider(model, hgr, strength, start_percent, end_percent)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class HGRSafeCFGPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRSafeCFGPatch",
            display_name="SafeCFG Model Patch",
            category=CATEGORY,
            description=("Makes any sampler (the stock KSampler included) use SafeCFG. Stacks with other "
                         "pre-/post-CFG nodes such as RescaleCFG."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch."),
                HGRType.Input("hgr", tooltip=HGR_TIP),
                *window_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; sample it with KSampler as usual.")],
        )

    @classmethod
    def execute(cls, model, hgr: HGRHandle, strength, start_percent, end_percent) -> io.NodeOutput:
        hgr.check_model(model, "HGRSafeCFGPatch")
        return io.NodeOutput(patch_model(model, hgr, strength, start_percent, end_percent))


class HGRTextNegative(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRTextNegative",
            display_name="SafeCFG Negative (text HGR)",
            category=CATEGORY,
            description=("The paper's form of SafeCFG as a plain conditioning: the negative a text-embedding HGR "
                         "gives for the positive prompt, n + strength * Delta(positive). Wire it into a stock "
                         "KSampler's negative input; no model patch needed. Works with text HGRs only."),
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt conditioning (also the KSampler's positive)."),
                io.Conditioning.Input("negative", tooltip="Your own negative prompt (an empty prompt for none): the "
                                                          "HGR's correction is added to it, so it keeps working."),
                HGRType.Input("hgr", tooltip="A text-embedding HGR (HGRLoader); latent HGRs and the concept "
                                             "redirector act inside the sampler: use the guider or the patch."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Scale of the HGR's correction: 0 gives your negative unchanged, 1 the "
                                       "trained redirection."),
            ],
            outputs=[io.Conditioning.Output(display_name="negative",
                                            tooltip="Connect to KSampler's negative input. It acts at every step "
                                                    "(for a window, use the SafeCFG Model Patch instead)."),
                     io.Conditioning.Output(display_name="positive",
                                            tooltip="Connect to KSampler's positive input. An HGR with a rewriter "
                                                    "rewrites a harmful prompt's own embedding towards its safe "
                                                    "rewrite here (a prompt it reads as clean passes unchanged); "
                                                    "for any other text HGR this is the positive as given.")],
        )

    @classmethod
    def execute(cls, positive, negative, hgr: HGRHandle, strength) -> io.NodeOutput:
        if not is_text(hgr):
            raise ValueError(f"HGRTextNegative: '{hgr.name}' is not a text-embedding HGR; it acts inside the "
                             "sampler. Use the SafeCFG Guider or the SafeCFG Model Patch with it.")
        try:
            pos = text_positive(hgr, positive, strength)  # rewritten once: Delta reads it too
            return io.NodeOutput(text_negative(hgr, pos, negative, strength, rewritten=False), pos)
        except ValueError as e:
            raise ValueError(f"HGRTextNegative: {e}") from None
