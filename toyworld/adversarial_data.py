"""AdvUnlearn-style teacher data for the text HGR: attack-found prompts with their safe targets.

    python -m toyworld.adversarial_data    # -> data/toyworld_hgr_adversarial.json

The adaptive attack of `make attack` (a PEZ-optimised token prefix before a harmful prompt, white-box
through the defended sampler) is run against the given text HGR on harmful prompts of the HGR's own
*training* data (``data/toyworld_hgr_composed.json``: training templates and names only). Each found
prefix then enters the teacher data twice: before the harmful prompt, paired with the same prefix
before its safe rewrite (the target: what plain CFG does with the harmful object swapped), and
before a clean prompt of the training data (a clean prompt stays clean with any prefix, so the HGR
learns the object, not the gibberish). The file holds these beside a fixed subsample of the composed
data, so a fine-tune keeps what the HGR learned there.

No adversarial entry is built on a string of the red-team suite's own targets (its candidate scenes
for every attack), and no benchmark or calibration prompt is in the file (the composed data already
leaves those out). The kept subsample of the composed data is not filtered against the attack's
targets: like the composed data itself, it shares some short single-object strings with them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "data" / "toyworld_hgr_composed.json"
OUT = REPO / "data" / "toyworld_hgr_adversarial.json"


def attack_strings(seed: int = 4242) -> set[str]:
    """Every prompt string the red-team suite's attacks may use as a target or a clean prompt."""
    from .attack import BUDGET, _scene_specs

    out = set()
    for s_seed, n in ((seed, BUDGET["concept_pairs"] * 2), (seed + 1, BUDGET["targets"]),
                      (seed + 3, 2 * BUDGET["whitebox"]["targets"]), (seed + 43, BUDGET["tina"]["clean_reference"])):
        for _, spec in _scene_specs(n, s_seed):
            out |= {spec.text, spec.rewrite().text}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hgr", default=None, help="the text HGR attacked (default: the bundled one)")
    ap.add_argument("--targets", type=int, default=96, help="harmful training prompts attacked")
    ap.add_argument("--keep-pairs", type=int, default=400, help="composed pairs kept beside them")
    ap.add_argument("--keep-clean", type=int, default=300, help="composed clean prompts kept beside them")
    ap.add_argument("--seed", type=int, default=77)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)

    from .session import start

    start(args.cpu)
    import comfy.sample
    import comfy.samplers
    import numpy as np
    import torch

    from . import whitebox
    from .attack import BUDGET, Encoder, banned_ids, benchmark_sampler
    from .eval.baselines import Methods, calibrated_settings
    from .eval.prompts import HARM_WORDS
    from .eval.run import TEXT_HGR
    from .models import clip_token_ids, load_clip, load_unet, load_vae
    from .oracle import classify
    from .oracle import load as load_oracle

    hgr_path = Path(args.hgr) if args.hgr else TEXT_HGR
    src = json.loads(SOURCE.read_text())
    avoid = attack_strings()
    rng = np.random.default_rng(args.seed)
    single = [p for p in src["pairs"] if " and " not in p["harmful"] and p["harmful"] not in avoid
              and p["safe"] not in avoid]
    pool = [single[i] for i in rng.permutation(len(single))]
    model, clip, vae = load_unet(), load_clip(), load_vae()
    strict = load_oracle()
    enc = Encoder(clip)
    methods = Methods(model, clip, methods=["text_hgr"], hgr_path=REPO / "missing", steps=20, cfg=5.0,
                      negative_prompt=HARM_WORDS, settings=calibrated_settings(), text_hgr_path=hgr_path)
    methods.text_hgr.redirector.net.requires_grad_(False)
    sigmas, sample = benchmark_sampler(model, vae, 20)
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    # targets: training pairs whose plain-CFG image is harmful
    cand = pool[:2 * args.targets]
    conds = torch.stack([enc.text(clip, p["harmful"]) for p in cand])
    noise = comfy.sample.prepare_noise(torch.zeros(len(cand), 4, 8, 8), args.seed)
    g = comfy.samplers.CFGGuider(model)
    g.set_conds([[conds, {}]], empty)
    g.set_cfg(5.0)
    lat, imgs = sample(g, noise)
    keep = classify(strict, imgs)["harmful"].bool().nonzero().flatten()[:args.targets].tolist()
    pairs = [cand[i] for i in keep]
    ids = []
    for p in pairs:
        row = clip_token_ids(clip, p["harmful"])[1:]
        ids.append(row[:row.index(enc.end)])
    tgt = {"ids": ids, "latents": lat[keep], "noise": noise[keep], "conds": conds[keep]}
    allowed = set(range(enc.start)) - banned_ids(enc.tokenizer)
    wb = BUDGET["whitebox"]
    space = whitebox.PrefixSpace(enc, ids, allowed, wb["prefix"], torch.Generator().manual_seed(args.seed + 1))

    def check(cond):
        return classify(strict, sample(methods.guider("text_hgr", [[cond, {}]]), tgt["noise"])[1])["harmful"].bool()

    res = whitebox.adaptive_attack(space, whitebox.Defended(methods, "text_hgr", sigmas), tgt["latents"],
                                   wb | {"levels": list(range(wb["levels"]))}, check=check, seed=args.seed + 2)
    prefixes = [enc.decode(row) for row in res["snaps"]]
    clean_pool = [c for c in src["clean"] if c not in avoid]
    clean_pick = [clean_pool[i] for i in rng.permutation(len(clean_pool))[:len(prefixes)]]
    adv_pairs = [{"harmful": f"{pre} {p['harmful']}", "safe": f"{pre} {p['safe']}", "category": p["category"],
                  "adversarial": True, "prefix": pre} for pre, p in zip(prefixes, pairs)]
    adv_clean = [f"{pre} {c}" for pre, c in zip(prefixes, clean_pick)]
    kept_pairs = [src["pairs"][i] for i in rng.permutation(len(src["pairs"]))[:args.keep_pairs]]
    kept_clean = [src["clean"][i] for i in rng.permutation(len(src["clean"]))[:args.keep_clean]]
    out = {"about": ("AdvUnlearn-style text-HGR teacher data (toyworld/adversarial_data.py): prefixes found by the "
                     f"adaptive attack against {hgr_path.name} on harmful prompts of the composed training data "
                     "(training templates and names only, none of them a target of the red-team suite), each before "
                     "its harmful prompt (paired with the same prefix before the safe rewrite) and before a clean "
                     "training prompt; beside a fixed subsample of the composed data. No benchmark or calibration "
                     "string."),
           "attack": {"hgr": hgr_path.name, "targets": len(pairs), "succeeded": int(res["won"].sum()),
                      "budget": wb, "seed": args.seed},
           "pairs": kept_pairs + adv_pairs, "clean": kept_clean + adv_clean}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"[adversarial] {int(res['won'].sum())}/{len(pairs)} training prompts broken; wrote {args.out} "
          f"({len(out['pairs'])} pairs, {len(out['clean'])} clean)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
