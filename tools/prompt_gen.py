"""PG, the embedded backend: an editing instruction composed from the knowledge entry.

Why templates: the embedded IG engine reads the shared vocabulary (tools/vocabulary.py), so the best
instruction for it is one written in exactly those words. The knowledge entry gives the defect's shape
and typical look; a seeded generator varies size and position around it so a batch is not one defect
repeated; feedback (a QE review or a policy's note) is applied last, so a rework really changes things.
"""

from __future__ import annotations

import numpy as np

from tools.types import KnowledgeEntry, PromptRequest
from tools.vocabulary import (
    COLOURS,
    CONTRASTS,
    POSITIONS,
    SHAPE_FAMILIES,
    SIZES,
    SOFTNESSES,
    DefectSpec,
    apply_fixes,
    find_shape,
    parse_fixes,
    render_instruction,
    step,
)

#: Positions drawn when the knowledge entry names none; "anywhere" lets placement choose freely.
_FREE_POSITIONS = ("anywhere", "center", "top-left", "top-right", "bottom-left", "bottom-right", "top", "bottom", "left", "right")


class TemplatePromptGenerator:
    """Writes instructions in the vocabulary the procedural engine reads."""

    def generate(self, request: PromptRequest) -> str:
        """Compose one instruction for `request` (deterministic for its seed)."""
        rng = np.random.default_rng(request.seed)
        spec = self.draft(request, rng)
        if request.feedback:
            spec = apply_fixes(spec, parse_fixes(request.feedback))
        return render_instruction(spec, subject=request.subject)

    @staticmethod
    def draft(request: PromptRequest, rng: np.random.Generator) -> DefectSpec:
        """A first spec from the best knowledge entry, varied by `rng`."""
        entry = _best_entry(request.knowledge)
        typical = entry.typical if entry else {}
        shape = entry.shape if entry and entry.shape in SHAPE_FAMILIES else _shape_from_type(request.anomaly_type)
        size = typical.get("size", "medium")
        if size in SIZES and rng.random() < 0.5:
            size = step(SIZES, size, int(rng.choice([-1, 1])))
        position = typical.get("position") or str(rng.choice(_FREE_POSITIONS))
        return DefectSpec(
            shape=shape,
            family=SHAPE_FAMILIES[shape],
            position=position if position in POSITIONS else "anywhere",
            size=size if size in SIZES else "medium",
            contrast=typical.get("contrast", "medium") if typical.get("contrast") in CONTRASTS else "medium",
            softness=typical.get("softness") if typical.get("softness") in SOFTNESSES else
            ("soft" if SHAPE_FAMILIES[shape] == "blob" else "sharp"),
            colour=typical.get("colour") if typical.get("colour") in COLOURS else "dark",
            region=entry.region if entry else None,
        )


def _best_entry(entries: list[KnowledgeEntry]) -> KnowledgeEntry | None:
    exact = [e for e in entries if e.match == "exact"]
    return (exact or entries or [None])[0]


def _shape_from_type(anomaly_type: str) -> str:
    """A vocabulary noun from a defect type name when no knowledge is at hand (e.g. 'scratch_head')."""
    return find_shape(anomaly_type) or "stain"
