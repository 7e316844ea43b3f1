"""Batches on a Ray cluster: the same plan, per-sample runs and joint files as the process pool.

Why Ray and this shape: past one machine, Ray schedules the work, restarts what a lost node took
down and moves nothing we would otherwise hand-write (no scheduler, queue or RPC of our own). Each
Ray actor is one worker: it builds the toolbox and policy once (diffusion pipeline, SAM, a local
model) and then runs samples with `graph.batch.run_sample`, exactly as a pool process does. Ray
restarts an actor lost with its node (``max_restarts``) wherever resources allow and retries the
sample it held on it (``max_task_retries``); the retry resumes from the sample's own checkpoint under the
root's ``.work/``, so a sample is never lost and, its outputs having fixed names written atomically,
never written twice. The root must therefore be one folder that every node sees (a shared
filesystem); it is checked from every worker before any sample runs. `graph.batch.run_batch` rebuilds
the joint files from the per-sample records at the end, as for the pool.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from graph.batch import WORK_DIR, BatchError, Sample, run_sample
from graph.configuration import Configuration

if TYPE_CHECKING:
    from ray.actor import ActorHandle

logger = logging.getLogger(__name__)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine

#: Object store of a local instance: only sample plans and per-sample records travel through it
#: (images go through the shared root), so a small store is plenty.
LOCAL_OBJECT_STORE_MB = 200
#: Ray namespace of the workers' names (a name is unique within its namespace across jobs).
NAMESPACE = "anomaly-agent"


@dataclass(frozen=True)
class RaySettings:
    """Where and how the batch runs on Ray.

    Attributes:
        address: None starts a local instance in this process; ``auto``, ``HOST:PORT`` or
            ``ray://HOST:PORT`` joins a running cluster.
        node_ip: The driver's node address (Ray's ``_node_ip_address``); None lets Ray choose.
        workers: Actors to start; None fills the cluster (its CPUs, or GPUs, over one worker's share).
        cpus_per_worker: CPUs each actor reserves (also its torch thread count).
        gpus_per_worker: GPUs each actor reserves; None: 1 when a tool or the policy runs a model on
            a non-CPU device and the cluster has GPUs, else 0.
        retries: Restarts of a lost actor; the sample it held is retried on the restarted actor.
        object_store_mb: Object store of a local instance (ignored when joining a cluster).
        connect_timeout_s: How long to wait for the cluster's address to answer.
        lock_wait_s: How long to wait for another batch into the same root on the cluster to end (a
            killed driver's job is cleaned up within seconds).
    """

    address: str | None = None
    node_ip: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None
    retries: int = 3
    object_store_mb: int = LOCAL_OBJECT_STORE_MB
    connect_timeout_s: float = 10.0
    lock_wait_s: float = 60.0


class SampleWorker:
    """One Ray worker: holds the toolbox and policy, runs samples into the shared root."""

    def __init__(self, overrides: dict[str, Any], threads: int) -> None:
        import torch

        from graph.policies import get_policy
        from graph.toolbox import get_toolbox

        torch.set_num_threads(threads)
        self.overrides = overrides
        cfg = Configuration.load(overrides=overrides)
        get_toolbox(cfg)  # model-backed tools load here, once per worker
        get_policy(cfg)

    def node(self) -> str:
        """The address of the node this worker runs on."""
        import ray

        return ray.util.get_node_ip_address()

    def probe(self, path: str, token: str) -> str | None:
        """See `probe_root`, run on this worker's node."""
        return probe_root(path, token)

    def run(self, sample: Sample) -> dict[str, Any]:
        """Run (or resume) one sample into the root; see `graph.batch.run_sample`."""
        return run_sample(sample, self.overrides)


class RayExecutor:
    """A `graph.batch.Executor` that runs samples on Ray actors, connecting only when there is work.

    After a run, `timings` holds the seconds spent connecting, starting the workers (their model
    loads included) and running the samples, for benchmarks.
    """

    def __init__(self, settings: RaySettings, root: Path) -> None:
        self.settings = settings
        self.root = Path(root)
        self.timings: dict[str, float] = {}

    def __call__(self, todo: list[Sample], overrides: dict[str, Any], *, progress: bool, total: int,
                 initial: int) -> Iterator[dict[str, Any]]:
        import time

        from tqdm import tqdm

        if not todo:
            return
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise BatchError("batch --ray needs Ray: pip install 'anomaly-agent[ray]'") from None
        started = time.perf_counter()
        cfg = Configuration.load(overrides=overrides)
        _connect(self.settings)
        try:
            connected = time.perf_counter()
            actors = self._start_workers(cfg, overrides, len(todo))
            ready = time.perf_counter()
            self.timings = {"connect_s": connected - started, "workers_s": ready - connected}
            bar = tqdm(total=total, initial=initial, desc="samples", unit="sample", disable=not progress)
            try:
                pool = ActorPool(actors)
                for row in pool.map_unordered(lambda actor, sample: actor.run.remote(sample), todo):
                    bar.update()
                    yield row
            finally:
                bar.close()
            self.timings["samples_s"] = time.perf_counter() - ready
        except ray.exceptions.RayTaskError as error:
            raise error.as_instanceof_cause() from None  # the sample's own exception, as the pool raises it
        except ray.exceptions.RayActorError as error:
            raise BatchError(f"a Ray worker died for good (it failed to start, or was lost more than --ray-retries "
                             f"{self.settings.retries} times): {str(error).strip().splitlines()[0]}; fix the cause and "
                             "run the batch again with --resume") from None
        finally:
            ray.shutdown()

    def _start_workers(self, cfg: Configuration, overrides: dict[str, Any], todo: int) -> list[ActorHandle]:
        """Start the actors, wait until each holds its toolbox, and check the root from each of them."""
        import ray

        settings = self.settings
        gpus = settings.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if uses_gpu(cfg) and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        room = worker_room([n["Resources"] for n in ray.nodes() if n.get("Alive")], settings.cpus_per_worker, gpus)
        if room == 0:
            raise BatchError(f"no Ray node has room for one worker of {settings.cpus_per_worker:g} CPUs and {gpus:g} GPUs; "
                             "lower --ray-cpus / --ray-gpus or add nodes")
        if settings.workers is not None and settings.workers > room:
            raise BatchError(f"the Ray cluster has room for {room} workers of {settings.cpus_per_worker:g} CPUs and "
                             f"{gpus:g} GPUs, not {settings.workers}; ask for fewer --workers")
        count = min(settings.workers or room, todo)
        options = dict(
            num_cpus=settings.cpus_per_worker,
            num_gpus=gpus,
            max_restarts=settings.retries,
            # Retry a lost actor's sample until it is restarted: a node that is dying but not yet declared dead
            # refuses calls at once, and a finite count would be spent in that window. max_restarts bounds it.
            max_task_retries=-1,
            scheduling_strategy="SPREAD",
        )
        threads = max(1, math.floor(settings.cpus_per_worker))
        worker = ray.remote(SampleWorker)
        actors = [self._first_worker(worker, options, overrides, threads)]
        actors += [worker.options(**options).remote(overrides, threads) for _ in range(count - 1)]
        nodes = ray.get([actor.node.remote() for actor in actors])
        logger.info("%d Ray workers on %s", count, sorted(set(nodes)))
        self._check_root(actors, nodes)
        return actors

    def _first_worker(self, worker: Any, options: dict[str, Any], overrides: dict[str, Any], threads: int) -> ActorHandle:
        """The first worker, named after the root: one batch per root on a cluster at a time.

        Why: a second driver on the same root (or a resumed one while a killed driver's workers are still
        being stopped) would run the same samples twice at once. Ray frees the name when the job that
        holds it ends, so this waits up to `lock_wait_s` for a dead driver's job to be cleaned up.
        """
        import time

        import ray

        name = f"anomaly-agent batch {self.root}"
        deadline = time.monotonic() + self.settings.lock_wait_s
        while True:
            try:
                return worker.options(**options, name=name, namespace=NAMESPACE).remote(overrides, threads)
            except ValueError:
                if time.monotonic() > deadline:
                    raise BatchError(f"another batch is writing into {self.root} on this Ray cluster; wait for it to end "
                                     "or choose another --out") from None
                time.sleep(0.5)

    def _check_root(self, actors: list[ActorHandle], nodes: list[str]) -> None:
        """Raise unless every worker reads what the driver wrote under the root and can write there."""
        import ray

        from tools.imaging import write_text_atomic

        token = uuid.uuid4().hex
        try:
            probe = write_text_atomic(self.root / WORK_DIR / f".ray-probe-{token}", token)
        except OSError as error:
            raise BatchError(f"cannot write the output root {self.root}: {error}") from None
        try:
            problems = ray.get([actor.probe.remote(str(probe), token) for actor in actors])
        finally:
            probe.unlink(missing_ok=True)
        for node, problem in zip(nodes, problems):
            if problem:
                raise BatchError(f"the output root {self.root} is not shared with Ray node {node} ({problem}); "
                                 "every node must see it at the same path (a shared filesystem)")


def probe_root(path: str, token: str) -> str | None:
    """None when the file `path` holds `token` and a file beside it can be written atomically; else why not.

    Why both: a node that sees another folder at the root's path (no shared filesystem) cannot read
    the driver's token; a read-only mount reads it but cannot write the samples.
    """
    from tools.imaging import write_text_atomic

    probe = Path(path)
    try:
        if probe.read_text() != token:
            return f"{probe} holds another batch's probe"
        write_text_atomic(probe.with_name(f"{probe.name}.{uuid.uuid4().hex}"), token).unlink()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None


def uses_gpu(cfg: Configuration) -> bool:
    """Whether a model-backed tool or the local policy is set to run on an accelerator."""
    models = cfg.image.backend == "diffusers" or cfg.mask.backend == "sam" or cfg.policy.kind == "local"
    return models and cfg.device != "cpu"


def worker_room(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs the nodes' resources hold, in total."""
    room = 0
    for resources in nodes:
        fits = [math.floor(resources.get(name, 0.0) / need + 1e-9) for name, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
        room += min(fits) if fits else 0
    return room


def _connect(settings: RaySettings) -> None:
    """Start a local instance or join the cluster at `settings.address`, or raise a one-line BatchError."""
    import ray

    options: dict[str, Any] = {"log_to_driver": logger.isEnabledFor(logging.INFO), "logging_level": logging.WARNING}
    if settings.node_ip:
        options["_node_ip_address"] = settings.node_ip
    if settings.address is None:
        cpus = os.cpu_count() or 1
        if settings.workers:
            cpus = max(cpus, math.ceil(settings.workers * settings.cpus_per_worker))
        options.update(num_cpus=cpus, object_store_memory=settings.object_store_mb * 2**20, include_dashboard=False)
    else:
        _check_reachable(settings.address, settings.connect_timeout_s)
        options["address"] = settings.address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = settings.address or "a local Ray instance"
        raise BatchError(f"cannot start or join {where}: {str(error).splitlines()[0] if str(error) else error!r}") from None


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast when HOST:PORT does not answer (Ray itself would wait for minutes)."""
    if address == "auto":
        return  # Ray finds the local cluster's address itself, or says at once that there is none
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BatchError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise BatchError(f"cannot reach the Ray cluster at {address} ({error}); start it with `ray start --head` "
                         "or fix --ray") from None
