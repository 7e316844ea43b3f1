"""`batch --ray` on a real two-node Ray cluster: the process pool's files byte for byte, a lost node or a
SIGKILLed driver costs nothing, and bad clusters or roots fail with one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from graph.batch_ray import NAMESPACE, probe_root, uses_gpu, worker_room  # noqa: E402
from graph.configuration import Configuration  # noqa: E402
from ray_cluster import HEAD_IP, LocalRayCluster, free_port, session_pids  # noqa: E402

CATEGORY, TYPES, PER_IMAGE = "tile", "crack,oil", 2
SAMPLES = 2 * 2 * PER_IMAGE  # two sample images per category
#: Fields that time the run rather than describe its result.
TIMING_FIELDS = {"seconds", "created", "timings", "wall_seconds_this_run", "seconds_per_sample_median"}


def _batch(sample_dir: Path, root: Path, *extra: str, per_image: int = PER_IMAGE) -> list[str]:
    return [str(Path(sys.executable).with_name("anomaly-agent")), "-v", "batch", "--input", str(sample_dir / CATEGORY),
            "--category", CATEGORY, "--anomaly-types", TYPES, "--per-image", str(per_image), "--out", str(root),
            "--seed", "3", *extra]


def _ray_batch(cluster: LocalRayCluster, sample_dir: Path, root: Path, *extra: str, per_image: int = PER_IMAGE) -> list[str]:
    return _batch(sample_dir, root, "--ray", cluster.address, "--ray-node-ip", HEAD_IP, "--workers", "2", *extra,
                  per_image=per_image)


@pytest.fixture(scope="module")
def cluster():
    started = LocalRayCluster(cpus=2).start()
    try:
        yield started
    finally:
        started.stop()


def _pool_batch(sample_dir: Path, root: Path, per_image: int = PER_IMAGE) -> Path:
    """The batch through the process pool (one torch thread per worker, as each Ray worker has)."""
    done = subprocess.run(_batch(sample_dir, root, "--workers", "2", per_image=per_image), capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


@pytest.fixture(scope="module")
def pool_root(sample_dir, tmp_path_factory):
    return _pool_batch(sample_dir, tmp_path_factory.mktemp("pool") / "out")


def _comparable(value, root: Path):
    """`value` with timing fields dropped and the root's path replaced by a placeholder."""
    if isinstance(value, dict):
        return {k: _comparable(v, root) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [_comparable(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<root>")
    return value


def assert_same_batch(ray_root: Path, pool_root: Path, samples: int = SAMPLES) -> None:
    """Every image, mask and stored artefact byte-identical; records identical but for timings and the root's path."""
    def files(root: Path, pattern: str) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob(pattern)) if p.is_file()}

    for pattern in (f"{CATEGORY}/**/*.png", ".work/*/*/*/images/*", ".work/*/*/*/*.png", "contact_sheet.png"):
        ours, theirs = files(ray_root, pattern), files(pool_root, pattern)
        assert ours.keys() == theirs.keys() and ours, pattern
        assert [k for k in ours if ours[k] != theirs[k]] == [], f"{pattern}: files differ"
    assert len(files(ray_root, f"{CATEGORY}/test/*/*.png")) == samples
    for pattern in (".work/*/*/*/done.json", ".work/*/*/*/trajectory.json", "summary.json"):
        ours, theirs = files(ray_root, pattern), files(pool_root, pattern)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert _comparable(json.loads(ours[key]), ray_root) == _comparable(json.loads(theirs[key]), pool_root), key
    lines = [(ray_root / "trajectories.jsonl").read_text().splitlines(), (pool_root / "trajectories.jsonl").read_text().splitlines()]
    assert len(lines[0]) == samples
    assert [_comparable(json.loads(x), ray_root) for x in lines[0]] == [_comparable(json.loads(x), pool_root) for x in lines[1]]
    keys = [(r["anomaly_type"], r["sample"]["name"]) for r in map(json.loads, lines[0])]
    assert len(set(keys)) == samples, "a sample appears twice"
    assert not list(ray_root.rglob("*.tmp")), "temporary files left behind"


def open_checkpoints(sessions: list[int]) -> set[Path]:
    """Sample work folders whose checkpoint file a process of these nodes holds open (a sample in progress)."""
    folders = set()
    for sid in sessions:
        for pid in session_pids(sid):
            for fd in Path(f"/proc/{pid}/fd").glob("*"):
                try:
                    target = Path(os.readlink(fd))
                except OSError:
                    continue
                if target.name == "checkpoints.sqlite":
                    folders.add(target.parent)
    return folders


@pytest.mark.integration
def test_ray_batch_on_two_nodes_matches_the_process_pool_byte_for_byte(cluster, pool_root, sample_dir, tmp_path):
    root = tmp_path / "out"
    done = subprocess.run(_ray_batch(cluster, sample_dir, root), capture_output=True, text=True, env=cluster.env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "127.0.0.2" in done.stderr and "127.0.0.3" in done.stderr, "both nodes should hold a worker"
    assert_same_batch(root, pool_root)


@pytest.mark.integration
def test_local_ray_instance_started_by_the_driver_matches_the_process_pool(pool_root, sample_dir, tmp_path):
    root = tmp_path / "out"
    done = subprocess.run(_batch(sample_dir, root, "--ray", "--ray-node-ip", HEAD_IP, "--workers", "2"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_batch(root, pool_root)


@pytest.mark.integration
def test_driver_killed_with_sigkill_resumes_to_the_same_outputs(cluster, pool_root, sample_dir, tmp_path):
    root = tmp_path / "out"
    command = _ray_batch(cluster, sample_dir, root)
    driver = subprocess.Popen(command, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while driver.poll() is None and len(list(root.glob(".work/*/*/*/done.json"))) < 2:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert 2 <= len(list(root.glob(".work/*/*/*/done.json"))) < SAMPLES, "the kill should land mid-batch"
    # The dead driver's workers stop with its job; wait until none of them is still inside a sample.
    while open_checkpoints(list(cluster.sessions.values())):
        time.sleep(0.1)

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=cluster.env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_batch(root, pool_root)


def _kill_worker_node_mid_sample(cluster: LocalRayCluster, command: list[str], root: Path, after: int = 0) -> tuple[set[Path], int]:
    """Run `command` into `root`; once `after` samples are done, SIGKILL the worker node's processes while one of
    its workers is inside a sample; check that the batch still completes and the interrupted samples finished.

    Returns:
        The interrupted samples' work folders and how many samples were done at the kill.
    """
    driver = subprocess.Popen(command, env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    interrupted: set[Path] = set()
    while driver.poll() is None and not interrupted:
        if len(list(root.glob(".work/*/*/*/done.json"))) >= after:
            interrupted = {f for f in open_checkpoints(cluster.worker_sessions()) if not (f / "done.json").exists()}
        if interrupted:
            for sid in cluster.worker_sessions():  # the whole node: raylet, object store, its workers
                cluster.kill_session(sid)
            done_at_kill = len(list(root.glob(".work/*/*/*/done.json")))
        else:
            time.sleep(0.01)
    _, stderr = driver.communicate(timeout=3600)
    assert interrupted, "the worker node never ran a sample"
    assert driver.returncode == 0, stderr[-3000:]
    assert all((folder / "done.json").is_file() for folder in interrupted)
    return interrupted, done_at_kill


@pytest.mark.integration
def test_worker_node_killed_mid_sample_batch_completes_every_sample_once(cluster, pool_root, sample_dir, tmp_path):
    root = tmp_path / "out"
    _kill_worker_node_mid_sample(cluster, _ray_batch(cluster, sample_dir, root), root)
    assert_same_batch(root, pool_root)


@pytest.mark.slow
@pytest.mark.integration
def test_two_hundred_samples_on_two_nodes_match_the_pool_also_after_a_lost_node(cluster, sample_dir, tmp_path):
    """The tests above at 200 samples (50 per image and type), on a fresh worker node."""
    per_image, samples = 50, 200
    if not cluster.worker_sessions() or not any(session_pids(s) for s in cluster.worker_sessions()):
        cluster.start_worker()
    started = time.perf_counter()
    pool = _pool_batch(sample_dir, tmp_path / "pool", per_image=per_image)
    print(f"\npool, 2 processes: {samples} samples in {time.perf_counter() - started:.0f} s")
    whole = tmp_path / "ray"
    started = time.perf_counter()
    done = subprocess.run(_ray_batch(cluster, sample_dir, whole, per_image=per_image), capture_output=True, text=True,
                          env=cluster.env, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"ray, two nodes: {samples} samples in {time.perf_counter() - started:.0f} s")
    assert_same_batch(whole, pool, samples)
    lost = tmp_path / "ray-lost-node"
    started = time.perf_counter()
    interrupted = _kill_worker_node_mid_sample(cluster, _ray_batch(cluster, sample_dir, lost, per_image=per_image), lost,
                                               after=samples // 2)
    print(f"ray, worker node killed after {interrupted[1]} samples, inside {sorted('/'.join(p.parts[-3:]) for p in interrupted[0])}: "
          f"{samples} samples in {time.perf_counter() - started:.0f} s")
    assert_same_batch(lost, pool, samples)


HOLDER = """
import sys, time, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2])
@ray.remote(num_cpus=0)
class Holder:
    def ready(self):
        return True
holder = Holder.options(name=sys.argv[3], namespace=sys.argv[4]).remote()
ray.get(holder.ready.remote())
print("held", flush=True)
time.sleep(3600)
"""

#: A driver that runs one sample into a root with RayExecutor and prints its status or its error.
DRIVER = """
import sys
from pathlib import Path
from graph.batch import BatchError, list_images, plan
from graph.batch_ray import RayExecutor, RaySettings
root = Path(sys.argv[3])
todo = plan(list_images(Path(sys.argv[4]))[:1], "tile", ["crack"], 1, root, seed=0)
settings = RaySettings(address=sys.argv[1], node_ip=sys.argv[2], workers=1, lock_wait_s=float(sys.argv[5]))
try:
    print([row["status"] for row in RayExecutor(settings, root)(todo, {}, progress=False, total=1, initial=0)])
except BatchError as error:
    print(error)
"""


@pytest.mark.integration
def test_one_batch_per_root_on_a_cluster_and_a_killed_drivers_hold_is_released(cluster, sample_dir, tmp_path):
    root = tmp_path / "out"

    def drive(lock_wait_s: float) -> str:
        done = subprocess.run([sys.executable, "-c", DRIVER, cluster.address, HEAD_IP, str(root), str(sample_dir / CATEGORY),
                               str(lock_wait_s)], env=cluster.env, capture_output=True, text=True, timeout=600)
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]

    other = subprocess.Popen([sys.executable, "-c", HOLDER, cluster.address, HEAD_IP, f"anomaly-agent batch {root}", NAMESPACE],
                             env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "held"  # another driver's batch into the same root
        assert drive(lock_wait_s=1).startswith(f"another batch is writing into {root}")
    finally:
        other.kill()  # SIGKILL: Ray frees the name when it notices that job's end
        other.wait()
    assert drive(lock_wait_s=120) in ("['success']", "['budget_exhausted']")


def test_unreachable_cluster_is_one_line_error(sample_dir, tmp_path):
    address = f"{HEAD_IP}:{free_port(HEAD_IP)}"  # nothing listens there
    done = subprocess.run(_batch(sample_dir, tmp_path / "out", "--ray", address), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"anomaly-agent: error: cannot reach the Ray cluster at {address}")


def test_root_probe_names_what_a_worker_cannot_see_or_write(tmp_path):
    probe = tmp_path / ".work" / ".ray-probe"
    assert "FileNotFoundError" in probe_root(str(probe), "t")  # another machine's local folder, not a shared one
    probe.parent.mkdir()
    probe.write_text("t")
    assert probe_root(str(probe), "t") is None and list(probe.parent.iterdir()) == [probe]
    assert "another batch" in probe_root(str(probe), "u")
    probe.parent.chmod(0o500)
    try:
        if os.geteuid() != 0:
            assert "PermissionError" in probe_root(str(probe), "t")
    finally:
        probe.parent.chmod(0o700)


def test_worker_room_counts_whole_workers_per_node():
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 3.0}, {"CPU": 0.5}]
    assert worker_room(nodes, cpus=1, gpus=0) == 5
    assert worker_room(nodes, cpus=1, gpus=1) == 1
    assert worker_room(nodes, cpus=1, gpus=0.5) == 2
    assert worker_room(nodes, cpus=4, gpus=0) == 0


def test_workers_ask_for_a_gpu_only_when_a_model_runs_off_the_cpu():
    assert not uses_gpu(Configuration())  # procedural IG, change-mask MG, scripted policy
    assert uses_gpu(Configuration(image_backend="diffusers", diffusion_model_path="/models/sd"))
    assert uses_gpu(Configuration(mask_backend="sam", sam_checkpoint="/models/sam.pth"))
    assert not uses_gpu(Configuration(image_backend="diffusers", diffusion_model_path="/models/sd", torch_device="cpu"))
