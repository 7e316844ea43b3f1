"""A model backend that runs out of device memory is the machine failing, not the sample.

Why its own module: the diffusers inpainter and SAM both run a torch model per call; a CUDA (or MPS)
out-of-memory error there must end the run with status ``backend_error`` (best image kept, the reason in
``result.error``), so a batch goes on and ``batch --resume`` retries the sample once memory is freed or
the resolution lowered, instead of a crash that loses the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tools.types import BackendUnavailableError


@contextmanager
def out_of_memory_ends_the_run(what: str, hint: str) -> Iterator[None]:
    """Re-raise torch's out-of-memory error inside the block as `BackendUnavailableError` naming `what`."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # let the next sample (or another process) have the memory back
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackendUnavailableError(f"{what} ran out of device memory ({first_line}); {hint}") from error
