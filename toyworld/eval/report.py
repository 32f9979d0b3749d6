"""The benchmark's report: the printed tables, the safety-vs-quality plot and the sample grid."""

from __future__ import annotations

from pathlib import Path

HARMFUL_COLUMNS = [("harmful", "harmful_rate"), ("heldout", "harmful_rate"), ("composed", "harmful_rate"),
                   ("harmful", "lenient_harmful_rate"), ("heldout", "lenient_harmful_rate"),
                   ("composed", "lenient_harmful_rate")]
QUALITY_COLUMNS = [("clean", "clean_accuracy"), ("composed_clean", "clean_accuracy"),
                   ("composed", "clean_object_kept"), ("harmful", "redirect_fidelity"),
                   ("heldout", "redirect_fidelity"), ("clean", "clean_distance"), ("clean", "fd")]
TITLES = {"harmful_rate": "harmful", "lenient_harmful_rate": "lenient", "clean_accuracy": "accuracy",
          "clean_object_kept": "clean kept", "redirect_fidelity": "redirect fid.", "clean_distance": "distance",
          "fd": "Frechet"}


def cell(row: dict, split: str, key: str) -> str:
    r = row.get(split, {})
    v, ci = r.get(key), r.get(key + "_ci")
    if v is None:
        return "-"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def _table(results: dict, columns) -> str:
    heads = [f"{TITLES[k]} ({s})" for s, k in columns]
    if not heads:
        return ""
    width = max(26, max(len(h) for h in heads) + 2)
    lines = [f"{'method':<18}" + "".join(f"{h:>{width}}" for h in heads)]
    for m, row in results["methods"].items():
        lines.append(f"{m:<18}" + "".join(f"{cell(row, s, k):>{width}}" for s, k in columns))
    return "\n".join(lines)


def table(results: dict) -> str:
    """Two tables, one line per method, each figure with its 95 % interval: harmful rates (strict
    judge, then lenient) and quality."""
    methods = results["methods"].values()
    cols = [c for c in HARMFUL_COLUMNS if any(c[0] in r for r in methods)]
    qcols = [c for c in QUALITY_COLUMNS if any(c[1] in r.get(c[0], {}) for r in methods)]
    if not cols and not qcols:  # other splits (calibration): each split's headline figures
        keys = ("harmful_rate", "clean_accuracy", "clean_distance")
        cols = [(s, k) for s in dict.fromkeys(s for r in methods for s, v in r.items() if isinstance(v, dict))
                for k in keys if any(k in r.get(s, {}) for r in methods)]
        return _table(results, cols)
    return _table(results, cols) + "\n\n" + _table(results, qcols)


def line(name: str, row: dict) -> str:
    """A progress line: each split's headline figure."""
    parts = []
    for split, r in row.items():
        if not isinstance(r, dict):
            continue
        for key in ("harmful_rate", "clean_accuracy", "clean_object_kept", "redirect_fidelity"):
            if key in r:
                parts.append(f"{split}.{key} {r[key]:.3f}")
    return f"[eval] {name} ({row.get('setting')}): " + ", ".join(parts) + f" ({row.get('seconds')} s)"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    markers = {"harmful": "o", "heldout": "x", "composed": "^"}
    for m, row in results["methods"].items():
        if "clean" not in row:
            continue
        x = row["clean"]["clean_accuracy"] * 100
        xlo, xhi = (v * 100 for v in row["clean"]["clean_accuracy_ci"])
        colour = None
        for split, mk in markers.items():
            if split not in row:
                continue
            y = row[split]["harmful_rate"] * 100
            ylo, yhi = (v * 100 for v in row[split]["harmful_rate_ci"])
            sc = ax.scatter(x, y, s=50, marker=mk, color=colour, label=m if colour is None else None)
            colour = sc.get_facecolor()[0] if colour is None else colour
            ax.errorbar(x, y, xerr=[[max(0, x - xlo)], [max(0, xhi - x)]], yerr=[[max(0, y - ylo)], [max(0, yhi - y)]],
                        color=colour, alpha=0.35, lw=1)
    ax.set_xlabel("clean accuracy, one object (%)  [higher is better]")
    ax.set_ylabel("harmful images, strict judge (%)  [lower is better]")
    ax.set_title("Toy world: o held-out templates, x held-out names, ^ composed (95 % intervals)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grid(images: dict, splits: dict, path: Path, per: int = 6) -> None:
    """First ``per`` images of every split (columns) for every method (rows), labelled; the row
    "plain on safe rewrite" is plain CFG on the harmful prompts' rewrites (the fidelity ceiling, and the
    judge's floor). The prompts are the first ones of each split in eval.json."""
    import numpy as np
    from PIL import Image, ImageDraw

    methods = list(dict.fromkeys(m for m, _ in images))
    label_w, head_h, gap = 150, 16, 8
    col_w = per * 64 + gap
    W, H = label_w + col_w * len(splits), head_h + 68 * len(methods)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for j, split in enumerate(splits):
        draw.text((label_w + j * col_w + 2, 2), split, fill="black")
    for i, m in enumerate(methods):
        y = head_h + i * 68
        draw.text((2, y + 26), m[:24], fill="black")
        for j, split in enumerate(splits):
            if (m, split) not in images:
                continue
            imgs = images[(m, split)][:per].numpy()
            strip = (np.concatenate(list(imgs), axis=1) * 255).astype("uint8")
            canvas.paste(Image.fromarray(strip), (label_w + j * col_w, y))
    canvas.save(path)


#: the README's column heads for :data:`HARMFUL_COLUMNS` and :data:`QUALITY_COLUMNS`, and each figure's
#: scale and digits (rates in percent)
MARKDOWN_HEADS = {("harmful", "harmful_rate"): "harmful, held-out templates (%)",
                  ("heldout", "harmful_rate"): "held-out names (%)", ("composed", "harmful_rate"): "composed (%)",
                  ("clean", "clean_accuracy"): "clean accuracy, one object (%)",
                  ("composed_clean", "clean_accuracy"): "two objects (%)",
                  ("composed", "clean_object_kept"): "clean object kept (% of plain)",
                  ("harmful", "redirect_fidelity"): "redirect fidelity, harmful (% of ceiling)",
                  ("heldout", "redirect_fidelity"): "held-out names (%)", ("clean", "clean_distance"): "clean distance",
                  ("clean", "fd"): "Frechet distance (oracle features)"}
MARKDOWN_FORMAT = {"clean_distance": (1.0, 3), "fd": (1.0, 2)}


def markdown(results: dict) -> str:
    """The README's tables (Markdown) from an eval.json: harmful rates (strict judge; lenient in a
    second table, under the strict heads) and quality, every figure with its 95 % interval."""

    def pct(row, split, key):
        r = row.get(split, {})
        v, ci = r.get(key), r.get(key + "_ci")
        if v is None:
            return "-"
        scale, digits = MARKDOWN_FORMAT.get(key, (100.0, 1))
        s = f"{v * scale:.{digits}f}"
        return s + (f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]" if ci else "")

    def table(columns):
        heads = [MARKDOWN_HEADS[(s, k.removeprefix("lenient_"))] for s, k in columns]
        out = ["| method (setting) | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        for m, row in results["methods"].items():
            name = m + (f" ({row['setting']})" if row.get("setting") else "")
            out.append(f"| {name} | " + " | ".join(pct(row, s, k) for s, k in columns) + " |")
        return "\n".join(out)

    strict = [c for c in HARMFUL_COLUMNS if not c[1].startswith("lenient_")]
    lenient = [c for c in HARMFUL_COLUMNS if c[1].startswith("lenient_")]
    return "\n\n".join([table(strict), table(lenient), table(QUALITY_COLUMNS)])


if __name__ == "__main__":
    import json
    import sys

    print(markdown(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "results/eval.json").read_text())))
