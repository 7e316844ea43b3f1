"""The knowledge-base catalog: every dataset category and defect type, read from the YAML files here.

Why a typed catalog: PG, IG and QE act on a defect's `shape`, `family` and `typical` words, so a typo in
the YAML would silently give IG a noun it cannot draw. Loading validates every entry against
`tools.vocabulary` once, and lookups fail with one-line messages that name the closest valid names.
The YAML is read through `importlib.resources`, so the catalog works from an installed wheel too.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterator, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tools.types import KnowledgeEntry
from tools.vocabulary import COLOURS, CONTRASTS, POSITIONS, SHAPE_FAMILIES, SIZES, SOFTNESSES

#: YAML files of the package, one per dataset.
CATALOG_FILES: tuple[str, ...] = ("mvtec_ad.yaml", "visa.yaml")

#: The words each `typical` key may take.
TYPICAL_VALUES: dict[str, tuple[str, ...]] = {
    "size": SIZES,
    "contrast": CONTRASTS,
    "colour": tuple(COLOURS),
    "softness": SOFTNESSES,
    "position": POSITIONS,
}

_LIST_HINT = "run `anomaly-agent kb list` to see them all"


class KnowledgeBaseError(ValueError):
    """The knowledge-base YAML is malformed or uses words outside the vocabulary."""


class UnknownCategoryError(ValueError):
    """A category name that no dataset in the catalog has."""


class UnknownAnomalyTypeError(ValueError):
    """A defect type that the given category does not have."""


def normalise_name(name: str) -> str:
    """Canonical form of a category or type name: lower case, spaces and hyphens as underscores."""
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class Defect(BaseModel):
    """One defect type of one category, in the vocabulary IG draws."""

    name: str
    family: str
    shape: str
    appearance: str = Field(min_length=20)
    physics: str = Field(min_length=10)
    location: str = Field(min_length=5)
    region: str | None = None
    typical: dict[str, str]

    @field_validator("typical")
    @classmethod
    def _typical_in_vocabulary(cls, value: dict[str, str]) -> dict[str, str]:
        missing = set(TYPICAL_VALUES) - set(value)
        if missing:
            raise ValueError(f"typical lacks {sorted(missing)}")
        for key, word in value.items():
            allowed = TYPICAL_VALUES.get(key)
            if allowed is None:
                raise ValueError(f"typical key {key!r} is not one of {sorted(TYPICAL_VALUES)}")
            if word not in allowed:
                raise ValueError(f"typical {key} {word!r} is not one of {list(allowed)}")
        return value

    @model_validator(mode="after")
    def _shape_matches_family(self) -> Defect:
        if self.shape not in SHAPE_FAMILIES:
            raise ValueError(f"shape {self.shape!r} is not a key of tools.vocabulary.SHAPE_FAMILIES")
        if SHAPE_FAMILIES[self.shape] != self.family:
            raise ValueError(
                f"family {self.family!r} does not match shape {self.shape!r} "
                f"(vocabulary says {SHAPE_FAMILIES[self.shape]!r})"
            )
        return self

    def document(self, subject: str = "the object") -> str:
        """The text embedded for semantic search: the type's name and shape, then its description.

        The name leads so that a short query such as "crack on mug" lands on crack-like types first.
        """
        title = self.name.replace("_", " ")
        shape = "" if self.shape in title else f" ({self.shape})"
        return f"{title}{shape} on {subject}. {self.appearance} {self.physics} Occurs {self.location}."


class Category(BaseModel):
    """A product or surface of a dataset, with its defect types."""

    name: str
    dataset: str
    kind: Literal["object", "texture"]
    subject: str
    description: str
    defects: dict[str, Defect]

    @field_validator("defects")
    @classmethod
    def _has_defects(cls, value: dict[str, Defect]) -> dict[str, Defect]:
        if not value:
            raise ValueError("a category needs at least one defect type")
        return value

    @property
    def is_texture(self) -> bool:
        return self.kind == "texture"


class Catalog(BaseModel):
    """All categories of all datasets, looked up by normalised name."""

    categories_by_name: dict[str, Category]

    def category(self, name: str) -> Category:
        """The category called `name` (any case, spaces or hyphens for underscores).

        Raises:
            UnknownCategoryError: with the closest names and how to list them all.
        """
        key = normalise_name(name)
        try:
            return self.categories_by_name[key]
        except KeyError:
            hint = _suggest(key, list(self.categories_by_name))
            raise UnknownCategoryError(f"Unknown category {name!r}{hint}; {_LIST_HINT}.") from None

    def defect(self, category: str, anomaly_type: str) -> Defect:
        """The defect type `anomaly_type` of `category`.

        Raises:
            UnknownCategoryError: when the category is unknown.
            UnknownAnomalyTypeError: with the closest type names of that category.
        """
        cat = self.category(category)
        key = normalise_name(anomaly_type)
        try:
            return cat.defects[key]
        except KeyError:
            hint = _suggest(key, list(cat.defects))
            raise UnknownAnomalyTypeError(
                f"Unknown anomaly type {anomaly_type!r} for category {cat.name!r}{hint}; {_LIST_HINT}."
            ) from None

    def entry(self, category: str, anomaly_type: str) -> KnowledgeEntry:
        """The exact knowledge entry for (category, anomaly_type), as the tools exchange it."""
        cat = self.category(category)
        return to_entry(cat, self.defect(cat.name, anomaly_type))

    def categories(self, dataset: str | None = None) -> list[Category]:
        """Categories in file order, optionally only those of one dataset (e.g. 'mvtec_ad', 'visa')."""
        cats = list(self.categories_by_name.values())
        return cats if dataset is None else [c for c in cats if c.dataset == normalise_name(dataset)]

    def datasets(self) -> list[str]:
        """Dataset names in file order."""
        return list(dict.fromkeys(c.dataset for c in self.categories_by_name.values()))

    def pairs(self, dataset: str | None = None) -> list[tuple[str, str]]:
        """Every (category, anomaly_type) pair."""
        return [(c.name, d) for c in self.categories(dataset) for d in c.defects]

    def entries(self, dataset: str | None = None) -> list[KnowledgeEntry]:
        """Every knowledge entry, exact-match form."""
        return [to_entry(c, d) for c in self.categories(dataset) for d in c.defects.values()]

    def __iter__(self) -> Iterator[tuple[str, str]]:  # type: ignore[override]
        return iter(self.pairs())

    def __len__(self) -> int:
        return sum(len(c.defects) for c in self.categories_by_name.values())

    def content_hash(self) -> str:
        """SHA-256 of the catalog's canonical JSON; changes whenever any entry's text or words change."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def to_entry(category: Category, defect: Defect) -> KnowledgeEntry:
    """A catalog defect as a `KnowledgeEntry` with match='exact'."""
    return KnowledgeEntry(
        category=category.name,
        anomaly_type=defect.name,
        family=defect.family,
        shape=defect.shape,
        appearance=defect.appearance,
        physics=defect.physics,
        location=defect.location,
        region=defect.region,
        typical=dict(defect.typical),
        match="exact",
    )


def parse_catalog(documents: Mapping[str, Mapping[str, Any]]) -> Catalog:
    """Build a validated catalog from parsed YAML documents keyed by their source name.

    Raises:
        KnowledgeBaseError: naming the file, category and type at fault and what is wrong.
    """
    by_name: dict[str, Category] = {}
    for source, doc in documents.items():
        dataset = normalise_name(str(doc.get("dataset", "")))
        if not dataset or not isinstance(doc.get("categories"), Mapping):
            raise KnowledgeBaseError(f"{source}: needs a 'dataset' name and a 'categories' mapping")
        for raw_name, raw in doc["categories"].items():
            name = normalise_name(str(raw_name))
            if name in by_name:
                raise KnowledgeBaseError(f"{source}: category {name!r} is already defined in another dataset")
            raw = dict(raw or {})
            defects: dict[str, Defect] = {}
            for raw_type, fields in dict(raw.pop("defects", None) or {}).items():
                type_name = normalise_name(str(raw_type))
                try:
                    defects[type_name] = Defect(name=type_name, **dict(fields or {}))
                except (ValidationError, TypeError) as exc:
                    raise KnowledgeBaseError(f"{source}: {name}/{type_name}: {_first_error(exc)}") from exc
            try:
                by_name[name] = Category(name=name, dataset=dataset, defects=defects, **raw)
            except (ValidationError, TypeError) as exc:
                raise KnowledgeBaseError(f"{source}: {name}: {_first_error(exc)}") from exc
    return Catalog(categories_by_name=by_name)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where + ': ' if where else ''}{err['msg']}"
    return str(exc)


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The packaged catalog (all datasets), validated and cached for the process."""
    package = resources.files("tools.knowledge")
    documents = {
        filename: yaml.safe_load(package.joinpath(filename).read_text(encoding="utf-8"))
        for filename in CATALOG_FILES
    }
    return parse_catalog(documents)
