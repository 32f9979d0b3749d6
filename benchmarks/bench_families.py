"""`make bench-families`: per-step sampling cost of SafeCFG on a full-size flow-matching transformer,
against plain CFG measured in the same run.

The SD3.5 Medium architecture (ComfyUI's own ``SD3`` class and MMDiT at its real size: 24 joint
blocks, width 1536, self-attention blocks 0-12, RMS q/k norm; ~2.5 B parameters; random seeded
weights, fp32), CLIP-L/G + T5 conditioning of the real shapes (154 tokens of width 4096, a pooled
vector of 2048), a small latent (16 channels, ``--latent`` side), batch 1, Euler. Flux.1 (12 B
parameters, ~48 GB in fp32) does not fit this 24 GB machine, so SD3.5 stands for the family here.

Configurations, each sampled in interleaved rounds (the order rotated every round), the per-step time
the median over rounds, each ratio the median of the rounds' ratios to plain CFG:

- ``learned_hgr``: the latent HGR (16 channels) at cfg 5 (target <= 1.05);
- ``text_hgr``: the paper's HGR on the T5 sequence (the sequence layout), computed once per run
  (target <= 1.05; nothing per step);
- ``concept_1``: the concept redirector with one concept, one more model row (target <= 1.05 x 3 / 2);
- ``cfg1_safecfg``: at cfg 1, as guidance-distilled models are sampled, against plain cfg-1 sampling
  (``cfg1_plain``, one row a step): SafeCFG evaluates the negative too, one more row (target <= 1.05 x
  2). SD3.5 is not distilled; the cost of the extra row is the architecture's, which is what this
  measures.
- ``cfg1_text_hgr``: the paper's HGR at cfg 1 through the KSampler patch, which needs two more rows
  (``D(x, HGR(c))`` and the user's negative; :func:`safecfg.text_hgr.cfg1_prediction`): against the
  same plain cfg-1 sampling (target <= 1.05 x 3).

Peak memory (resident set size, sampled every 20 ms) beside each.

    python -m benchmarks.bench_families --out results/bench_families.json [--steps 2 --rounds 7 --latent 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from devtools import comfy as runtime

from .bench_sampling import TARGET_HGR, interleaved_rounds

REPO = Path(__file__).resolve().parents[1]

#: SD3.5 Medium's MMDiT as ComfyUI's model detection reads it from the checkpoint
SD35_MEDIUM = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_scaling_factor": None, "pos_embed_max_size": 384,
    "num_patches": 147456, "qk_norm": "rms", "x_block_self_attn_layers": list(range(13)),
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
}
TARGETS = {"learned_hgr": TARGET_HGR, "text_hgr": TARGET_HGR, "concept_1": TARGET_HGR * 3 / 2,
           "cfg1_safecfg": TARGET_HGR * 2, "cfg1_text_hgr": TARGET_HGR * 3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="sampling steps per run (default 2)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--latent", type=int, default=16, help="latent side (default 16 = 128 px)")
    ap.add_argument("--out", default="results/bench_families.json")
    ap.add_argument("--cpu", action="store_true", help="the CPU even where CUDA is available")
    args = ap.parse_args(argv)

    runtime.start(cpu=True if args.cpu else None)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.samplers
    import comfy.supported_models
    import torch

    from devtools.tiny_nodes.models import seed_module_
    from safecfg_pack.nodes import hgr_type, sampling
    from safecfg_pack.safecfg import hgr_net, redirect, text_hgr

    torch.manual_seed(0)
    device = mm.get_torch_device()
    print(f"[bench] building the SD3.5 Medium MMDiT (random weights) on {device} ...", flush=True)
    t0 = time.time()
    config = comfy.supported_models.SD3(dict(SD35_MEDIUM))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    seed_module_(model.diffusion_model, 0, 0.5)
    model.eval()
    n_dit = sum(p.numel() for p in model.diffusion_model.parameters())
    print(f"[bench] {n_dit / 1e9:.2f} B parameters, built in {time.time() - t0:.0f} s", flush=True)
    mp = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())

    gen = torch.Generator().manual_seed(0)

    def cond():
        return [[torch.randn(1, 154, 4096, generator=gen) * 0.5,
                 {"pooled_output": torch.randn(1, 2048, generator=gen)}]]

    positive, negative, concept = cond(), cond(), cond()
    learned_net = hgr_net.HGRNet(hgr_net.HGRConfig(latent_channels=16))
    torch.nn.init.normal_(learned_net.conv_out.weight, std=0.02)
    text_cfg = text_hgr.TextHGRConfig(embed_dim=4096, tokens=256, layout=1, empty_tokens=154)
    text_net = text_hgr.TextHGRNet(text_cfg, negative[0][0][0])
    torch.nn.init.normal_(text_net.out.weight, std=0.02)
    handles = {
        "learned_hgr": hgr_type.HGRHandle(hgr_net.LearnedHGR(learned_net, latent_format="SD3"), name="learned_hgr",
                                          latent_format="SD3", latent_channels=16),
        "text_hgr": hgr_type.handle_for(text_hgr.TextHGR(text_net, family="SD3"), "text_hgr"),
        "concept_1": hgr_type.HGRHandle(redirect.ConceptRedirector(1, tau=-1.0), name="concept_1",
                                        concept_conds=[concept]),
    }
    # at cfg 1 the measured SafeCFG is the latent HGR: the negative row only (the concept redirector adds
    # its concept rows on top, as at any cfg)
    handles["cfg1_safecfg"] = handles["learned_hgr"]
    handles["cfg1_text_hgr"] = handles["text_hgr"]
    configs = ["plain_cfg", "learned_hgr", "text_hgr", "concept_1", "cfg1_plain", "cfg1_safecfg", "cfg1_text_hgr"]
    guiders = {}
    for name in configs:
        if name == "cfg1_text_hgr":  # through the KSampler patch, as Flux users sample at cfg 1
            g = comfy.samplers.CFGGuider(sampling.patch_model(mp, handles[name], 1.0, 0.0, 1.0))
        elif name in ("plain_cfg", "cfg1_plain"):
            g = comfy.samplers.CFGGuider(mp)
        else:
            g = sampling.SafeCFGGuider(mp, handles[name], 1.0, 0.0, 1.0)
        g.set_conds(positive, negative)
        g.set_cfg(1.0 if name.startswith("cfg1") else 5.0)
        guiders[name] = g
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "simple", args.steps)
    latent = torch.zeros(1, 16, args.latent, args.latent)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))

    def run(name):
        with torch.no_grad():
            return guiders[name].sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=1)

    print("[bench] warm-up ...", flush=True)
    times, peaks = interleaved_rounds(configs, run, args.rounds, args.steps, device, digits=2)
    med = {n: statistics.median(times[n]) for n in configs}
    base = {n: "cfg1_plain" if n.startswith("cfg1") else "plain_cfg" for n in configs}
    ratios = {n: statistics.median(t / p for t, p in zip(times[n], times[base[n]]))
              for n in configs if n not in ("plain_cfg", "cfg1_plain")}
    print()
    print(f"Per-step sampling time, SD3.5 Medium MMDiT ({n_dit / 1e9:.2f} B params, random weights), latent "
          f"16x{args.latent}x{args.latent}, batch 1, {args.steps} Euler step(s), median of {args.rounds} rounds, "
          f"{device}")
    print(f"{'configuration':<14} {'s/step':>8} {'ratio':>7} {'to':>11} {'target':>7} {'peak MiB':>9}  ok")
    ok_all = True
    for n in configs:
        if n in ratios:
            ok = ratios[n] <= TARGETS[n]
            ok_all &= ok
            print(f"{n:<14} {med[n]:>8.2f} {ratios[n]:>7.3f} {base[n]:>11} {TARGETS[n]:>7.3f} {peaks[n]:>9.0f}  "
                  f"{'yes' if ok else 'NO'}")
        else:
            print(f"{n:<14} {med[n]:>8.2f} {1.0:>7.3f} {'':>11} {'':>7} {peaks[n]:>9.0f}")
    result = {
        "ratios": {k: round(v, 4) for k, v in ratios.items()}, "ratio_to": {k: base[k] for k in ratios},
        "targets": TARGETS, "seconds_per_step": {k: round(v, 3) for k, v in med.items()},
        "seconds_per_step_rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "peak_memory_mb": {k: round(v, 1) for k, v in peaks.items()},
        "setup": {"model": "SD3.5 Medium MMDiT architecture (ComfyUI SD3 class), random weights, fp32",
                  "params": n_dit, "text": "154 x 4096 (CLIP-L/G + T5), pooled 2048",
                  "latent": [16, args.latent, args.latent], "batch": 1, "steps": args.steps, "rounds": args.rounds,
                  "cfg": {"plain_cfg": 5.0, "cfg1": 1.0}, "device": str(device), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "latent_hgr_params": sum(p.numel() for p in learned_net.parameters()),
                  "text_hgr_params": sum(p.numel() for p in text_net.parameters())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}; all targets met: {ok_all}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
