"""The knowledge base: defect descriptions for every MVTec-AD and VisA category, and KR's store.

Why split: the catalog (YAML + pydantic) is light and used by PG, IG and the CLI; the store pulls in
chromadb and sentence-transformers, so it is imported only when `KnowledgeStore` is first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tools.knowledge.catalog import (
    Catalog,
    Category,
    Defect,
    KnowledgeBaseError,
    UnknownAnomalyTypeError,
    UnknownCategoryError,
    load_catalog,
    normalise_name,
)

if TYPE_CHECKING:
    from tools.knowledge.store import KnowledgeStore

__all__ = [
    "Catalog",
    "Category",
    "Defect",
    "KnowledgeBaseError",
    "KnowledgeStore",
    "UnknownAnomalyTypeError",
    "UnknownCategoryError",
    "load_catalog",
    "normalise_name",
]


def __getattr__(name: str) -> Any:
    if name == "KnowledgeStore":
        from tools.knowledge.store import KnowledgeStore

        return KnowledgeStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
