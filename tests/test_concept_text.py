"""The concept redirector's text stage (``safecfg/concept_text.py``): harmful words redirected in the
prompt's token embedding, on the real ComfyUI runtime: a tiny seeded SD1.5 model for the plumbing
(guider, patch, KSampler, long prompts) and the bundled toy-world CLIP for what it does to words."""

from __future__ import annotations

import pytest
import torch
from test_guidance import core_guider, encode, ksample, latent, node_out, safe_guider, safe_patch, sample_guider

from safecfg_pack.safecfg.concept_text import TextConceptStage

LINE = "weapon: knife, dagger -> spoon"


def _concept(clip, text, threshold=1.0, text_match=1.0, mode="global"):
    (h,) = node_out("HGRConceptRedirector", clip=clip, concepts=text, threshold=threshold, push=0.0, mode=mode,
                    push_threshold=threshold, push_memory=0.0, text_match=text_match)
    return h


def _best_match(stage: TextConceptStage, emb: torch.Tensor) -> float:
    """The largest cosine of the prompt's positions to the stage's anchors (what its gate reads)."""
    x = torch.nn.functional.normalize(emb.float() - stage.empty, dim=-1)
    return float((x @ stage.anchors.T).max())


def _stage_between(clip, harmful: str, clean: str, text: str = LINE):
    """A concept handle whose text stage opens for ``harmful`` and stays shut for ``clean``: its
    ``text_match`` half way between the two prompts' best matches (which must be ordered so)."""
    probe = _concept(clip, text, text_match=0.0).redirector.text_stage
    hi, lo = _best_match(probe, encode(clip, harmful)[0][0][0]), _best_match(probe, encode(clip, clean)[0][0][0])
    assert hi > lo + 0.02, (hi, lo)  # the harmful word matches its own anchors better than a clean prompt does
    return _concept(clip, text, text_match=round((hi + lo) / 2, 4))


def test_lines_without_a_safe_phrase_have_no_text_stage_and_off_is_off(sd15, pack):
    model, clip, _ = sd15
    assert _concept(clip, "weapon: knife, dagger", text_match=0.5).redirector.text_stage is None
    assert _concept(clip, LINE, text_match=1.0).redirector.text_stage is None
    st = _concept(clip, LINE + "\ngore: skull", text_match=0.5).redirector.text_stage
    assert st is not None and set(st.lines.tolist()) == {0}  # only the line with '->'
    with pytest.raises(ValueError, match="start < full"):
        TextConceptStage(st.anchors, st.offsets, st.empty, st.lines.tolist(), start=0.9, full=0.9)
    with pytest.raises(ValueError, match="text embedding"):
        st.gate(torch.zeros(1, 77, st.anchors.shape[1] + 1))


def test_guider_patch_and_ksampler_see_the_rewritten_positive_clean_prompts_bit_for_bit(sd15, pack):
    """With the latent stage off (threshold 1.0), the guider and the patch sample exactly as core CFG
    with the text stage's rewritten positive; a clean prompt's positive is the same tensor, so it
    samples bit for bit as core CFG; strength scales the move; strength 0 and an empty window are core
    CFG."""
    model, clip, _ = sd15
    h = _stage_between(clip, "a red knife", "a blue circle")
    st = h.redirector.text_stage
    pos, neg = encode(clip, "a red knife"), encode(clip, "")
    c = pos[0][0]
    assert float(st.matches(c).max()) > 0
    rw = st.rewrite(c, 0.7)
    assert not torch.equal(rw, c)
    want_pos = [[rw, dict(pos[0][1])]]
    ref = sample_guider(core_guider(model, want_pos, neg, 5.0), model, latent())
    got = sample_guider(safe_guider(model, pos, neg, h, strength=0.7), model, latent())
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    patched, want = ksample(safe_patch(model, h, strength=0.7), pos, neg), ksample(model, want_pos, neg)
    assert (patched - want).abs().max() <= 1e-5 * want.abs().max()
    assert (patched - ksample(model, pos, neg)).abs().max() > 1e-3 * want.abs().max()
    clean = encode(clip, "a blue circle")
    assert float(st.matches(clean[0][0]).max()) == 0.0 and st.rewrite(clean[0][0]) is clean[0][0]
    assert torch.equal(ksample(safe_patch(model, h), clean, neg), ksample(model, clean, neg))
    assert torch.equal(sample_guider(safe_guider(model, clean, neg, h), model, latent()),
                       sample_guider(core_guider(model, clean, neg, 5.0), model, latent()))
    assert torch.equal(ksample(safe_patch(model, h, strength=0.0), pos, neg), ksample(model, pos, neg))
    assert torch.equal(sample_guider(safe_guider(model, pos, neg, h, start=0.5, end=0.5), model, latent()),
                       sample_guider(core_guider(model, pos, neg, 5.0), model, latent()))
    # both stages: the latent stage then reads the rewritten prompt's guidance, in the guider as in the patch
    both = _concept(clip, LINE, threshold=-1.0, text_match=st.start)
    g = sample_guider(safe_guider(model, pos, neg, both), model, latent())
    k = ksample(safe_patch(model, both), pos, neg)
    assert (g - k).abs().max() <= 1e-5 * g.abs().max()
    assert (g - sample_guider(safe_guider(model, pos, neg, _concept(clip, LINE, threshold=-1.0)), model,
                              latent())).abs().max() > 1e-3 * g.abs().max()


def _rows_per_call(model, run) -> set[int]:
    """The batch sizes the diffusion model is called with during ``run()`` (a forward pre-hook)."""
    seen: set[int] = set()
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda _m, args: seen.add(int(args[0].shape[0])))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_text_stage_alone_evaluates_no_concept_row(sd15, pack):
    """With the latent stage off (threshold 1.0, no push), the guider and the patch call the model with
    cond and uncond only: the text stage costs no model row per step. With the latent stage on, each
    concept joins the same call."""
    model, clip, _ = sd15
    pos, neg = encode(clip, "a red knife"), encode(clip, "")
    text_only = _concept(clip, LINE, text_match=0.5)
    assert text_only.redirector.text_stage is not None and not text_only.redirector.latent_stage
    both = _concept(clip, LINE, threshold=0.3, text_match=0.5)
    assert both.redirector.latent_stage
    k = both.redirector.num_concepts
    assert _rows_per_call(model, lambda: ksample(safe_patch(model, text_only), pos, neg)) == {2}
    assert _rows_per_call(model, lambda: sample_guider(safe_guider(model, pos, neg, text_only), model,
                                                      latent())) == {2}
    assert _rows_per_call(model, lambda: ksample(safe_patch(model, both), pos, neg)) == {2 + k}
    assert _rows_per_call(model, lambda: sample_guider(safe_guider(model, pos, neg, both), model, latent())) \
        == {2 + k}


def test_text_stage_on_a_long_prompt_of_several_chunks(sd15, pack):
    """A prompt of several 77-token chunks (ComfyUI encodes each chunk on its own and joins them): each
    position is compared with the empty prompt's vector at its place in its chunk, so a harmful word
    in a later chunk is found and a clean chunk is left alone; the patch samples as core CFG with the
    rewritten positive, and a real long prompt passes through it."""
    model, clip, _ = sd15
    h = _stage_between(clip, "a red knife", "a blue circle")
    st = h.redirector.text_stage
    clean_chunk, harm_chunk = encode(clip, "a blue circle")[0][0], encode(clip, "a red knife")[0][0]
    c = torch.cat([clean_chunk, clean_chunk, harm_chunk], dim=1)
    g, _ = st.gate(c)
    assert float(g[0, 154:].max()) > 0 and float(g[0, :154].max()) == 0.0
    rw = st.rewrite(c)
    assert torch.equal(rw[:, :154], c[:, :154]) and torch.equal(rw[:, 154:], st.rewrite(harm_chunk))
    pos, neg = [[c, {}]], encode(clip, "")
    got, want = ksample(safe_patch(model, h), pos, neg), ksample(model, [[rw, {}]], neg)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    long_pos = encode(clip, ", ".join(["a blue circle on a green striped background"] * 12) + ", a red knife")
    assert long_pos[0][0].shape[1] >= 2 * 77
    got = ksample(safe_patch(model, h), long_pos, neg)
    want = ksample(model, [[st.rewrite(long_pos[0][0]), dict(long_pos[0][1])]], neg)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_toy_clip_words_are_redirected_where_they_stand(pack):
    """On the bundled toy-world CLIP at the text stage's calibrated match: a harmful word alone or beside
    a clean object becomes its safe phrase (the rewritten embedding lies much nearer the safe prompt's
    than the original does), the clean words before it barely move, and clean prompts of every clean
    class move far less than a harmful one, at least half of them not at all."""
    from toyworld import models, world
    from toyworld.eval.baselines import CONCEPTS_REPLACE, calibrated_settings, parse_concept_setting

    if not models.weights_path("clip").is_file():
        pytest.fail("bundled toy-world CLIP missing (run make toy-train)")
    clip = models.load_clip()
    inputs, _ = parse_concept_setting(calibrated_settings()["concept"])
    match = inputs["text_match"] if inputs["text_match"] < 1.0 else 0.85
    st = _concept(clip, CONCEPTS_REPLACE, text_match=match).redirector.text_stage

    def e(text):
        return encode(clip, text)[0][0]

    for harmful, safe, word in (("a red knife", "a red spoon", 3), ("a small blue dagger", "a small blue spoon", 4),
                                ("a green circle and a red knife", "a green circle and a red spoon", 7),
                                ("a red knife and a green circle", "a red spoon and a green circle", 3),
                                ("an orange skull on dots", "an orange circle on dots", 3)):
        c, s = e(harmful), e(safe)
        rw = st.rewrite(c)
        assert float((rw - s).norm()) < 0.7 * float((c - s).norm()), harmful  # measured 0.12-0.61
        assert float((rw[:, word] - s[:, word]).norm()) < 0.5 * float((c[:, word] - s[:, word]).norm()), harmful
        # the clean words before the harmful one barely move (a colour right before it a little: the margin)
        assert float((rw[:, :word] - c[:, :word]).norm()) < 0.1 * float((rw - c).norm()), harmful
    # clean prompts: untouched, or moved far less than a harmful word is (the end tokens of short prompts
    # look alike, see safecfg/concept_text.py)
    moved = float((st.rewrite(e("a purple knife on stripes")) - e("a purple knife on stripes")).norm())
    same = 0
    for cls in world.CLEAN_CLASSES:
        c = e(f"a purple {cls} on stripes")
        rw = st.rewrite(c)
        same += rw is c
        assert float((rw - c).norm()) < 0.25 * moved, cls
    assert same >= len(world.CLEAN_CLASSES) // 2


def test_text_stage_runs_once_per_prompt_not_per_step(sd15, pack, monkeypatch):
    """The text stage rewrites the positive once per run and prompt, never per sampling step, in the
    patch and the guider (its cost per step is none)."""
    model, clip, _ = sd15
    h = _stage_between(clip, "a red knife", "a blue circle")
    st = h.redirector.text_stage
    calls = []
    orig = st.rewrite

    def counted(emb, strength=1.0):
        calls.append(tuple(emb.shape))
        return orig(emb, strength)

    monkeypatch.setattr(st, "rewrite", counted)
    pos, neg = encode(clip, "a red knife"), encode(clip, "")
    ksample(safe_patch(model, h), pos, neg, steps=6)
    assert len(calls) == 1
    calls.clear()
    sample_guider(safe_guider(model, pos, neg, h), model, latent(), steps=6)
    assert len(calls) == 1
