"""The texts the policy reads: its system prompt, the task, and each tool's observation.

Why all in one place: these strings are the policy's whole world. Trajectories for SFT are made of
them, so a change here changes the training data; keeping them together makes that visible.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = """You are an inspection-data engineer. You add one realistic {anomaly_type} defect to a \
normal image of {subject} ({category}) and return its pixel mask, by calling tools one at a time.

Tools:
- prompt_gen: write a local editing instruction for the defect. Call it first.
- image_gen: edit an image with an instruction; it returns a new image number.
- quality_eval: score a generated image (location and quality, 0-5 each) with a review of what to fix.
- knowledge_retrieval: physical descriptions of the defect. Use it once, after a failed evaluation.
- mask_gen: make the defect's mask. Call it last, on an image that passed evaluation.

Protocol: prompt_gen -> image_gen -> quality_eval. If the evaluation fails, read its review \
(and the knowledge), rewrite the instruction with the fixes it names, and call image_gen again. \
When an image passes, call mask_gen on it, then answer with a short final message naming the image.
Budget: at most {max_steps} tool calls and {max_image_gens} image_gen calls. Images are numbered: \
<image 1> is the normal image."""

TASK_PROMPT = "Here is the normal image <image 1> of {subject}. Add a realistic '{anomaly_type}' defect and give its mask."


def system_prompt(*, category: str, anomaly_type: str, subject: str, max_steps: int, max_image_gens: int) -> str:
    return SYSTEM_PROMPT.format(
        category=category,
        anomaly_type=anomaly_type,
        subject=subject,
        max_steps=max_steps,
        max_image_gens=max_image_gens,
    )


def task_prompt(*, anomaly_type: str, subject: str) -> str:
    return TASK_PROMPT.format(anomaly_type=anomaly_type, subject=subject)


def prompt_observation(instruction: str) -> str:
    return f"Instruction: {instruction}"


def image_observation(number: int, source: int, info: dict[str, Any]) -> str:
    area = info.get("area_fraction")
    area_text = f" The edit covers {100 * area:.1f}% of the image." if isinstance(area, float) else ""
    return f"Generated <image {number}> by editing image {source}.{area_text}"


def evaluation_observation(number: int, evaluation: dict[str, Any]) -> str:
    verdict = "PASS" if evaluation["passed"] else "FAIL"
    return (
        f"Image {number}: location {evaluation['location']:.1f}/5, quality {evaluation['quality']:.1f}/5, "
        f"{verdict}. Review: {evaluation['review']}"
    )


def knowledge_observation(entries: list[str]) -> str:
    if not entries:
        return "No knowledge found for this defect."
    return "Knowledge:\n" + "\n".join(f"- {text}" for text in entries)


def mask_observation(number: int, area_fraction: float, box: list[int] | None) -> str:
    if box is None:
        return f"Mask for image {number} is empty: nothing changed that looks like a defect."
    return f"Mask for image {number}: {100 * area_fraction:.2f}% of the image, box (x0, y0, x1, y1) = {tuple(box)}."


def error_observation(message: str) -> str:
    return f"Error: {message}"
