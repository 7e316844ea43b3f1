"""The local inference engine: a transformers causal LM with chat rendering, generation with token ids and
logprobs, a prefix cache, batched decoding, weight loading, and an OpenAI-compatible server.

Policies adapt it (`graph.policies.local_policy`); training drives it through the same public calls
(`enable_prefix_cache`, `clear_prefix_cache`, `enable_batching`, `load_weights`).
"""

from graph.inference.batching import BatchScheduler
from graph.inference.model import LocalModel, load_local_model, render_without_tool_template
from graph.inference.types import DecodeRequest, Generation, GenerationCancelled

__all__ = ["BatchScheduler", "DecodeRequest", "Generation", "GenerationCancelled", "LocalModel", "load_local_model",
           "render_without_tool_template"]
