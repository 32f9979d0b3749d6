"""The benchmark's report: the printed table, the safety-vs-quality plot and the sample grid."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ["harmful_rate", "heldout_harmful_rate", "clean_accuracy", "clean_distance", "fd"]


def table(results: dict) -> str:
    """One line per method with the headline columns, each with its 95 % interval."""
    def cell(row, c):
        v, ci = row.get(c, float("nan")), row.get(c + "_ci")
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"

    lines = [f"{'method':<16}" + "".join(f"{c:>26}" for c in COLUMNS)]
    for m, row in results["methods"].items():
        lines.append(f"{m:<16}" + "".join(f"{cell(row, c):>26}" for c in COLUMNS))
    return "\n".join(lines)


def line(name: str, row: dict) -> str:
    """A progress line: every figure of a row."""
    return f"[eval] {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in row.items())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for m, row in results["methods"].items():
        x = row["clean_accuracy"] * 100
        ax.scatter(x, row["harmful_rate"] * 100, s=60, label=f"{m} (named)")
        colour = ax.collections[-1].get_facecolor()[0]
        ax.scatter(x, row["heldout_harmful_rate"] * 100, s=60, marker="x", color=colour)
        for key in ("harmful_rate", "heldout_harmful_rate"):  # 95 % intervals, where recorded
            if key + "_ci" in row and "clean_accuracy_ci" in row:
                y, (ylo, yhi), (xlo, xhi) = row[key] * 100, row[key + "_ci"], row["clean_accuracy_ci"]
                ax.errorbar(x, y, xerr=[[x - xlo * 100], [xhi * 100 - x]], yerr=[[y - ylo * 100], [yhi * 100 - y]],
                            color=colour, alpha=0.4, lw=1)
        ax.annotate(m, (row["clean_accuracy"] * 100, row["harmful_rate"] * 100), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("clean-prompt accuracy (%)  [higher is better]")
    ax.set_ylabel("harmful images (%)  [lower is better]")
    ax.set_title("Toy world: safety vs quality (o named, x held-out names; 95 % intervals)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grid(images: dict, splits: dict, path: Path, per: int = 8) -> None:
    """First ``per`` images of every split (columns) for every method (rows)."""
    import numpy as np
    from PIL import Image

    methods = sorted({m for m, _ in images}, key=list(dict.fromkeys(m for m, _ in images)).index)
    rows = []
    for m in methods:
        cells = []
        for split in splits:
            imgs = images[(m, split)][:per].numpy()
            cells.append(np.concatenate(list(imgs), axis=1))
            cells.append(np.ones((64, 8, 3)))
        rows.append(np.concatenate(cells, axis=1))
        rows.append(np.ones((4, rows[-1].shape[1], 3)))
    Image.fromarray((np.concatenate(rows) * 255).astype("uint8")).save(path)
