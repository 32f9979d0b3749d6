"""Which model an HGR was trained for: a fingerprint of the denoiser's weights.

A fingerprint has two parts. ``arch`` hashes every parameter's name and shape (the architecture, the
same in any dtype); ``probe`` holds a few dozen weight values taken at fixed places (bias vectors,
which LoRAs leave alone). Two fingerprints name the same model when the architectures are equal and
the probes agree to a few percent, so a checkpoint loaded in fp16, bf16 or fp32 matches itself,
while another fine-tune of the same architecture does not. Read from fp8 weights, the probes agree
only to about 6 %, so such a fingerprint is marked ``lossy`` and compared more loosely; the scale
parameters that scaled-fp8 checkpoints add are not part of the architecture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

PROBE_TENSORS = 8
PROBE_VALUES = 8
#: relative mean difference of the probes under which two models count as the same
PROBE_TOLERANCE = 0.02
#: the same where either side was read from 8-bit float weights (fp8 e4m3 rounds to about 6 %)
PROBE_TOLERANCE_LOSSY = 0.08
#: parameters that quantised (scaled fp8) checkpoints add beside the weights: not the architecture
QUANT_SUFFIXES = ("scale_weight", "scale_input", "weight_scale", "input_scale", "comfy_quant")


def fingerprint(named: Mapping[str, torch.Tensor], *, value_of: Callable[[str], torch.Tensor] | None = None,
                name: str = "") -> dict:
    """The fingerprint of a denoiser's parameters ``named`` (name -> tensor). ``value_of(name)``, when
    given, returns the tensor to probe instead (e.g. a weight's unpatched original)."""
    keys = sorted(k for k in named if not k.endswith(QUANT_SUFFIXES))
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{k}:{tuple(named[k].shape)};".encode())
    big = [k for k in keys if named[k].numel() >= PROBE_VALUES]
    step = max(1, len(big) // PROBE_TENSORS)
    probe, lossy = [], False
    for k in big[::step][:PROBE_TENSORS]:
        t = value_of(k) if value_of is not None else named[k]
        lossy = lossy or (t.dtype.is_floating_point and t.dtype.itemsize == 1)
        probe += [round(float(v), 6) for v in t.detach().flatten()[:PROBE_VALUES].float().cpu()]
    out = {"arch": h.hexdigest()[:16], "probe": probe}
    if lossy:
        out["lossy"] = True
    if name:
        out["name"] = name
    return out


def short_id(fp: Mapping) -> str:
    """A short readable id: the architecture hash and a hash of the rounded probe."""
    probe = ",".join(f"{v:.2g}" for v in fp.get("probe", []))
    return f"{fp.get('arch', '?')[:8]}-{hashlib.sha256(probe.encode()).hexdigest()[:6]}"


def describe(fp: Mapping) -> str:
    name = fp.get("name")
    return f"{name} ({short_id(fp)})" if name else f"model {short_id(fp)}"


def same_model(a: Mapping, b: Mapping) -> bool:
    if a.get("arch") != b.get("arch"):
        return False
    pa, pb = a.get("probe") or [], b.get("probe") or []
    if len(pa) != len(pb):
        return False
    if not pa:
        return True
    ta, tb = torch.tensor(pa, dtype=torch.float64), torch.tensor(pb, dtype=torch.float64)
    scale = float(ta.abs().mean() + tb.abs().mean()) / 2 + 1e-8
    tol = PROBE_TOLERANCE_LOSSY if a.get("lossy") or b.get("lossy") else PROBE_TOLERANCE
    return float((ta - tb).abs().mean()) / scale <= tol
