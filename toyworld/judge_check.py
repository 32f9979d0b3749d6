"""Compare two strict judges on images the benchmark never draws (a development check of the judge).

    python -m toyworld.judge_check [--old weights/toyworld/toy_oracle.safetensors] --new PATH [--n 200]

Plain CFG (Euler, 20 steps, cfg 5; ``--seed`` 11: the token draws, and noise seeds 11, 12, 13 for the
three sets) draws calibration-split prompts past the ones that calibration reads (indices 400 on;
training templates and names only, so no benchmark string; the benchmark uses other seeds) and random
token sequences. Both judges read the same images; the report
gives each one's harmful rate on clean prompts (two objects and one object apart), on harmful prompts
(how often the harmful object is found when it was asked for) and on random tokens, and writes the
clean images that either judge flags to ``--grid`` for a look. Ground truth for generated images does
not exist: the judges' recall on the generator's own scenes is in their metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = 400  # calibration reads at most the first --n of each split (80 bundled); these come after


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=str(REPO / "weights" / "toyworld" / "toy_oracle.safetensors"))
    ap.add_argument("--new", required=True)
    ap.add_argument("--n", type=int, default=200, help="prompts per set")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--grid", default=str(REPO / ".toytrain" / "judge_check.png"))
    ap.add_argument("--grid-set", default="clean", choices=("clean", "harmful", "random_tokens"),
                    help="whose flagged images go into the grid")
    ap.add_argument("--out", default=None, help="JSON report (default: print only)")
    args = ap.parse_args(argv)

    from .session import start

    start(True)
    import comfy.sample
    import comfy.samplers
    import numpy as np
    import torch

    from . import oracle as oracle_mod
    from .eval.metrics import rate_ci
    from .eval.prompts import CALIBRATION_MAX, calibration_prompts
    from .eval.run import encode_batch
    from .models import load_clip, load_unet, load_vae

    if SKIP + args.n > CALIBRATION_MAX:
        raise SystemExit(f"--n at most {CALIBRATION_MAX - SKIP}")
    model, clip, vae = load_unet(), load_clip(), load_vae()
    judges = {"old": oracle_mod.load(Path(args.old)), "new": oracle_mod.load(Path(args.new))}
    sets = {"clean": calibration_prompts("cal_clean", SKIP + args.n)[SKIP:],
            "harmful": calibration_prompts("cal_harmful", SKIP + args.n)[SKIP:]}
    texts = {k: [s.text for s in v] for k, v in sets.items()}
    tok = clip.tokenizer.clip_l.tokenizer
    vocab = sorted(set(tok.get_vocab().values()) - set(tok.all_special_ids))
    rng = np.random.default_rng(args.seed)
    texts["random_tokens"] = [tok.decode(rng.choice(vocab, 6).tolist()) for _ in range(args.n)]
    sigmas = comfy.samplers.KSampler(model, 20, "cpu", sampler="euler", scheduler="normal").sigmas
    sampler = comfy.samplers.sampler_object("euler")
    empty = encode_batch(clip, [""])
    report, flagged = {}, []
    for k, (name, tx) in enumerate(texts.items()):
        g = comfy.samplers.CFGGuider(model)
        cond = encode_batch(clip, tx)
        g.set_conds(cond, [[empty[0][0].expand(len(tx), -1, -1), {}]])
        g.set_cfg(5.0)
        lat = torch.zeros(len(tx), 4, 8, 8)
        noise = comfy.sample.prepare_noise(lat, args.seed + k)
        with torch.no_grad():
            imgs = vae.decode(g.sample(noise, lat, sampler, sigmas, disable_pbar=True, seed=args.seed + k))
        imgs = imgs.float().clamp(0, 1)
        flags = {j: oracle_mod.classify(judge, imgs)["harmful"].tolist() for j, judge in judges.items()}
        groups = {"all": list(range(len(tx)))}
        if name == "clean":
            groups = {"one object": [i for i, s in enumerate(sets["clean"]) if len(s.items) == 1],
                      "two objects": [i for i, s in enumerate(sets["clean"]) if len(s.items) == 2]}
        for gname, idx in groups.items():
            for j in judges:
                f = [flags[j][i] for i in idx]
                report[f"{name}, {gname}, {j}"] = {"n": len(f), "harmful_rate": float(np.mean(f)), "ci": rate_ci(f)}
        if name == args.grid_set:
            flagged += [(imgs[i], flags["old"][i], flags["new"][i]) for i in range(len(tx))
                        if flags["old"][i] or flags["new"][i]]
    for key, v in report.items():
        print(f"{key:32s} {100 * v['harmful_rate']:5.1f} % [{100 * v['ci'][0]:.1f}, {100 * v['ci'][1]:.1f}] "
              f"(n {v['n']})")
    if flagged:
        from PIL import Image, ImageDraw

        tiles = []
        for img, o, nw in flagged[:48]:
            t = Image.fromarray((img.numpy() * 255).astype("uint8")).resize((128, 128), Image.NEAREST)
            ImageDraw.Draw(t).text((2, 2), ("O" if o else "-") + ("N" if nw else "-"), fill=(255, 0, 255))
            tiles.append(t)
        cols = 8
        grid = Image.new("RGB", (cols * 128, ((len(tiles) + cols - 1) // cols) * 128))
        for i, t in enumerate(tiles):
            grid.paste(t, ((i % cols) * 128, (i // cols) * 128))
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        print(f"{args.grid_set} images flagged by either judge ({len(flagged)}; O: old, N: new): {args.grid}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
