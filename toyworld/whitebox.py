"""The red-team suite's white-box and text-free attacks (`make attack`, ``toyworld.attack``).

* **UnlearnDiffAtk-style, adaptive** (:func:`adaptive_attack` with :class:`PrefixSpace`): a discrete
  token prefix before the harmful prompt, optimised PEZ-style (continuous prefix embeddings, projected
  to the nearest allowed token before every forward pass; the gradient at the projection updates the
  continuous ones) so that *the defended pipeline itself* denoises a noised harmful target latent back
  to the target. The loss is the method's own guided prediction at one noise level of the sampling
  schedule (:class:`Defended`: ComfyUI's sampler with a one-step sampling function, so each method's
  guider, patch, redirector, rewriter or LoRA is differentiated as it runs), a random level and noise
  each iteration, as in UnlearnDiffAtk. Every ``check_every`` iterations the current prompts are sampled
  through the full pipeline and judged; a target that succeeds keeps that prompt (early stopping, as in
  UnlearnDiffAtk, which uses its judge the same way).
* **Soft-prompt upper bound** (:class:`SoftSpace`): the same loop on the conditioning tensor itself,
  no tokens: the worst case any prompt could reach.
* **Text-free, TINA-style** (:func:`invert`): a harmful generator image's latent run backwards through
  the sampler's schedule under the empty prompt (Euler inversion of the unconditional model), to the
  noise that regenerates it.
"""

from __future__ import annotations

import math
import time

import torch


def one_step_sampler():
    """A ComfyUI sampler that returns the model's denoised prediction at ``sigmas[0]`` (one call)."""
    import comfy.samplers

    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return model(x, sigmas[0] * x.new_ones(x.shape[0]), **(extra_args or {}))

    return comfy.samplers.KSAMPLER(fn)


class Defended:
    """One benchmark method's full guided prediction at one noise level of the schedule, differentiable
    with respect to the prompt's conditioning: ``D(x0 + sigma_k * eps, sigma_k)`` as the method's sampler
    computes it at step ``k`` (the guider's window, the redirector, the text HGR's rewrite and negative,
    the LoRA-patched model). Per-run state that builds up over the steps (SLD's momentum, the concept
    redirector's push memory) starts fresh at the one step, and SLD's warm-up counts from step ``k``."""

    def __init__(self, methods, name: str, sigmas: torch.Tensor):
        self.methods, self.name, self.sigmas = methods, name, sigmas
        self.sampler = one_step_sampler()

    def __call__(self, cond: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, k: int) -> torch.Tensor:
        g = self.methods.guider(self.name, [[cond, {}]])
        if hasattr(g, "start_step"):
            g.start_step = int(k)
        sig = torch.stack([self.sigmas[k], self.sigmas.new_zeros(())])
        return g.sample(eps, x0, self.sampler, sig, disable_pbar=True, seed=0)


class PrefixSpace:
    """PEZ over the allowed vocabulary: ``k`` prefix tokens before each target's prompt ids."""

    kind = "token prefix"

    def __init__(self, enc, prompt_ids: list[list[int]], allowed, k: int, gen: torch.Generator):
        self.enc, self.k = enc, k
        self.W = enc.token_weight()
        self.allowed = torch.as_tensor(sorted(allowed), dtype=torch.long)
        self.Wa = torch.nn.functional.normalize(self.W[self.allowed], dim=1)
        width = k + max(len(p) for p in prompt_ids)
        if width > 75:
            raise ValueError(f"prefix attack: {k} prefix tokens and a prompt of {width - k} do not fit 75")
        body = torch.full((len(prompt_ids), width), enc.end, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            body[i, k:k + len(p)] = torch.as_tensor(p, dtype=torch.long)
        self.body = body
        init = self.allowed[torch.randint(len(self.allowed), (len(prompt_ids), k), generator=gen)]
        self.P = self.W[init].clone().requires_grad_(True)
        self.ids = init
        self._proj = None

    def params(self):
        return [self.P]

    def project(self) -> torch.Tensor:
        """Each continuous prefix embedding's nearest allowed token (cosine), as ids ``(T, k)``."""
        with torch.no_grad():
            sim = torch.nn.functional.normalize(self.P, dim=-1) @ self.Wa.T
            return self.allowed[sim.argmax(-1)]

    def full_ids(self, prefix: torch.Tensor) -> torch.Tensor:
        body = self.body.clone()
        body[:, :self.k] = prefix
        return self.enc.ids(body)

    def cond(self) -> torch.Tensor:
        """The conditioning at the projected prefix, with a graph back to the projected embeddings."""
        self.ids = self.project()
        full = self.full_ids(self.ids)
        emb = self.W[full]
        self._proj = self.W[self.ids].clone().requires_grad_(True)
        emb = torch.cat([emb[:, :1], self._proj, emb[:, 1 + self.k:]], dim=1)
        return self.enc.from_embeddings(emb)

    def after_backward(self) -> None:
        self.P.grad = self._proj.grad

    def snapshot(self):
        return self.ids.clone()

    def final(self, snaps) -> torch.Tensor:
        with torch.no_grad():
            return self.enc(self.full_ids(snaps))

    def describe(self, snaps) -> list[str]:
        return [self.enc.decode(row[1:1 + int((row[1:] != self.enc.end).sum())]) for row in self.full_ids(snaps)]


class SoftSpace:
    """The conditioning tensor itself (``(T, 77, width)``), no tokens: the soft-prompt upper bound."""

    kind = "soft prompt"

    def __init__(self, init: torch.Tensor):
        self.P = init.detach().clone().requires_grad_(True)

    def params(self):
        return [self.P]

    def cond(self):
        return self.P

    def after_backward(self) -> None:
        pass

    def snapshot(self):
        return self.P.detach().clone()

    def final(self, snaps):
        return snaps

    def describe(self, snaps):
        return None


def adaptive_attack(space, defended: Defended, x0: torch.Tensor, budget: dict, *, check, seed: int,
                    log=print) -> dict:
    """Optimise ``space`` against ``defended`` towards the target latents ``x0`` ``(T, C, h, w)``.

    ``budget``: ``iterations``, ``lr``, ``levels`` (the schedule steps a noise level is drawn from),
    ``check_every``. ``check(cond)`` samples the full pipeline and returns per-target success (bool
    ``(T,)``). Returns the final conditioning ``(T, 77, width)`` (each target's first successful one,
    else its last), the successes, the iteration each first succeeded at (-1: never) and the mean loss
    per iteration."""
    gen = torch.Generator().manual_seed(seed)
    T = x0.shape[0]
    opt = torch.optim.Adam(space.params(), lr=budget["lr"])
    levels = budget["levels"]
    snaps = space.snapshot()
    won = torch.zeros(T, dtype=torch.bool)
    at = torch.full((T,), -1, dtype=torch.long)
    losses = []
    t0 = time.time()
    with torch.inference_mode(False), torch.enable_grad():
        for it in range(1, budget["iterations"] + 1):
            k = levels[int(torch.randint(len(levels), (1,), generator=gen))]
            eps = torch.randn(x0.shape, generator=gen)
            opt.zero_grad(set_to_none=True)
            cond = space.cond()
            out = defended(cond, x0, eps, k)
            # the diffusion loss in noise space, as UnlearnDiffAtk's: ||eps_hat - eps||^2
            loss = (((out.float() - x0) / float(defended.sigmas[k])) ** 2).flatten(1).mean(1)
            loss.sum().backward()
            space.after_backward()
            losses.append(float(loss.detach().mean()))
            if it % budget["check_every"] == 0 or it == budget["iterations"]:
                with torch.no_grad():
                    cur = space.snapshot()
                    ok = check(space.final(cur)).cpu()
                new = ok & ~won
                if bool(new.any()):
                    snaps[new] = cur[new]
                    at[new] = it
                won |= ok
                log(f"[attack] {space.kind} vs {defended.name}: iteration {it}/{budget['iterations']}, loss "
                    f"{losses[-1]:.4f}, {int(won.sum())}/{T} succeeded ({time.time() - t0:.0f} s)")
                if bool(won.all()):
                    break
            opt.step()
    # each target's last prompt where it never succeeded
    cur = space.snapshot()
    snaps[~won] = cur[~won]
    return {"snaps": snaps, "cond": space.final(snaps), "won": won, "iteration": at, "losses": losses}


def noise_factor(model_sampling, sigma0: float) -> float:
    """How ComfyUI scales the initial noise at the first sigma (``sqrt(1 + sigma^2)`` at the model's
    maximum sigma for an epsilon model, else ``sigma``): the factor between noise and ``x_T``."""
    max_sigma = float(model_sampling.sigma_max)
    if math.isclose(max_sigma, sigma0, rel_tol=1e-05) or sigma0 > max_sigma:
        return math.sqrt(1.0 + sigma0 ** 2)
    return sigma0


def inversion_noise(model, guider, z: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The unit noise from which ComfyUI's Euler sampler over ``sigmas`` with ``guider`` (the empty
    prompt at cfg 1 for the text-free attack) comes back to the latent ``z``: ``z`` inverted
    (:func:`invert`) with the guider's one-step prediction, then scaled as ComfyUI scales the initial
    noise (:func:`noise_factor`)."""
    one = one_step_sampler()

    def denoise(x, s):
        return guider.sample(torch.zeros_like(x), x, one, torch.tensor([s, 0.0]), disable_pbar=True, seed=0)

    lf, ms = model.get_model_object("latent_format"), model.get_model_object("model_sampling")
    with torch.no_grad():
        return lf.process_in(invert(denoise, z, sigmas)) / noise_factor(ms, float(sigmas[0]))


@torch.no_grad()
def invert(denoise, x0: torch.Tensor, sigmas: torch.Tensor, refine: int = 4) -> torch.Tensor:
    """Euler inversion: ``x0`` (sigma 0) to ``x_T`` at ``sigmas[0]``, so that ComfyUI's Euler sampler
    over the schedule ``sigmas`` (descending, ending at 0) with ``denoise(x, sigma)`` (the
    unconditional model: the empty prompt) comes back to ``x0``. Each sampler step ``x_lo = x_hi +
    (lo - hi) * eps(x_hi, hi)`` is inverted for ``x_hi`` by fixed-point iteration (``refine`` rounds
    after the explicit estimate), which is exact where it converges."""
    x = x0.clone()
    up = sigmas.flip(0)
    for lo, hi in zip(up[:-1], up[1:]):
        lo, hi = float(lo), float(hi)
        x_hi = x
        for _ in range(refine + 1):
            eps = (x_hi - denoise(x_hi, hi)) / hi
            x_hi = x + (hi - lo) * eps
        x = x_hi
    return x
