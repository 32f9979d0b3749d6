"""Nodes that make an HGR: load a learned one from a file, or build a concept redirector from text."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..safecfg.concept_text import TextConceptStage
from ..safecfg.hgr_file import HGRFileError, load_hgr
from ..safecfg.redirect import DEFAULT_CONCEPTS, ConceptRedirector
from .hgr_type import HGRHandle, HGRType, handle_for

CATEGORY = "SafeCFG"
FOLDER = "hgr"
#: the concept redirector's text stage: where its gate starts (1.0 = off) and how far above it opens fully
TEXT_MATCH_DEFAULT = 0.85
TEXT_MATCH_RAMP = 0.07



def register_folder(pack_weights: str) -> None:
    """``models/hgr/`` (the user's HGR files) and the pack's bundled ``weights/hgr/``."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    folder_paths.add_model_folder_path(FOLDER, pack_weights)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".safetensors"})


def parse_concept_lines(text: str, node: str = "HGRConceptRedirector") -> tuple[list[str], list[str],
                                                                                  list[str | None]]:
    """One concept per non-empty line, optionally ``category: text`` and optionally ``-> safe text``
    (what the concept is replaced by, e.g. ``weapon: knife, dagger -> spoon``). Returns (categories,
    texts, replacement texts or None)."""
    cats, texts, targets = [], [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        body_all, arrow, target = line.rpartition("->")
        if arrow:
            line, target = body_all.strip(), target.strip()
            if not line or not target:
                raise ValueError(f"{node}: concept line {raw.strip()!r} has an empty side of '->'. Write "
                                 "'category: harmful words -> safe words', e.g. 'weapon: knife, dagger -> spoon'.")
        cat, sep, body = line.partition(":")
        if sep and body.strip() and " " not in cat.strip():
            cats.append(cat.strip())
            texts.append(body.strip())
        else:
            cats.append(f"concept {len(texts) + 1}")
            texts.append(line)
        targets.append(target if arrow else None)
    if not texts:
        raise ValueError(f"{node}: 'concepts' is empty. Write one harmful concept per line, e.g. "
                         "'violence: blood, gore'.")
    return cats, texts, targets


def parse_concepts(text: str, node: str = "HGRConceptRedirector") -> tuple[list[str], list[str]]:
    """One concept per non-empty line, optionally ``category: text``. Returns (categories, texts)."""
    cats, texts, _ = parse_concept_lines(text, node)
    return cats, texts


class HGRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRLoader",
            display_name="Load HGR",
            category=CATEGORY,
            description="Loads a learned Harmful Guidance Redirector (.safetensors) from models/hgr/.",
            inputs=[
                io.Combo.Input("hgr_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="An HGR file in ComfyUI/models/hgr/ (or bundled with the pack). It must "
                                       "have been trained for the model family you sample with."),
            ],
            outputs=[HGRType.Output(display_name="HGR", tooltip="Connect to the SafeCFG guider, patch or detector.")],
        )

    @classmethod
    def fingerprint_inputs(cls, hgr_name):
        path = folder_paths.get_full_path(FOLDER, hgr_name)
        return os.path.getmtime(path) if path and os.path.exists(path) else ""

    @classmethod
    def execute(cls, hgr_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, hgr_name)
        if path is None:
            where = folder_paths.get_folder_paths(FOLDER)
            raise ValueError(f"HGRLoader: HGR file '{hgr_name}' was not found in {where}."
                             " Put HGR .safetensors files in ComfyUI/models/hgr/ and refresh.")
        try:
            hgr = load_hgr(path)
        except HGRFileError as e:
            raise ValueError(f"HGRLoader: {e}") from None
        return io.NodeOutput(handle_for(hgr, hgr_name))


class HGRConceptRedirector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HGRConceptRedirector",
            display_name="SafeCFG Concept Redirector",
            category=CATEGORY,
            description=("Training-free redirector for any CFG model: harmful concepts written as text. Each "
                         "concept adds one row to the sampler's batched model call."),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model you sample with."),
                io.String.Input("concepts", multiline=True, default=DEFAULT_CONCEPTS,
                                tooltip="One harmful concept per line, optionally 'category: words', and optionally "
                                        "'-> safe words' to steer towards a named safe concept instead of only "
                                        "erasing (e.g. 'weapon: knife, dagger -> spoon'). Each line and each "
                                        "distinct safe concept costs one extra batch row per step; group synonyms "
                                        "on one line."),
                io.Float.Input("threshold", default=0.2, min=-1.0, max=1.0, step=0.01,
                               tooltip="Cosine between the guidance and a concept direction above which "
                                       "redirection starts. Lower = stricter (more false positives on clean "
                                       "prompts). Recommended 0.1-0.3."),
                io.Float.Input("push", default=0.0, min=0.0, max=4.0, step=0.01,
                               tooltip="Extra push, beyond removing a matched concept, applied where the cosine "
                                       "passes push_threshold. It goes against the mean of all concept directions "
                                       "(away from one concept alone can lead to another). Neutral 0.0."),
                io.Combo.Input("mode", options=["global", "patch"], default="global",
                               tooltip="global: one decision per image (per video). patch: per 4x4-latent region "
                                       "(of each latent frame on video models), for harmful objects in part of "
                                       "the image."),
                io.Float.Input("push_threshold", default=0.5, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="Cosine above which the push applies. Removing the aligned component is "
                                       "harmless to a clean prompt that aligns a little; the push steers away, so "
                                       "keep it for confident matches (above 'threshold')."),
                io.Float.Input("push_memory", default=0.0, min=0.0, max=0.95, step=0.05, optional=True,
                               tooltip="How much the push remembers earlier steps: it applies when a running "
                                       "average of the cosine (this weight on the past) passes push_threshold. "
                                       "0 = each step on its own; 0.5-0.7 keeps a clean prompt that brushes a "
                                       "concept for one step from being pushed."),
                io.Float.Input("text_match", default=TEXT_MATCH_DEFAULT, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="The text stage, for lines with '-> safe words': before the model sees the "
                                       "prompt, each of its tokens whose embedding matches a harmful phrase's "
                                       "(cosine, centred on the empty prompt's) above this value is moved to the "
                                       "safe phrase's. Fully at +0.07. It finds the word wherever it stands, so a "
                                       "harmful object beside a clean one is caught. Lines without '->' are left "
                                       "to the latent redirection. Computed once per prompt: no cost per step. "
                                       "1.0 turns it off."),
            ],
            outputs=[HGRType.Output(display_name="HGR", tooltip="Connect to the SafeCFG guider, patch or detector.")],
        )

    @classmethod
    def execute(cls, clip, concepts, threshold, push, mode, push_threshold=0.5, push_memory=0.0,
                text_match=TEXT_MATCH_DEFAULT) -> io.NodeOutput:
        if clip is None:
            raise ValueError("HGRConceptRedirector: no CLIP connected. Connect the checkpoint's CLIP output; "
                             "a checkpoint without a text encoder cannot give concept directions.")
        cats, texts, targets = parse_concept_lines(concepts)
        safe = list(dict.fromkeys(t for t in targets if t is not None))  # each safe concept is one row
        conds = [clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in texts + safe]
        stage = None
        if text_match is not None and float(text_match) < 1.0:
            def encode(text):
                out = clip.encode_from_tokens_scheduled(clip.tokenize(text))
                return out[0][0][0]

            phrases = [[w.strip() for w in t.split(",") if w.strip()] for t in texts]
            stage = TextConceptStage.build(encode, phrases, targets, start=float(text_match),
                                           full=min(1.0, float(text_match) + TEXT_MATCH_RAMP), names=texts)
        red = ConceptRedirector(len(texts), tau=threshold, push=push, patch=4 if mode == "patch" else 0, names=texts,
                                push_tau=push_threshold, memory=float(push_memory or 0.0),
                                targets=[None if t is None else safe.index(t) for t in targets], num_safe=len(safe),
                                text_stage=stage)
        return io.NodeOutput(HGRHandle(red, name=f"concepts ({len(texts)})", concept_conds=conds, categories=cats))
