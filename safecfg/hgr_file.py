"""HGR weight files: ``.safetensors`` with metadata, written atomically and validated on load.

The header is parsed and checked by this module *before* any tensor is read, so a truncated,
hostile or mismatched file fails with a message naming the file, the problem and the fix, runs no
code and never allocates more than the (bounded) architecture it declares.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .hgr_net import HGRConfig, HGRNet, LearnedHGR, count_params
from .text_hgr import TextHGR, TextHGRConfig, TextHGRNet, count_text_params

FORMAT = "safecfg.hgr"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_METADATA_VALUE = 256 * 1024
MAX_PARAMS = 64_000_000
ALLOWED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
REQUIRED_META = ("format", "format_version", "arch", "latent_channels", "latent_format")
#: a text-embedding HGR (``kind`` "text", the paper's form) records its text encoder's layout instead
REQUIRED_TEXT_META = ("format", "format_version", "kind", "arch", "family", "embed_dim", "tokens")


class HGRFileError(ValueError):
    """An HGR file cannot be used. The message names the file, what is wrong and the fix."""


def _fail(path, problem: str, fix: str) -> HGRFileError:
    return HGRFileError(f"HGR file '{path}': {problem}. {fix}")


def save_hgr(path: str | os.PathLike, hgr: LearnedHGR | TextHGR, *, base_model: str = "",
             training: dict | None = None, detection: dict | None = None, trained_for: dict | None = None) -> Path:
    """Write ``hgr`` (a latent or a text-embedding HGR) to ``path`` (atomically: a crash never leaves a
    half-written file).

    ``detection`` (optional): the calibrated detector settings, e.g. ``{"threshold": 0.1}``; the
    detector node uses its threshold when set to auto. ``trained_for`` (optional): the fingerprint of
    the model it was trained for (``safecfg.model_id.fingerprint``); by default the one ``hgr``
    was loaded with, if any."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise _fail(path, "the name does not end in .safetensors", "Save HGR files as .safetensors")
    if isinstance(hgr, TextHGR):
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "text", "arch": hgr.config.to_json(),
                "family": hgr.family, "embed_dim": str(hgr.config.embed_dim), "tokens": str(hgr.config.tokens),
                "base_model": base_model, "categories": json.dumps(hgr.categories),
                "training": json.dumps(training or {}, sort_keys=True, default=str)}
        return _write(path, hgr, meta, detection, trained_for)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": hgr.config.to_json(),
        "latent_channels": str(hgr.config.latent_channels),
        "latent_format": hgr.latent_format,
        "latent_frames": str(int(getattr(hgr, "latent_frames", 0))),
        "base_model": base_model,
        "categories": json.dumps(hgr.categories),
        "training": json.dumps(training or {}, sort_keys=True, default=str),
    }
    return _write(path, hgr, meta, detection, trained_for)


def _write(path: Path, hgr, meta: dict, detection: dict | None, trained_for: dict | None = None) -> Path:
    if detection is None and getattr(hgr, "detect_threshold", None) is not None:
        detection = {"threshold": hgr.detect_threshold}
        if getattr(hgr, "detect_levels", None):
            detection["levels"] = hgr.detect_levels
    trained_for = trained_for if trained_for is not None else getattr(hgr, "trained_for", None)
    if trained_for:
        meta["trained_for"] = json.dumps(trained_for, sort_keys=True)
    if detection:
        meta["detection"] = json.dumps(detection, sort_keys=True, default=str)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in hgr.net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomic(path, sd, meta)


def _write_atomic(path: Path, sd: dict, meta: dict) -> Path:
    """Write a safetensors file through a temporary file beside it and a rename, so that a crash or a
    full disk never leaves a half-written file under ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Parse and bound-check a safetensors header. Returns ``(tensors, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file", "Put HGR files in ComfyUI's models/hgr/ folder and pick one from the list")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"the file is {size} bytes, too short for a safetensors header",
                        "The file is truncated or empty; download or train it again")
        (n,) = struct.unpack("<Q", head)
        looks_pickled = head[:4] == b"PK\x03\x04" or (head[0] == 0x80 and 2 <= head[1] <= 5)
        if looks_pickled and (n > MAX_HEADER_BYTES or 8 + n > size or f.read(1) != b"{"):
            raise _fail(path, "this is a PyTorch pickle/zip checkpoint, not safetensors",
                        "Only .safetensors HGR files are accepted (pickles can run code); "
                        "re-save it with safetensors")
        f.seek(8)
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit",
                        "The file is corrupt or not an HGR file")
        if 8 + n > size:
            raise _fail(path, f"header length {n} bytes runs past the end of the {size}-byte file",
                        "The file is truncated or not safetensors; download or train it again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the header is not valid JSON ({e.__class__.__name__})",
                    "The file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise _fail(path, "the header is not a JSON object", "The file is corrupt or not safetensors")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(path, "the metadata is not a string-to-string map", "The file is corrupt")
    data_len = size - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _fail(path, f"tensor entry '{name}' is malformed", "The file is corrupt")
        offs = info["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise _fail(path, f"tensor '{name}' points outside the file (offsets {offs}, data {data_len} bytes)",
                        "The file is truncated or corrupt; download or train it again")
    return header, meta


def load_hgr(path: str | os.PathLike, *, latent_format: str | None = None,
             latent_channels: int | None = None, device: str | torch.device = "cpu",
             family: str | None = None) -> LearnedHGR | TextHGR:
    """Load and validate an HGR file: a latent HGR (``latent_format``/``latent_channels``, when given,
    must match) or a text-embedding one (``kind`` "text"; ``family``, when given, must match)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise _fail(path, "the name does not end in .safetensors",
                    "Only .safetensors HGR files are accepted; re-save the file with safetensors")
    header, meta = read_header(path)
    for k, v in meta.items():
        if len(v) > MAX_METADATA_VALUE:
            raise _fail(path, f"metadata '{k}' is {len(v)} characters (limit {MAX_METADATA_VALUE})",
                        "The file is corrupt or not an HGR file")
    if meta.get("format") == FORMAT and meta.get("kind") == "text":
        return _load_text(path, header, meta, family, device)
    if meta.get("kind", "latent") != "latent":
        raise _fail(path, f"unknown HGR kind {meta.get('kind')!r} (this pack reads 'latent' and 'text')",
                    "Update the SafeCFG pack or re-train the HGR")
    missing = [k for k in REQUIRED_META if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise _fail(path, f"this is not an HGR file (metadata format={meta.get('format')!r}, missing {missing})",
                    "Load an HGR file written by SafeCFG (HGRTrain or `python -m safecfg.train`); "
                    "LoRAs and checkpoints go in their own loaders")
    if meta["format_version"] != FORMAT_VERSION:
        raise _fail(path, f"format version {meta['format_version']!r} is not supported (this pack reads "
                    f"{FORMAT_VERSION!r})", "Update the SafeCFG pack or re-train the HGR")
    try:
        config = HGRConfig.from_json(meta["arch"])
    except (ValueError, TypeError) as e:
        raise _fail(path, f"invalid architecture: {e}", "The file is corrupt or from an incompatible version") from None
    if str(config.latent_channels) != meta["latent_channels"]:
        raise _fail(path, "latent_channels metadata disagrees with the architecture", "The file is corrupt")
    if latent_channels is not None and config.latent_channels != latent_channels:
        raise _fail(path, f"it works on {config.latent_channels}-channel latents but the model has "
                    f"{latent_channels}", "Use an HGR trained for this model family, or train one with HGRTrain")
    if latent_format is not None and meta["latent_format"] != latent_format:
        raise _fail(path, f"it was trained for the {meta['latent_format']!r} latent family but the model is "
                    f"{latent_format!r}", "Use an HGR trained for this model family, or train one with HGRTrain")
    n_params = _count_params_bounded(path, config)
    with torch.device("meta"):
        ref = HGRNet(config).state_dict()
    sd = _checked_tensors(path, header, ref)
    net = HGRNet(config)
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    frames = meta.get("latent_frames", "0")  # files from before video training: images
    if not frames.isdigit() or int(frames) > 4096:
        raise _fail(path, f"'latent_frames' must be a whole number of frames, got {frames[:20]!r}",
                    "The file is corrupt; re-train it")
    hgr = LearnedHGR(net.to(device), latent_format=meta["latent_format"], categories=_categories(meta),
                     name=path.name, latent_frames=int(frames))
    hgr.metadata = dict(meta, n_params=str(n_params))
    hgr.detect_threshold = _detect_threshold(meta.get("detection"))
    hgr.detect_levels = _detect_levels(meta.get("detection"))
    hgr.trained_for = _trained_for(path, meta.get("trained_for"))
    return hgr


def _checked_tensors(path: Path, header: dict, ref: dict) -> dict:
    """The file's tensors, after checking names, shapes, dtypes, sizes and finiteness against ``ref``
    (a state dict on the meta device) from the header alone."""
    expected = {k: tuple(v.shape) for k, v in ref.items()}
    got = {k: tuple(v["shape"]) if isinstance(v["shape"], list) else None for k, v in header.items()}
    missing_keys = sorted(set(expected) - set(got))
    extra_keys = sorted(set(got) - set(expected))
    if missing_keys or extra_keys:
        raise _fail(path, f"weights do not match the architecture (missing {missing_keys[:5]}"
                    f"{'...' if len(missing_keys) > 5 else ''}, unexpected {extra_keys[:5]}"
                    f"{'...' if len(extra_keys) > 5 else ''})", "The file is corrupt or was edited; re-train it")
    for k, shape in expected.items():
        if got[k] != shape:
            raise _fail(path, f"tensor '{k}' has shape {got[k]}, expected {shape}", "The file is corrupt; re-train it")
        dt = header[k]["dtype"]
        if dt not in ALLOWED_DTYPES:
            raise _fail(path, f"tensor '{k}' has dtype {dt}; HGR weights must be F32, F16 or BF16",
                        "The file is corrupt or not an HGR file")
        itemsize = torch.empty((), dtype=ALLOWED_DTYPES[dt]).element_size()
        numel = 1
        for d in shape:
            numel *= d
        a, b = header[k]["data_offsets"]
        if b - a != numel * itemsize:
            raise _fail(path, f"tensor '{k}' occupies {b - a} bytes, expected {numel * itemsize}",
                        "The file is corrupt")
    sd = load_file(str(path), device="cpu")
    for k, v in sd.items():
        if not torch.isfinite(v).all():
            raise _fail(path, f"tensor '{k}' contains NaN or infinite values", "The file is corrupt; re-train it")
    return sd


def _load_text(path: Path, header: dict, meta: dict, family: str | None, device) -> TextHGR:
    missing = [k for k in REQUIRED_TEXT_META if k not in meta]
    if missing:
        raise _fail(path, f"a text HGR file without metadata {missing}", "The file is corrupt; re-train it")
    if meta["format_version"] != FORMAT_VERSION:
        raise _fail(path, f"format version {meta['format_version']!r} is not supported (this pack reads "
                    f"{FORMAT_VERSION!r})", "Update the SafeCFG pack or re-train the HGR")
    try:
        config = TextHGRConfig.from_json(meta["arch"])
    except (ValueError, TypeError) as e:
        raise _fail(path, f"invalid architecture: {e}", "The file is corrupt or from an incompatible version") from None
    if (str(config.embed_dim), str(config.tokens)) != (meta["embed_dim"], meta["tokens"]):
        raise _fail(path, "embed_dim/tokens metadata disagree with the architecture", "The file is corrupt")
    if family is not None and meta["family"] != family:
        raise _fail(path, f"it was trained for the {meta['family']!r} text encoder but the model is {family!r}",
                    "Use an HGR trained for this model family, or train one with HGRTrain")
    n = count_text_params(config)
    if n > MAX_PARAMS:
        raise _fail(path, f"the architecture declares {n} parameters (limit {MAX_PARAMS})",
                    "The file is corrupt or not an HGR file")
    with torch.device("meta"):
        ref = TextHGRNet(config).state_dict()
    sd = _checked_tensors(path, header, ref)
    net = TextHGRNet(config)
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    if config.rewrite and not float(net.rewrite_gate[0]) < float(net.rewrite_gate[1]):
        raise _fail(path, f"the rewrite gate {net.rewrite_gate.tolist()} does not rise (it must be [low, high] "
                    "with low < high)", "The file is corrupt; re-train it")
    hgr = TextHGR(net.to(device), family=meta["family"], categories=_categories(meta), name=path.name)
    hgr.metadata = dict(meta, n_params=str(n))
    hgr.detect_threshold = _detect_threshold(meta.get("detection"))
    hgr.detect_levels = _detect_levels(meta.get("detection"))
    hgr.trained_for = _trained_for(path, meta.get("trained_for"))
    return hgr


def _trained_for(path: Path, raw: str | None) -> dict | None:
    """The fingerprint of the model the file was trained for (``safecfg.model_id``), or None when the
    file records none (files from before the fingerprint was written)."""
    if not raw:
        return None
    try:
        fp = json.loads(raw)
    except json.JSONDecodeError:
        fp = None
    ok = (isinstance(fp, dict) and isinstance(fp.get("arch"), str) and len(fp["arch"]) <= 128
          and isinstance(fp.get("probe"), list)
          and all(isinstance(v, (int, float)) for v in fp["probe"]) and len(fp["probe"]) <= 1024)
    if not ok:
        raise _fail(path, "the 'trained_for' metadata is not a model fingerprint", "The file is corrupt; re-train it")
    # the name goes into log lines and UI messages: printable characters only, 100 at most
    name = "".join(ch for ch in str(fp.get("name", "")) if ch.isprintable())[:100]
    return {"arch": fp["arch"], "probe": [float(v) for v in fp["probe"]], "name": name,
            "toy": bool(fp.get("toy", False)), "lossy": bool(fp.get("lossy", False))}


def stamp_trained_for(path: str | os.PathLike, trained_for: dict) -> Path:
    """Record in an existing HGR file the model it was trained for; the weights stay byte-identical
    (rewritten atomically)."""
    path = Path(path)
    read_header(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    meta["trained_for"] = json.dumps(trained_for, sort_keys=True)
    return _write_atomic(path, sd, meta)


def _categories(meta: dict) -> list[str]:
    try:
        categories = json.loads(meta.get("categories", "[]"))
    except json.JSONDecodeError:
        return []
    return [str(c) for c in categories] if isinstance(categories, list) else []


def _detect_threshold(raw) -> float | None:
    """The calibrated detection threshold in a file's metadata, or None when absent or unusable."""
    try:
        t = float(json.loads(raw)["threshold"]) if raw else None
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None
    return t if t is not None and 0.0 < t < 100.0 else None


def _detect_levels(raw) -> int | None:
    """The noise levels the detection threshold was calibrated at, or None when absent or unusable."""
    try:
        k = json.loads(raw).get("levels") if raw else None
        k = int(k) if k is not None and float(k) == int(k) else None
    except (ValueError, TypeError, AttributeError, json.JSONDecodeError):
        return None
    return k if k is not None and 1 <= k <= 16 else None


def _count_params_bounded(path: Path, config: HGRConfig) -> int:
    n = count_params(config)
    if n > MAX_PARAMS:
        raise _fail(path, f"the architecture declares {n} parameters (limit {MAX_PARAMS})",
                    "The file is corrupt or not an HGR file")
    return n
