"""Open-loop baseline: the agent's own PG template and IG engine, called once, no QE, no refinement.

Why: it isolates what the agent's loop (judge, knowledge, refinement, MG's mask) adds over the same
drawing engine used blindly. The mask is the engine's own defect region (it knows what it drew).
"""

from __future__ import annotations

import numpy as np

from evals.baselines.base import Stages, Synthetic


class OpenLoop:
    """PG (template) -> IG (procedural engine), once."""

    name = "open_loop"

    def __init__(self) -> None:
        from tools.image_gen import ProceduralEngine
        from tools.prompt_gen import TemplatePromptGenerator

        self.engine = ProceduralEngine()
        self.prompts = TemplatePromptGenerator()

    def __call__(
        self, image: np.ndarray, category: str, anomaly_type: str, rng: np.random.Generator
    ) -> Synthetic:
        from evals.synth import synthesize
        from tools.knowledge.catalog import load_catalog
        from tools.types import PromptRequest

        stages = Stages()
        seed = int(rng.integers(0, 2**31))
        catalog = load_catalog()
        cat, entry = catalog.category(category), catalog.entry(category, anomaly_type)
        with stages.time("prompt_gen"):
            prompt = self.prompts.generate(
                PromptRequest(
                    category=cat.name,
                    anomaly_type=entry.anomaly_type,
                    subject=cat.subject,
                    knowledge=[entry],
                    seed=seed,
                )
            )
        with stages.time("image_gen"):
            result = synthesize(
                self.engine, self.prompts, category, anomaly_type, image, seed, prompt=prompt
            ).result
        return Synthetic(result.image, np.asarray(result.region, bool), stages.seconds)
