"""TRL extensions for `train sft`, through its public extension points: an `SFTTrainer` whose overridden
`compute_loss` is a lean assistant-only loss, and a `TrainerCallback` that stops at a time limit.

Why a module of its own: importing TRL takes seconds, so `training.sft` imports this only when it trains.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTTrainer


class LeanLossSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with a plain next-token loss on the assistant positions only.

    Why: TRL's default loss runs a fused, tiled LM head that also computes entropy and top-1 flags per
    token; on a 2-core CPU a step took about twice the time of the same forward and backward written
    directly. This loss keeps everything else of SFTTrainer (tokenisation with the chat template and
    tools, assistant masks, collation, logging): it runs the backbone, projects only the labelled
    positions through the LM head and takes the cross-entropy, summed and divided by the batch's
    labelled-token count as TRL does. Token accuracy and the trained token count are logged; entropy is not.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lean_metrics: dict[str, list[float]] = defaultdict(list)
        self.lean_tokens = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        if return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"][:, 1:]
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                          use_cache=False).last_hidden_state[:, :-1]
        keep = labels != -100
        logits = model.get_output_embeddings()(hidden[keep]).float()
        targets = labels[keep]
        total = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        count = keep.sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count).clamp(min=1)
        if self.model.training:
            with torch.no_grad():
                correct = (logits.argmax(-1) == targets).sum().item()
            self.lean_metrics["mean_token_accuracy"].append(correct / max(1, int(keep.sum())))
            if "attention_mask" in inputs:
                self.lean_tokens += int(inputs["attention_mask"].sum())
                self.lean_metrics["num_tokens"] = [float(self.lean_tokens)]
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """SFTTrainer's log with this loss's training metrics (averaged since the last log) added."""
        if self.model.training:
            logs.update({key: sum(values) / len(values) for key, values in self.lean_metrics.items() if values})
            self.lean_metrics.clear()
        super().log(logs, start_time)


class TimeLimitCallback(TrainerCallback):
    """Stop training after `seconds` (the model so far is still saved); `hit` says whether it did."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()
        self.hit = False

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if time.perf_counter() - self.started > self.seconds:
            self.hit = True
            control.should_training_stop = True
        return control
