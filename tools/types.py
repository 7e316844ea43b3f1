"""Typed inputs and results shared by every tool backend.

Why: each tool has an embedded and a production backend on the same interface. These types are that
interface. Arrays are numpy: images are uint8 RGB (H, W, 3), masks are bool (H, W). Results that go
into the agent's messages (evaluations, knowledge) are pydantic models so they serialise to JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from tools.vocabulary import DefectSpec, Fix


class BackendUnavailableError(RuntimeError):
    """A model backend cannot serve right now (an endpoint down or too slow, a model that fails to load).

    Why its own class: this is the infrastructure failing, not the sample; the graph ends the run with
    status ``backend_error`` (never a crash mid-batch) and ``batch --resume`` runs the sample again.
    """


class KnowledgeEntry(BaseModel):
    """One defect description from the knowledge base."""

    category: str
    anomaly_type: str
    family: str
    shape: str = Field(description="The vocabulary noun IG draws for this type.")
    appearance: str
    physics: str
    location: str
    region: str | None = Field(default=None, description="Named sub-region the defect belongs to, if any.")
    typical: dict[str, str] = Field(default_factory=dict, description="Typical size/contrast/colour/softness words.")
    match: Literal["exact", "category", "semantic"] = "exact"
    distance: float | None = None

    def as_text(self) -> str:
        """The entry as the text the policy reads in an observation."""
        typical = ", ".join(f"{k}: {v}" for k, v in self.typical.items())
        region = f" Region: {self.region}." if self.region else ""
        return (
            f"[{self.category}/{self.anomaly_type}, {self.match} match] {self.appearance} "
            f"Cause: {self.physics} Where: {self.location}.{region} Typical: {typical}."
        )


class PromptRequest(BaseModel):
    """What PG needs to write an instruction."""

    category: str
    anomaly_type: str
    subject: str = "the object"
    knowledge: list[KnowledgeEntry] = Field(default_factory=list)
    feedback: str = ""
    seed: int = 0


class GenerationRequest(BaseModel):
    """What IG needs besides the image."""

    prompt: str
    category: str
    anomaly_type: str
    is_texture: bool = False
    default_shape: str = "stain"
    region: str | None = None
    seed: int = 0
    look_seed: int | None = Field(
        default=None,
        description="Seed of the defect's appearance draw (the quantile of each range its words name); None: `seed`. "
        "The agent keeps it across a run's refined instructions, so a changed word moves its own attribute only.",
    )
    jpeg_quality: int | None = Field(
        default=None, ge=1, le=100, description="The input's JPEG quality when it was a JPEG; the output then goes through it too."
    )
    jpeg_subsampling: int = Field(default=2, ge=0, le=2, description="The input's chroma subsampling (0 4:4:4, 1 4:2:2, 2 4:2:0).")


@dataclass
class GenerationResult:
    """An edited image, the region the engine changed (when it knows it) and the parameters it used."""

    image: np.ndarray
    region: np.ndarray | None
    spec: DefectSpec | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskResult:
    """A defect mask and its bounding box (x0, y0, x1, y1), or None when empty."""

    mask: np.ndarray
    box: tuple[int, int, int, int] | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


class EvaluationRequest(BaseModel):
    """What QE needs besides the two images."""

    category: str
    anomaly_type: str
    prompt: str = ""
    is_texture: bool = False


class Evaluation(BaseModel):
    """QE's verdict (DESIGN §4 schema): two 0–5 scores, a pass flag, a review and concrete fixes."""

    location: float = Field(ge=0, le=5)
    quality: float = Field(ge=0, le=5)
    passed: bool
    review: str
    fixes: list[Fix] = Field(default_factory=list)
    details: dict[str, float] = Field(default_factory=dict)
    judge: str = "metric"

    @property
    def score(self) -> float:
        """Total score 0–10."""
        return self.location + self.quality


class PromptGenerator(Protocol):
    def generate(self, request: PromptRequest) -> str: ...


class ImageGenerator(Protocol):
    def generate(self, image: np.ndarray, request: GenerationRequest) -> GenerationResult: ...


class QualityJudge(Protocol):
    def evaluate(self, normal: np.ndarray, edited: np.ndarray, request: EvaluationRequest) -> Evaluation: ...


class KnowledgeRetriever(Protocol):
    def retrieve(self, category: str, anomaly_type: str, query: str = "", k: int = 3) -> list[KnowledgeEntry]: ...


class MaskGenerator(Protocol):
    def generate(self, normal: np.ndarray, edited: np.ndarray) -> MaskResult: ...
