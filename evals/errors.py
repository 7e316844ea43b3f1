"""Errors of the evaluation suite whose message is written for the user (the CLI prints them as one line).

Kept in a module without heavy imports so the CLI can name them without loading torch.
"""

from __future__ import annotations


class EvalError(ValueError):
    """The evaluation cannot run as asked (the message says why)."""


class DatasetLayoutError(EvalError):
    """The folder is not in the MVTec-AD layout (the message says what is missing)."""


class WeightsNotSupported(EvalError):
    """A local Inception / LPIPS-VGG weights path was given; loading them is not implemented yet."""


USER_ERRORS: tuple[type[Exception], ...] = (EvalError,)
