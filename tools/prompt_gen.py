"""PG, the embedded backend: an editing instruction composed from the knowledge entry.

Why templates: the embedded IG engine reads the shared vocabulary (tools/vocabulary.py), so the best
instruction for it is one written in exactly those words. The knowledge entry gives the defect's shape
and typical look; a seeded generator varies size, contrast, softness and position around it (every word
of a scale keeps some weight, the typical one the most), so a batch spans the type's range instead of
repeating one defect; feedback (a QE review or a policy's note) is applied last, so a rework really
changes things.
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

#: Relative weight of a size or contrast word by its distance from the knowledge entry's typical word:
#: real defects of one type range from barely visible to blatant and from specks to large areas, so every
#: word keeps some weight.
_SIZE_WEIGHTS = (1.0, 0.9, 0.8, 0.7)
_CONTRAST_WEIGHTS = (1.0, 0.75, 0.55)
#: Share of instructions that ask for the other edge softness than the entry's typical one.
_OTHER_SOFTNESS = 0.3

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
        size = _around(SIZES, typical.get("size", "medium"), _SIZE_WEIGHTS, rng)
        contrast = _around(CONTRASTS, typical.get("contrast", "medium"), _CONTRAST_WEIGHTS, rng)
        softness = typical.get("softness") if typical.get("softness") in SOFTNESSES else (
            "soft" if SHAPE_FAMILIES[shape] == "blob" else "sharp"
        )
        if rng.random() < _OTHER_SOFTNESS:
            softness = step(SOFTNESSES, softness, 1 if softness == SOFTNESSES[0] else -1)
        position = typical.get("position") or str(rng.choice(_FREE_POSITIONS))
        return DefectSpec(
            shape=shape,
            family=SHAPE_FAMILIES[shape],
            position=position if position in POSITIONS else "anywhere",
            size=size,
            contrast=contrast,
            softness=softness,
            colour=typical.get("colour") if typical.get("colour") in COLOURS else "dark",
            region=entry.region if entry else None,
        )


def _around(values: tuple[str, ...], typical: str, weights: tuple[float, ...], rng: np.random.Generator) -> str:
    """A word of the ordered scale `values`, most often `typical`, less often the further it is from it
    (`weights[d]` for distance d): a type keeps its typical look but spans the whole scale."""
    centre = values.index(typical) if typical in values else len(values) // 2
    w = np.array([weights[min(abs(i - centre), len(weights) - 1)] for i in range(len(values))])
    return values[int(rng.choice(len(values), p=w / w.sum()))]


def _best_entry(entries: list[KnowledgeEntry]) -> KnowledgeEntry | None:
    exact = [e for e in entries if e.match == "exact"]
    return (exact or entries or [None])[0]


def _shape_from_type(anomaly_type: str) -> str:
    """A vocabulary noun from a defect type name when no knowledge is at hand (e.g. 'scratch_head')."""
    return find_shape(anomaly_type) or "stain"
