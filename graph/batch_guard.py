"""One live batch per output root, and pool workers that die with their batch.

Why: a batch killed with SIGKILL cannot stop its own worker processes, and an orphaned worker
still writing into the root would race a resumed batch over the same samples. So each worker
asks the kernel to kill it when its parent dies (Linux `PR_SET_PDEATHSIG`), with a thread that
watches the parent's pid as a fallback; the live batch holds an exclusive `flock` on the root
(released by the kernel when it dies, however it dies), and each worker holds a shared lock on a
second file, which a new batch takes exclusively once, so it starts only after every worker of an
earlier batch into the same root is gone.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

#: Lock files under ROOT/.work: the live batch holds the first exclusively, its workers the second shared.
BATCH_LOCK = "batch.lock"
WORKERS_LOCK = "workers.lock"
#: prctl option (linux/prctl.h): the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1
#: How often the fallback thread checks that the parent is still there, in seconds.
PARENT_POLL_S = 1.0

_held: list[int] = []  # lock descriptors a worker keeps open for its whole life


class RootBusyError(RuntimeError):
    """Another batch (or workers of a killed one) is writing into this root."""


@contextmanager
def hold_root(work_dir: Path, *, orphan_wait_s: float = 60.0) -> Iterator[None]:
    """Hold `work_dir` (ROOT/.work) for this batch for the duration of the block.

    Raises:
        RootBusyError: another live batch holds the root, or workers of an earlier batch still hold
            it after `orphan_wait_s` seconds (they normally die within a second of their parent).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / BATCH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootBusyError(
                f"another batch is writing into {work_dir.parent}; wait for it to end or choose another --out"
            ) from None
        _wait_for_orphans(work_dir / WORKERS_LOCK, orphan_wait_s)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _wait_for_orphans(path: Path, timeout_s: float) -> None:
    """Return once no process holds `path` shared, i.e. no worker of an earlier batch is alive."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RootBusyError(
                        f"workers of an earlier batch are still writing into {path.parent.parent}; try again when they have exited"
                    ) from None
                logger.info("waiting for workers of an earlier batch to exit")
                time.sleep(0.2)
    finally:
        os.close(fd)


def init_worker(parent_pid: int, work_dir: str) -> None:
    """Pool-worker initializer: die with `parent_pid`, and hold the root's workers lock shared."""
    die_with_parent(parent_pid)
    fd = os.open(Path(work_dir) / WORKERS_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held.append(fd)


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` (its parent) dies, even by SIGKILL.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG). Everywhere: a
    daemon thread exits the process once its parent pid changes (reparenting), within PARENT_POLL_S.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); watching the parent instead", ctypes.get_errno())
        except (OSError, AttributeError) as error:
            logger.warning("no prctl (%s); watching the parent instead", error)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
