"""The knowledge base: complete, in the shared vocabulary, and retrievable offline from chromadb on disk.

The store tests use the real chromadb and the real all-MiniLM-L6-v2 embedder; one store is built per
module and shared, because embedding the catalog is the slow part.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tools.knowledge.catalog import (
    Catalog,
    KnowledgeBaseError,
    UnknownAnomalyTypeError,
    UnknownCategoryError,
    load_catalog,
    parse_catalog,
)
from tools.types import KnowledgeEntry
from tools.vocabulary import COLOURS, CONTRASTS, POSITIONS, SHAPE_FAMILIES, SIZES, SOFTNESSES

MVTEC_TYPES: dict[str, set[str]] = {
    "bottle": {"broken_large", "broken_small", "contamination"},
    "cable": {
        "bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
        "missing_cable", "missing_wire", "poke_insulation",
    },
    "capsule": {"crack", "faulty_imprint", "poke", "scratch", "squeeze"},
    "carpet": {"color", "cut", "hole", "metal_contamination", "thread"},
    "grid": {"bent", "broken", "glue", "metal_contamination", "thread"},
    "hazelnut": {"crack", "cut", "hole", "print"},
    "leather": {"color", "cut", "fold", "glue", "poke"},
    "metal_nut": {"bent", "color", "flip", "scratch"},
    "pill": {"color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"},
    "screw": {"manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"},
    "tile": {"crack", "glue_strip", "gray_stroke", "oil", "rough"},
    "toothbrush": {"defective"},
    "transistor": {"bent_lead", "cut_lead", "damaged_case", "misplaced"},
    "wood": {"color", "combined", "hole", "liquid", "scratch"},
    "zipper": {
        "broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
        "squeezed_teeth",
    },
}
VISA_CATEGORIES = {
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
}
TEXTURES = {"carpet", "grid", "leather", "tile", "wood"}


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kb")


@pytest.fixture(scope="module")
def store(store_path: Path):
    from tools.knowledge.store import KnowledgeStore

    kb = KnowledgeStore(store_path)
    kb.ensure()
    return kb


# -- catalog ----------------------------------------------------------------------------------------


def test_mvtec_has_the_15_categories_and_exactly_the_73_defect_types(catalog: Catalog):
    found = {c.name: set(c.defects) for c in catalog.categories("mvtec_ad")}
    assert found == MVTEC_TYPES
    assert len(catalog.pairs("mvtec_ad")) == 73


def test_visa_has_its_12_categories_with_4_to_8_types_each(catalog: Catalog):
    cats = catalog.categories("visa")
    assert {c.name for c in cats} == VISA_CATEGORIES
    assert all(4 <= len(c.defects) <= 8 for c in cats), {c.name: len(c.defects) for c in cats}


def test_exactly_the_five_mvtec_textures_are_marked_texture(catalog: Catalog):
    assert {c.name for c in catalog.categories() if c.is_texture} == TEXTURES


def test_every_entry_is_in_the_vocabulary_ig_draws(catalog: Catalog):
    allowed = {"size": SIZES, "contrast": CONTRASTS, "colour": tuple(COLOURS), "softness": SOFTNESSES,
               "position": POSITIONS}
    for category, anomaly_type in catalog:
        entry = catalog.entry(category, anomaly_type)
        assert KnowledgeEntry.model_validate(entry.model_dump()) == entry
        assert entry.match == "exact"
        assert SHAPE_FAMILIES[entry.shape] == entry.family, (category, anomaly_type)
        assert set(entry.typical) == set(allowed)
        assert all(entry.typical[key] in words for key, words in allowed.items()), (category, anomaly_type)


def test_descriptions_are_distinct_within_a_dataset(catalog: Catalog):
    for dataset in catalog.datasets():
        appearances = [catalog.entry(c, t).appearance for c, t in catalog.pairs(dataset)]
        assert len(set(appearances)) == len(appearances)


def test_lookup_ignores_case_spaces_and_hyphens(catalog: Catalog):
    assert catalog.entry("Metal Nut", "COLOR").category == "metal_nut"
    assert catalog.defect("pipe-fryum", "middle breakage").name == "middle_breakage"


def test_unknown_category_error_is_one_line_and_names_the_close_match(catalog: Catalog):
    with pytest.raises(UnknownCategoryError) as info:
        catalog.category("botle")
    message = str(info.value)
    assert "\n" not in message and "'bottle'" in message and "anomaly-agent kb list" in message


def test_unknown_type_error_suggests_types_of_that_category(catalog: Catalog):
    with pytest.raises(UnknownAnomalyTypeError) as info:
        catalog.defect("screw", "scratch")
    message = str(info.value)
    assert "\n" not in message and "'scratch_head'" in message and "'screw'" in message
    assert isinstance(info.value, ValueError)


def _doc(**defect_fields: object) -> dict:
    fields = {
        "family": "line", "shape": "scratch", "appearance": "A thin bright line across the surface.",
        "physics": "Abrasion during handling.", "location": "anywhere",
        "typical": {"size": "small", "contrast": "low", "colour": "light", "softness": "sharp",
                    "position": "anywhere"},
    } | defect_fields
    spoon = {"kind": "object", "subject": "the spoon", "description": "A steel spoon.",
             "defects": {"scratch": fields}}
    return {"dataset": "toy", "categories": {"spoon": spoon}}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"shape": "zigzag"}, "SHAPE_FAMILIES"),
        ({"family": "blob"}, "does not match shape"),
        ({"typical": {"size": "huge", "contrast": "low", "colour": "light", "softness": "sharp",
                      "position": "anywhere"}}, "'huge'"),
    ],
)
def test_yaml_outside_the_vocabulary_is_refused_naming_the_entry(fields: dict, words: str):
    with pytest.raises(KnowledgeBaseError) as info:
        parse_catalog({"toy.yaml": _doc(**fields)})
    assert "toy.yaml: spoon/scratch" in str(info.value) and words in str(info.value)


def test_content_hash_follows_the_text(catalog: Catalog):
    same = parse_catalog({"toy.yaml": _doc()})
    edited = parse_catalog({"toy.yaml": _doc(physics="Contact with a sharp tool.")})
    assert same.content_hash() == parse_catalog({"toy.yaml": _doc()}).content_hash()
    assert same.content_hash() != edited.content_hash()
    assert len(catalog.content_hash()) == 64


# -- store ------------------------------------------------------------------------------------------


def test_store_is_built_once_with_our_embedder(store, catalog: Catalog):
    collection = store.ensure()
    assert store.builds == 1 and collection.count() == len(catalog)
    assert collection.configuration_json["embedding_function"]["name"] == store.embedding.name()


def test_retrieve_puts_the_exact_entry_first_then_semantic_neighbours(store):
    entries = store.retrieve("Bottle", "broken-large", k=3)
    assert len(entries) == 3
    first = entries[0]
    assert (first.category, first.anomaly_type, first.match) == ("bottle", "broken_large", "exact")
    assert entries[0].region == "rim" and entries[0].typical["size"] == "large"
    rest = entries[1:]
    assert all(e.match == "semantic" and e.distance is not None for e in rest)
    assert [e.distance for e in rest] == sorted(e.distance for e in rest)
    assert len({(e.category, e.anomaly_type) for e in entries}) == 3


def test_retrieve_with_k_one_returns_only_the_exact_entry(store):
    entries = store.retrieve("tile", "gray_stroke", k=1)
    assert [(e.anomaly_type, e.shape, e.match) for e in entries] == [("gray_stroke", "stroke", "exact")]


def test_unknown_category_falls_back_to_entries_of_the_same_shape(store):
    entries = store.retrieve("spoon", "scratch", k=3)
    assert entries and all(e.match == "semantic" for e in entries)
    assert entries[0].shape == "scratch" and entries[0].family == "line"


def test_query_text_steers_the_semantic_neighbours(store):
    entries = store.retrieve("bottle", "broken_large", query="oily dark liquid stain soaking in", k=3)
    assert entries[0].match == "exact"
    assert any(e.shape in ("oil", "liquid") for e in entries[1:])


def test_a_second_store_on_the_same_path_reuses_it_without_rebuilding(store, store_path, caplog):
    from tools.knowledge.store import KnowledgeStore

    with caplog.at_level(logging.INFO, logger="tools.knowledge.store"):
        again = KnowledgeStore(store_path)
        entries = again.retrieve("carpet", "metal_contamination", k=2)
    assert again.builds == 0 and "Built knowledge store" not in caplog.text
    assert entries[0].anomaly_type == "metal_contamination" and entries[0].typical["colour"] == "metallic"


def test_store_rebuilds_when_the_catalog_hash_changes(tmp_path, monkeypatch):
    from tools.knowledge.store import KnowledgeStore

    toy = parse_catalog({"toy.yaml": _doc()})
    assert KnowledgeStore(tmp_path, catalog=toy).retrieve("spoon", "scratch", k=1)[0].match == "exact"
    unchanged = KnowledgeStore(tmp_path, catalog=toy)
    unchanged.ensure()
    monkeypatch.setattr(Catalog, "content_hash", lambda self: "edited catalog")
    changed = KnowledgeStore(tmp_path, catalog=toy)
    assert changed.retrieve("spoon", "scratch", k=1)[0].anomaly_type == "scratch"
    assert (unchanged.builds, changed.builds) == (0, 1)
    assert KnowledgeStore(tmp_path, catalog=toy).ensure().metadata["fingerprint"] == changed.fingerprint()


def test_stores_of_two_catalogs_on_one_path_never_rebuild_each_other(tmp_path):
    from tools.knowledge.store import KnowledgeStore

    one = KnowledgeStore(tmp_path, catalog=parse_catalog({"toy.yaml": _doc()}))
    other = KnowledgeStore(tmp_path, catalog=parse_catalog({"toy.yaml": _doc(physics="Grit in a polishing pad.")}))
    assert one.fingerprint() != other.fingerprint()
    for _ in range(2):  # two checkouts of different versions, taking turns on the shared cache
        assert one.retrieve("spoon", "scratch", k=1)[0].match == "exact"
        assert other.retrieve("spoon", "scratch", k=1)[0].physics == "Grit in a polishing pad."
        one._collection = other._collection = None  # a new process each turn
    assert (one.builds, other.builds) == (1, 1)


_WORKER = """
import sys
from tools.knowledge.store import KnowledgeStore
kb = KnowledgeStore(sys.argv[1])
assert kb.retrieve("zipper", "split_teeth", k=1)[0].anomaly_type == "split_teeth"
print(kb.builds)
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_together_build_it_once(tmp_path):
    path = tmp_path / "kb"
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    builds = [int(w.communicate(timeout=300)[0].strip().splitlines()[-1]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert sorted(builds) == [0, 1]
