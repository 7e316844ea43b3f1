"""The instruction vocabulary shared by PG, IG, QE and the policy.

Why one module: PG writes editing instructions, the embedded IG engine reads them, QE's review names
fixes in them, and the scripted policy applies those fixes to the prompt. If each of these had its own
word lists, a review saying "too faint" could ask for a word that IG never reads, and refinement would
not move the result. Everything that turns words into parameters, or parameters into words, lives here.

An instruction is plain English, e.g.::

    Add one small dark scratch with sharp edges, high contrast, in the top-left of the object.

`parse_instruction` reads it into a `DefectSpec`; `render_instruction` writes a spec back as text;
`apply_fixes` changes the attributes a review asked for and keeps the rest.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

Family = Literal["line", "blob", "hole", "missing", "deformation", "texture"]
Size = Literal["tiny", "small", "medium", "large"]
Contrast = Literal["low", "medium", "high"]
Softness = Literal["sharp", "soft"]
Outline = Literal["smooth", "ragged"]
Interior = Literal["uniform", "mottled", "textured"]
Noise = Literal["match"]

SIZES: tuple[Size, ...] = ("tiny", "small", "medium", "large")
CONTRASTS: tuple[Contrast, ...] = ("low", "medium", "high")
SOFTNESSES: tuple[Softness, ...] = ("sharp", "soft")
OUTLINES: tuple[Outline, ...] = ("smooth", "ragged")
INTERIORS: tuple[Interior, ...] = ("uniform", "mottled", "textured")
NOISES: tuple[Noise, ...] = ("match",)

#: Attributes whose word, when the instruction has none, leaves the engine its broad distribution.
SAMPLED_ATTRIBUTES: tuple[str, ...] = ("size", "contrast", "softness")

#: Defect nouns the engine draws, each with its family. Order matters for parsing: longer,
#: more specific words first, so "metal contamination" is not read as "metal".
SHAPE_FAMILIES: dict[str, Family] = {
    "scratch": "line",
    "crack": "line",
    "cut": "line",
    "thread": "line",
    "fibre": "line",
    "hair": "line",
    "print": "line",
    "stroke": "line",
    "stain": "blob",
    "contamination": "blob",
    "discoloration": "blob",
    "liquid": "blob",
    "oil": "blob",
    "glue": "blob",
    "rough": "blob",
    "hole": "hole",
    "pit": "hole",
    "poke": "hole",
    "dent": "hole",
    "missing": "missing",
    "broken": "missing",
    "chip": "missing",
    "bent": "deformation",
    "squeeze": "deformation",
    "fold": "deformation",
    "misplaced": "deformation",
    "flip": "deformation",
    "texture": "texture",
}

#: Synonyms folded onto the nouns above before parsing.
SHAPE_SYNONYMS: dict[str, str] = {
    "scratches": "scratch",
    "cracks": "crack",
    "cracked": "crack",
    "fracture": "crack",
    "cuts": "cut",
    "slit": "cut",
    "threads": "thread",
    "fiber": "fibre",
    "hairs": "hair",
    "stains": "stain",
    "spot": "stain",
    "smudge": "stain",
    "dirt": "contamination",
    "particle": "contamination",
    "particles": "contamination",
    "debris": "contamination",
    "colour change": "discoloration",
    "color change": "discoloration",
    "discolouration": "discoloration",
    "discolored": "discoloration",
    "discoloured": "discoloration",
    "holes": "hole",
    "puncture": "poke",
    "pinhole": "pit",
    "imprint": "print",
    "chipped": "chip",
    "squeezed": "squeeze",
    "deformed": "bent",
}

POSITIONS: tuple[str, ...] = (
    "top-left",
    "top-right",
    "bottom-left",
    "bottom-right",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "edge",
    "anywhere",
)

#: Position words and their synonyms, read as one of `POSITIONS`.
POSITION_SYNONYMS: dict[str, str] = {
    "upper left": "top-left",
    "upper-left": "top-left",
    "upper right": "top-right",
    "upper-right": "top-right",
    "lower left": "bottom-left",
    "lower-left": "bottom-left",
    "lower right": "bottom-right",
    "lower-right": "bottom-right",
    "top left": "top-left",
    "top right": "top-right",
    "bottom left": "bottom-left",
    "bottom right": "bottom-right",
    "upper": "top",
    "lower": "bottom",
    "middle": "center",
    "centre": "center",
    "central": "center",
    "rim": "edge",
    "border": "edge",
    "boundary": "edge",
    "periphery": "edge",
}

SIZE_SYNONYMS: dict[str, Size] = {
    "tiny": "tiny",
    "minute": "tiny",
    "small": "small",
    "little": "small",
    "short": "small",
    "medium": "medium",
    "moderate": "medium",
    "mid-sized": "medium",
    "large": "large",
    "big": "large",
    "long": "large",
    "extensive": "large",
}

CONTRAST_SYNONYMS: dict[str, Contrast] = {
    "low contrast": "low",
    "low-contrast": "low",
    "faint": "low",
    "subtle": "low",
    "medium contrast": "medium",
    "medium-contrast": "medium",
    "high contrast": "high",
    "high-contrast": "high",
    "strong": "high",
    "pronounced": "high",
    "clearly visible": "high",
}

SOFTNESS_SYNONYMS: dict[str, Softness] = {
    "sharp edges": "sharp",
    "sharp-edged": "sharp",
    "crisp": "sharp",
    "soft edges": "soft",
    "soft-edged": "soft",
    "blurred": "soft",
    "diffuse": "soft",
    "feathered": "soft",
}

#: Outline words: how regular the defect's boundary is.
OUTLINE_SYNONYMS: dict[str, Outline] = {
    "smooth outline": "smooth",
    "clean outline": "smooth",
    "regular outline": "smooth",
    "ragged": "ragged",
    "jagged outline": "ragged",
    "frayed": "ragged",
    "torn": "ragged",
    "irregular outline": "ragged",
}

#: Interior words: how much the defect's inside varies (never a flat fill; "uniform" is the least).
INTERIOR_SYNONYMS: dict[str, Interior] = {
    "uniform interior": "uniform",
    "evenly coloured": "uniform",
    "mottled": "mottled",
    "blotchy": "mottled",
    "patchy": "mottled",
    "textured": "textured",
    "grainy": "textured",
    "granular": "textured",
}

#: Camera words: the defect carries the image's own noise, blur and compression (QE asks for it when an
#: image backend left them out).
NOISE_SYNONYMS: dict[str, Noise] = {"image's own grain": "match", "matching grain": "match", "matching noise": "match"}

#: Colour words and the RGB they stand for. "dark" and "light" mean relative to the surface.
COLOURS: dict[str, tuple[int, int, int] | None] = {
    "dark": None,
    "light": None,
    "black": (25, 25, 25),
    "white": (235, 235, 230),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "brown": (110, 72, 40),
    "red": (170, 40, 35),
    "orange": (215, 120, 40),
    "yellow": (210, 190, 60),
    "green": (60, 130, 60),
    "blue": (50, 80, 170),
    "purple": (110, 60, 140),
    "pink": (220, 130, 160),
    "rust": (150, 75, 35),
    "metallic": (175, 175, 185),
    "transparent": None,
}

_NUMBER_WORDS = {"one": 1, "a": 1, "an": 1, "single": 1, "two": 2, "three": 3, "four": 4, "several": 3}


class DefectSpec(BaseModel):
    """A structured reading of an editing instruction; everything IG needs to draw one defect."""

    shape: str = Field(description="Defect noun, a key of SHAPE_FAMILIES.")
    family: Family
    position: str = "anywhere"
    size: Size = "medium"
    contrast: Contrast = "medium"
    softness: Softness = "sharp"
    colour: str = "dark"
    count: int = Field(default=1, ge=1, le=4)
    region: str | None = Field(default=None, description="Named sub-region from the knowledge base, e.g. 'rim'.")
    outline: Outline | None = Field(default=None, description="Boundary regularity; None: the engine samples it.")
    interior: Interior | None = Field(default=None, description="Interior variation; None: the engine samples it.")
    noise: Noise | None = Field(default=None, description="'match': keep the image's own grain (for backends that lose it).")
    unstated: list[str] = Field(
        default_factory=list,
        description="Attributes of SAMPLED_ATTRIBUTES the instruction named no word for: the engine then draws "
        "them from the type's broad distribution instead of the default word's narrower one.",
    )


class Fix(BaseModel):
    """One change a review asks for, in this vocabulary (attribute ∈ DefectSpec's fields)."""

    attribute: Literal["position", "size", "contrast", "softness", "colour", "count", "region", "outline", "interior", "noise"]
    value: str
    reason: str = ""


def _normalise(text: str) -> str:
    text = text.lower().replace("_", " ")
    return re.sub(r"\s+", " ", text)


def _find_first(text: str, table: dict[str, str]) -> str | None:
    """Value of the earliest key of `table` that occurs in `text` as whole words (longest key wins ties)."""
    best: tuple[int, int, str] | None = None
    for key, value in table.items():
        match = re.search(rf"(?<![a-z-]){re.escape(key)}(?![a-z])", text)
        if match:
            candidate = (match.start(), -len(key), value)
            if best is None or candidate < best:
                best = candidate
    return best[2] if best else None


def find_shape(text: str) -> str | None:
    """The defect noun named in `text`, synonyms folded, or None."""
    text = _normalise(text)
    table = {word: word for word in SHAPE_FAMILIES} | SHAPE_SYNONYMS
    return _find_first(text, table)


def parse_instruction(text: str, default_shape: str = "stain", region: str | None = None) -> DefectSpec:
    """Read an editing instruction into a `DefectSpec`.

    Args:
        text: The instruction, as PG or a policy wrote it.
        default_shape: The noun used when the text names none (usually the anomaly type's shape).
        region: A knowledge-base sub-region to keep when the text does not name one.

    Returns:
        The spec; attributes the text does not mention keep their defaults.
    """
    norm = _normalise(text)
    shape = find_shape(norm) or default_shape
    family = SHAPE_FAMILIES.get(shape, "blob")
    position = _find_first(norm, {p: p for p in POSITIONS} | POSITION_SYNONYMS) or "anywhere"
    size = _find_first(norm, SIZE_SYNONYMS)
    contrast = _find_first(norm, CONTRAST_SYNONYMS)
    softness = _find_first(norm, SOFTNESS_SYNONYMS)
    unstated = [name for name, word in (("size", size), ("contrast", contrast), ("softness", softness)) if word is None]
    colour = _find_first(norm, {c: c for c in COLOURS}) or "dark"
    count_word = _find_first(norm, {w: str(n) for w, n in _NUMBER_WORDS.items() if w not in ("a", "an")})
    count = int(count_word) if count_word else 1
    region_match = re.search(r"\bon the ([a-z]+(?: [a-z]+)?) region\b", norm)
    return DefectSpec(
        shape=shape,
        family=family,
        position=position,
        size=size or "medium",
        contrast=contrast or "medium",
        softness=softness or ("soft" if family == "blob" else "sharp"),
        colour=colour,
        count=count,
        region=region_match.group(1) if region_match else region,
        outline=_find_first(norm, OUTLINE_SYNONYMS),
        interior=_find_first(norm, INTERIOR_SYNONYMS),
        noise=_find_first(norm, NOISE_SYNONYMS),
        unstated=unstated,
    )


_COUNT_TEXT = {1: "one", 2: "two", 3: "three", 4: "four"}


def render_instruction(spec: DefectSpec, subject: str = "the object") -> str:
    """Write a spec as the instruction text that `parse_instruction` reads back to the same spec."""
    noun = spec.shape if spec.count == 1 else f"{spec.shape}{'es' if spec.shape.endswith(('ch', 'sh')) else 's'}"
    where = "anywhere on" if spec.position == "anywhere" else f"in the {spec.position} of"
    region = f" on the {spec.region} region" if spec.region else ""
    look = [f"a {spec.outline} outline" if spec.outline == "smooth" else "a ragged outline"] if spec.outline else []
    look += [f"a {spec.interior} interior"] if spec.interior else []
    look += ["the image's own grain"] if spec.noise else []
    details = f", {' and '.join(look)}" if look else ""
    return (
        f"Add {_COUNT_TEXT[spec.count]} {spec.size} {spec.colour} {noun} with {spec.softness} edges, "
        f"{spec.contrast} contrast{details}, {where} {subject}{region}."
    )


def apply_fixes(spec: DefectSpec, fixes: list[Fix]) -> DefectSpec:
    """Return `spec` with each fix's attribute set to its value; values outside the vocabulary are ignored."""
    allowed: dict[str, tuple[str, ...]] = {
        "size": SIZES,
        "contrast": CONTRASTS,
        "softness": SOFTNESSES,
        "position": POSITIONS,
        "colour": tuple(COLOURS),
        "outline": OUTLINES,
        "interior": INTERIORS,
        "noise": NOISES,
    }
    update: dict[str, object] = {}
    for fix in fixes:
        value = fix.value.strip().lower()
        if fix.attribute == "count":
            if value.isdigit() and 1 <= int(value) <= 4:
                update["count"] = int(value)
        elif fix.attribute == "region":
            update["region"] = value or None
        elif value in allowed[fix.attribute]:
            update[fix.attribute] = value
    if update:
        update["unstated"] = [a for a in spec.unstated if a not in update]
    return spec.model_copy(update=update)


def step(values: tuple[str, ...], current: str, delta: int) -> str:
    """The value `delta` places from `current` along an ordered scale, clamped at its ends."""
    index = values.index(current) if current in values else len(values) // 2
    return values[max(0, min(len(values) - 1, index + delta))]


def format_fixes(fixes: list[Fix]) -> str:
    """Fixes as the one line a review ends with: ``Fixes: contrast=high; position=center``."""
    return "Fixes: " + "; ".join(f"{fix.attribute}={fix.value}" for fix in fixes) if fixes else ""


def parse_fixes(text: str) -> list[Fix]:
    """Read ``attribute=value`` pairs (as `format_fixes` writes them) from free text; unknown ones are skipped."""
    attributes = set(Fix.model_fields["attribute"].annotation.__args__)  # type: ignore[union-attr]
    fixes = []
    for attribute, value in re.findall(r"\b([a-z]+)\s*=\s*([a-z0-9-]+)", text.lower()):
        if attribute == "color":
            attribute = "colour"
        if attribute in attributes:
            fixes.append(Fix(attribute=attribute, value=value))
    return fixes
