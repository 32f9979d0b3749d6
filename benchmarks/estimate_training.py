"""`make bench-train`: what training an HGR for SD1.5 at 512x512 costs, from counted FLOPs.

Counts (torch.utils.flop_counter, on the meta device: nothing is allocated or run) the FLOPs of one
forward of the full-size SD1.5 UNet at a 64x64 latent (512 px) with a 77-token context, and of one
forward+backward of the default HGR network at that size. The teacher cache needs, per prompt,
``steps`` plain-CFG steps (cond + uncond) plus 3 predictions (prompt, safe rewrite, empty) at each
cached state; fitting needs ``FitSpec.steps`` batches. With the I2P prompt data bundled in
``data/i2p_pairs.json`` that gives the total; divided by a sustained throughput (``--tflops``,
stated in the output) it gives the time on one GPU. Also measures this machine's own throughput on
the HGR network (real weights, CPU) for reference.

    python -m benchmarks.estimate_training [--tflops 100] [--out results/train_estimate.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.bench_sampling import SD15_FULL
from devtools import comfy as runtime

REPO = Path(__file__).resolve().parents[1]


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=100.0,
                    help="sustained dense fp16 throughput assumed for the GPU, TFLOP/s (default 100: about a "
                         "third of an A100's fp16 tensor-core peak, a typical sustained figure for UNet inference)")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    ap.add_argument("--out", default=str(REPO / "results" / "train_estimate.json"))
    args = ap.parse_args(argv)

    runtime.start(cpu=True)  # counts FLOPs on the meta device and times the HGR net on the CPU
    import comfy.ldm.modules.attention as attention
    import comfy.supported_models
    import torch

    # count attention as the plain matmuls it is (the memory-saving kernels do the same arithmetic)
    attention.optimized_attention = attention.attention_basic

    from safecfg_pack.safecfg import hgr_net, teacher_cache, train

    cfg = dict(SD15_FULL, image_size=args.latent)
    with torch.device("meta"):
        unet = comfy.supported_models.SD15(cfg).get_model({}, device="meta").diffusion_model
        x = torch.zeros(1, 4, args.latent, args.latent)
        ctx = torch.zeros(1, 77, 768)
        t = torch.zeros(1)
        unet_flops = count_flops(lambda: unet(x, timesteps=t, context=ctx))
        n_unet = sum(p.numel() for p in unet.parameters())

    net_cfg = hgr_net.HGRConfig()
    net = hgr_net.HGRNet(net_cfg)
    n_hgr = sum(p.numel() for p in net.parameters())
    fit = train.FitSpec()
    cache = teacher_cache.CacheSpec()

    # forward + backward of the HGR at the fitting batch
    in_ch = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    xb = torch.randn(fit.batch, in_ch, args.latent, args.latent)
    lsig = torch.zeros(fit.batch)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        net(xb, lsig).square().mean().backward()

    hgr_step_flops = count_flops(fwd_bwd)
    # this machine's own throughput on that step (real weights, for reference)
    t0 = time.perf_counter()
    reps = 2
    for _ in range(reps):
        fwd_bwd()
    cpu_s = (time.perf_counter() - t0) / reps

    data = json.loads((REPO / "data" / "i2p_pairs.json").read_text())
    n_harm = len(data["pairs"]) if "pairs" in data else len(data["harmful"])
    n_clean = len(data.get("clean", []))
    n_prompts = n_harm + n_clean
    per_prompt = cache.steps * 2 + (cache.states_per_trajectory + cache.noised_per_image) * 3
    cache_flops = n_prompts * per_prompt * unet_flops
    fit_flops = fit.steps * hgr_step_flops
    rate = args.tflops * 1e12
    res = {
        "sd15_unet_params": n_unet, "sd15_unet_forward_tflop": unet_flops / 1e12, "latent": args.latent,
        "hgr_params": n_hgr, "hgr_fit_step_gflop": hgr_step_flops / 1e9, "fit_batch": fit.batch,
        "prompts": {"harmful": n_harm, "clean": n_clean}, "unet_forwards_per_prompt": per_prompt,
        "cache_pflop": cache_flops / 1e15, "fit_pflop": fit_flops / 1e15,
        "assumed_tflops": args.tflops,
        "estimate_minutes": {"cache": cache_flops / rate / 60, "fit": fit_flops / rate / 60,
                             "total": (cache_flops + fit_flops) / rate / 60},
        "this_machine": {"hgr_fit_step_seconds": cpu_s,
                         "hgr_fit_gflops_per_s": hgr_step_flops / cpu_s / 1e9,
                         "device": "cpu", "threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"SD1.5 UNet ({n_unet / 1e6:.0f} M params), one forward at {args.latent * 8}x{args.latent * 8}: "
          f"{unet_flops / 1e12:.2f} TFLOP")
    print(f"HGR ({n_hgr / 1e6:.2f} M params), one fitting step (batch {fit.batch}, forward+backward): "
          f"{hgr_step_flops / 1e9:.1f} GFLOP; this machine: {cpu_s:.2f} s/step "
          f"({hgr_step_flops / cpu_s / 1e9:.1f} GFLOP/s)")
    print(f"teacher cache: {n_prompts} prompts x {per_prompt} UNet forwards = {cache_flops / 1e15:.1f} PFLOP; "
          f"fitting: {fit.steps} steps = {fit_flops / 1e15:.2f} PFLOP")
    m = res["estimate_minutes"]
    print(f"at {args.tflops:.0f} TFLOP/s sustained: cache {m['cache']:.1f} min + fit {m['fit']:.1f} min "
          f"= {m['total']:.1f} min on one GPU; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
