"""``python -m commands.train_hgr --toy`` or ``--checkpoint model.safetensors``: train a learned HGR for
a model, from a repository checkout (ComfyUI from the bootstrap or ``COMFYUI_DIR``); ``--diffusion-model`` with
``--text-encoder`` and ``--clip-type`` for the families whose files come apart (SD3.5, Flux, Wan, ...).

The teacher cache is resumable (rerun the same command after an interruption) and can be split
across processes with ``--shard``/``--num-shards``; the fit writes a validated ``.safetensors``.

``--kind text`` trains the paper's form instead: a Transformer over the prompt's text embedding whose
output replaces the empty prompt's in CFG's unconditional branch (``safecfg/text_train.py``). Its
teacher states are cached in the cache folder (``text_states.safetensors``, rebuilt when the prompts,
settings or model change); the fit keeps the weights with the best validation loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_device_args, add_model_args, check_model_args, load_model, progress_bars, start


def main(argv=None, models=None) -> int:
    """The command line; ``models``: a (MODEL, CLIP, base model name) triple that a host which runs
    ComfyUI in this process has loaded itself, in place of a model option."""
    ap = argparse.ArgumentParser(description="Train a Harmful Guidance Redirector (HGR) for a model.")
    add_model_args(ap)
    ap.add_argument("--data", default=None, help="prompt-pair JSON (default: data/toyworld_hgr.json for --toy)")
    ap.add_argument("--out", required=True, help="the HGR .safetensors to write")
    ap.add_argument("--cache", default=None, help="teacher cache folder (default: next to --out)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels for trajectories")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of the teacher trajectories")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--fit-steps", type=int, default=3000)
    ap.add_argument("--kind", choices=["latent", "text"], default="latent",
                    help="latent: the CFG direction in latent space; text: the paper's form, on the text embedding")
    ap.add_argument("--width", type=int, default=None,
                    help="HGR width (latent: base width, default 64 = 2.4 M parameters; text: the Transformer's "
                         "width, default 256)")
    ap.add_argument("--on-policy-rounds", type=int, default=0,
                    help="text kind: rounds of on-policy teacher states (sampled with the HGR fitted so far), each "
                         "followed by a fit from the current weights")
    ap.add_argument("--round-fit-steps", type=int, default=None, help="fit steps per on-policy round (default: "
                                                                      "half of --fit-steps)")
    ap.add_argument("--init", default=None, help="text kind: an already fitted text HGR file to start the on-policy "
                                                 "rounds from (skips the first fit)")
    ap.add_argument("--rewrite-steps", type=int, default=0,
                    help="text kind: also fit a rewriter of the prompt's own embedding towards its safe rewrite's "
                         "(gated by the HGR's harm distance; embeddings only, seconds per 100 steps); with --init "
                         "and no on-policy rounds, only the rewriter is fitted onto the --init file")
    ap.add_argument("--frames", type=int, default=3,
                    help="video models: latent frames of each teacher clip (the latent HGR works frame by frame)")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=1, help="split cache building across processes")
    ap.add_argument("--seed", type=int, default=0)
    add_device_args(ap)
    args = ap.parse_args(argv)
    check_model_args(ap, args, loaded=models is not None)

    repo = start(args)
    from safecfg_pack.nodes.teacher import ComfyTeacher
    from safecfg_pack.safecfg.hgr_net import HGRConfig
    from safecfg_pack.safecfg.prompts import PromptData
    from safecfg_pack.safecfg.teacher_cache import CacheSpec, build_cache
    from safecfg_pack.safecfg.train import FitSpec, train_hgr

    if not args.toy and not args.data:
        raise SystemExit("--data is required for a model other than --toy (see data/ for the format)")
    mp, clip, base = models if models is not None else load_model(args)
    data_path = args.data or repo / "data" / "toyworld_hgr.json"
    teacher = ComfyTeacher(mp, clip, width=args.size, height=args.size, frames=args.frames)
    data = PromptData.load(data_path)
    out = Path(args.out)
    cache_dir = Path(args.cache) if args.cache else out.with_suffix(".cache")
    progress = progress_bars()
    if args.kind == "text":
        return _train_text(args, teacher, mp, data, out, base, cache_dir, progress)
    cache_spec = CacheSpec(steps=args.steps, cfg=args.cfg, seed=args.seed)
    if args.num_shards > 1:
        build_cache(teacher, data, cache_dir, cache_spec, shard=args.shard, num_shards=args.num_shards,
                    progress=lambda d, t: progress("cache", d, t))
        print(f"shard {args.shard}/{args.num_shards} of the cache done; run without --num-shards to fit")
        return 0
    _, summary = train_hgr(teacher, data, cache_dir, out, base_model=base, progress=progress, cache_spec=cache_spec,
                           fit_spec=FitSpec(steps=args.fit_steps, seed=args.seed),
                           config=HGRConfig(latent_channels=teacher.latent_channels, width=args.width or 64))
    _stamp(args, mp, out, base)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


def _stamp(args, mp, out: Path, base: str) -> None:
    """Record in the file the model it was trained for (the toy model's fingerprint is marked as such)."""
    from safecfg_pack.nodes.hgr_type import model_fingerprint
    from safecfg_pack.safecfg.hgr_file import stamp_trained_for

    if args.toy:
        from safecfg_pack.toyworld.models import toy_fingerprint

        fp = toy_fingerprint(mp)
    else:
        fp = model_fingerprint(mp, name=base)
    if fp:
        stamp_trained_for(out, fp)


def _train_text(args, teacher, mp, data, out: Path, base: str, cache_dir: Path, progress) -> int:
    from safecfg_pack.safecfg.hgr_file import load_hgr, save_hgr
    from safecfg_pack.safecfg.text_train import (
        RewriteSpec,
        TextFitSpec,
        TextStatesSpec,
        add_rewriter,
        json_safe,
        train_text_hgr,
    )

    init = None
    if args.init:
        init = load_hgr(args.init)
        if getattr(init, "kind", "") != "text":
            raise SystemExit(f"--init {args.init} is not a text HGR")
    if init is not None and args.on_policy_rounds == 0 and args.rewrite_steps > 0:
        hgr, summary = init, dict(json_safe(init.metadata.get("training")))
    else:
        hgr, summary = train_text_hgr(teacher, data, cache_dir, out,
                                      spec=TextStatesSpec(steps=args.steps, cfg=args.cfg, seed=args.seed),
                                      fit_spec=TextFitSpec(steps=args.fit_steps, seed=args.seed),
                                      width=args.width or 256, base_model=base,
                                      family=type(mp.model.model_config).__name__, progress=progress,
                                      on_policy_rounds=args.on_policy_rounds, round_fit_steps=args.round_fit_steps,
                                      init=init, notes={"data": str(args.data or "toyworld")},
                                      layout=teacher.layout())
    if args.rewrite_steps > 0:
        hgr, r = add_rewriter(hgr, teacher.embed, data, RewriteSpec(steps=args.rewrite_steps, seed=args.seed),
                              progress=lambda s, t, loss: progress("rewriter", s, t))
        summary["rewriter"] = dict(r, data=str(args.data or "toyworld"))
        detection = json_safe((init.metadata if init is not None else {}).get("detection")) or None
        save_hgr(out, hgr, base_model=base or (init.metadata.get("base_model", "") if init else ""),
                 training=summary, detection=detection)
        load_hgr(out)
    _stamp(args, mp, out, base)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
