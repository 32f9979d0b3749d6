"""``python -m toyworld.stamp``: record in the bundled toy HGR files (weights/hgr/toyworld/) the model
they were trained for, the toy UNet's fingerprint (``safecfg.model_id``), marked as the toy model. The
weights stay byte-identical. `commands.train_hgr --toy` stamps the files it writes the same way."""

from __future__ import annotations

from pathlib import Path

from .session import start

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    start()
    from safecfg_pack.safecfg.hgr_file import load_hgr, stamp_trained_for
    from safecfg_pack.toyworld.models import toy_fingerprint

    fp = toy_fingerprint()
    for path in sorted((REPO / "weights" / "hgr" / "toyworld").glob("*.safetensors")):
        stamp_trained_for(path, fp)
        assert load_hgr(path).trained_for == {**fp, "name": fp["name"]}
        print(f"stamped {path.relative_to(REPO)}: trained for {fp['name']} ({fp['arch']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
