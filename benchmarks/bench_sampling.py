"""`make bench`: per-step sampling cost of SafeCFG against plain CFG, measured in one run.

The full-size SD1.5 UNet architecture (random weights; ~860 M parameters), a 32x32 latent (256 px),
batch 1, Euler, on whatever device ComfyUI picks (CPU here). Every configuration is sampled in
interleaved rounds (the order rotated every round) so that machine drift and order effects hit all
of them alike; the per-step time is the median over rounds; ratios are to plain CFG (core
CFGGuider), the median over rounds of each round's ratio. Peak memory is the
process's peak resident set size (CPU) or peak CUDA allocation (GPU) while a configuration runs,
sampled every 20 ms.

    python -m benchmarks.bench_sampling --out results/bench.json [--steps 3 --rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from devtools import comfy as runtime

REPO = Path(__file__).resolve().parents[1]

SD15_FULL = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
TARGET_HGR = 1.05  # the concept redirector's base (k concepts: TARGET_HGR * (2 + k) / 2)
TARGET_LATENT = 1.02  # the learned latent HGR (a small network per step)
TARGET_TEXT = 1.01  # the paper's text HGR: computed once per prompt, nothing per step


class PeakMemory:
    """Peak RSS (CPU) or CUDA allocation while the block runs, in MiB."""

    def __init__(self, device):
        import psutil
        import torch

        self.proc, self.torch, self.cuda = psutil.Process(), torch, device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return self
        self.stop = threading.Event()
        self.peak = self.proc.memory_info().rss

        def watch():
            while not self.stop.wait(0.02):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = self.torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mb = self.peak / 2**20


def interleaved_rounds(configs: list[str], run, rounds: int, steps: int, device, digits: int = 3) -> tuple:
    """One warm-up run of every configuration, then ``rounds`` rounds of one run each, the order rotated
    every round so that no configuration always runs first or after another: per-step seconds of each
    run and each configuration's peak memory (MiB). ``run(name)`` samples ``steps`` steps."""
    import torch

    for name in configs:
        run(name)
    times = {n: [] for n in configs}
    peaks = {n: 0.0 for n in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for name in order:
            with PeakMemory(device) as pm:
                t0 = time.perf_counter()
                out = run(name)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) / steps
            assert torch.isfinite(out).all(), name
            times[name].append(dt)
            peaks[name] = max(peaks[name], pm.mb)
        print(f"[bench] round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.{digits}f}s" for n in configs),
              flush=True)
    return times, peaks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="sampling steps per run (default 3)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds, order rotated each round (default 7)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (default 32 = 256 px)")
    ap.add_argument("--out", default="results/bench.json")
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
    print(f"[bench] building the full-size SD1.5 UNet (random weights) on {device} ...", flush=True)
    model = comfy.supported_models.SD15(dict(SD15_FULL)).get_model({})
    seed_module_(model.diffusion_model, 0)
    model.eval()
    n_unet = sum(p.numel() for p in model.diffusion_model.parameters())
    mp = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())

    gen = torch.Generator().manual_seed(0)

    def cond():
        return [[torch.randn(1, 77, 768, generator=gen), {}]]

    positive, negative = cond(), cond()
    concepts = [cond() for _ in range(3)]

    identity_net = hgr_net.HGRNet(hgr_net.HGRConfig())
    learned_net = hgr_net.HGRNet(hgr_net.HGRConfig())
    torch.nn.init.normal_(learned_net.conv_out.weight, std=0.02)
    n_hgr = sum(p.numel() for p in learned_net.parameters())
    # with a rewriter whose gate is always open (as the bundled toy one has): both once-per-run passes run
    text_net = text_hgr.TextHGRNet(text_hgr.TextHGRConfig(embed_dim=768, tokens=77, rewrite=1), negative[0][0][0])
    torch.nn.init.normal_(text_net.out.weight, std=0.02)
    torch.nn.init.normal_(text_net.rewriter.out.weight, std=0.02)
    text_net.rewrite_gate.copy_(torch.tensor([-2.0, -1.0]))
    n_text = sum(p.numel() for p in text_net.parameters())

    def handle_for(name):
        if name == "identity_hgr":
            return hgr_type.HGRHandle(hgr_net.LearnedHGR(identity_net), name=name)
        if name == "learned_hgr":
            return hgr_type.HGRHandle(hgr_net.LearnedHGR(learned_net), name=name)
        if name == "text_hgr":
            return hgr_type.handle_for(text_hgr.TextHGR(text_net, family="SD15"), name)
        k = int(name.split("_")[1])
        # threshold -1: every concept gate is open, so the redirection math always runs
        red = redirect.ConceptRedirector(k, tau=-1.0)
        return hgr_type.HGRHandle(red, name=name, concept_conds=concepts[:k])

    configs = ["plain_cfg", "identity_hgr", "learned_hgr", "text_hgr", "concept_1", "concept_3"]
    guiders = {}
    for name in configs:
        if name == "plain_cfg":
            g = comfy.samplers.CFGGuider(mp)
        else:
            g = sampling.SafeCFGGuider(mp, handle_for(name), 1.0, 0.0, 1.0)
        g.set_conds(positive, negative)
        g.set_cfg(7.0)
        guiders[name] = g

    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "normal", args.steps)
    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))

    def run(name):
        with torch.no_grad():
            return guiders[name].sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=1)

    print(f"[bench] UNet {n_unet / 1e6:.0f} M params, HGR {n_hgr / 1e6:.2f} M params; warm-up ...", flush=True)
    times, peaks = interleaved_rounds(configs, run, args.rounds, args.steps, device)

    med = {n: statistics.median(times[n]) for n in configs}
    # the ratio of each round (same machine state for both), then the median over rounds
    ratios = {n: statistics.median(t / p for t, p in zip(times[n], times["plain_cfg"]))
              for n in configs if n != "plain_cfg"}
    targets = {"identity_hgr": TARGET_LATENT, "learned_hgr": TARGET_LATENT, "text_hgr": TARGET_TEXT,
               "concept_1": TARGET_HGR * 3 / 2, "concept_3": TARGET_HGR * 5 / 2}
    print()
    print(f"Per-step sampling time, SD1.5 UNet ({n_unet / 1e6:.0f} M params, random weights), latent "
          f"{args.latent}x{args.latent}, batch 1, {args.steps} Euler steps, median of {args.rounds} rounds, {device}")
    print(f"{'configuration':<14} {'s/step':>8} {'ratio':>7} {'target':>7} {'peak MiB':>9}  ok")
    print(f"{'plain_cfg':<14} {med['plain_cfg']:>8.3f} {1.0:>7.3f} {'':>7} {peaks['plain_cfg']:>9.0f}")
    ok_all = True
    for n in configs[1:]:
        ok = ratios[n] <= targets[n]
        ok_all &= ok
        print(f"{n:<14} {med[n]:>8.3f} {ratios[n]:>7.3f} {targets[n]:>7.3f} {peaks[n]:>9.0f}  {'yes' if ok else 'NO'}")
    result = {
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "targets": targets,
        "seconds_per_step": {k: round(v, 4) for k, v in med.items()},
        "peak_memory_mb": {k: round(v, 1) for k, v in peaks.items()},
        "setup": {"unet": "SD1.5 architecture, random weights", "unet_params": n_unet, "hgr_params": n_hgr,
                  "text_hgr_params": n_text,
                  "latent": [4, args.latent, args.latent], "batch": 1, "steps": args.steps, "rounds": args.rounds,
                  "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu_count": os.cpu_count()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}; all targets met: {ok_all}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
