"""Prompt data for training an HGR: harmful prompts with their safe rewrites (and categories), and
clean prompts, as editable JSON files (``data/*.json``). Plain Python."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PromptData:
    """Harmful prompts with their safe rewrites (and categories), and clean prompts."""

    harmful: list[str]
    safe: list[str]
    categories: list[str]
    clean: list[str]

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptData:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        pairs = d.get("pairs", [])
        bad = [p for p in pairs if not (isinstance(p, dict) and p.get("harmful") and p.get("safe"))]
        if bad or not pairs or not d.get("clean"):
            raise ValueError(f"{path}: needs 'pairs' [{{harmful, safe, category}}] and 'clean' [...]; "
                             f"{len(bad)} malformed pairs")
        return cls([p["harmful"] for p in pairs], [p["safe"] for p in pairs],
                   [p.get("category", "harmful") for p in pairs], list(d["clean"]))

    @property
    def category_names(self) -> list[str]:
        return sorted(set(self.categories))
