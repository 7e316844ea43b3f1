"""A served run writes only under run_root, and bad inputs fail with a message naming the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from graph.graph import build_graph, recursion_limit
from graph.configuration import Configuration
from graph.run_inputs import RunInputError, check_seed, resolve_image, resolve_run_dir


def test_a_served_run_dir_is_a_name_or_relative_path_inside_the_root(tmp_path):
    root = tmp_path / "runs"
    assert resolve_run_dir("a", str(root), confined=True) == root.resolve() / "a"
    assert resolve_run_dir("a/b", str(root), confined=True) == root.resolve() / "a" / "b"
    assert resolve_run_dir(None, str(root), confined=True).parent == root.resolve()


@pytest.mark.parametrize(
    ("run_dir", "why"),
    [("../../etc/passwd", r"may not contain '\.\.'"), ("a/../../x", r"may not contain '\.\.'"),
     ("/etc", "not '/etc'"), ("~/x", "not '~/x'"), (".", "not the root itself")],
)
def test_a_served_run_dir_outside_the_root_is_refused_naming_the_field(tmp_path, run_dir, why):
    with pytest.raises(RunInputError, match=f"input 'run_dir'.*{why}"):
        resolve_run_dir(run_dir, str(tmp_path / "runs"), confined=True)


def test_a_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    with pytest.raises(RunInputError, match="input 'run_dir' 'out/x' leads outside run_root"):
        resolve_run_dir("out/x", str(root), confined=True)
    (root / "inside").symlink_to(root / "real", target_is_directory=True)
    assert resolve_run_dir("inside/x", str(root), confined=True) == root.resolve() / "real" / "x"


def test_an_in_process_graph_writes_where_its_caller_says(tmp_path):
    assert resolve_run_dir(str(tmp_path / "any"), "runs", confined=False) == (tmp_path / "any").resolve()


def test_seed_must_be_an_integer_naming_the_field():
    assert (check_seed(None, 4), check_seed(7, 4), check_seed("12", 4), check_seed(3.0, 4)) == (4, 7, 12, 3)
    for bad in ("abc", 1.5, True, [1]):
        with pytest.raises(RunInputError, match="input 'seed' must be an integer"):
            check_seed(bad, 0)


def _run(graph, sample_dir: Path, **inputs):
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    return graph.invoke({"image": str(image), "category": "metal_nut", "anomaly_type": "scratch", **inputs},
                        {"recursion_limit": recursion_limit(Configuration())})


def test_bad_seed_fails_the_run_naming_the_field(sample_dir, tmp_path):
    with pytest.raises(RunInputError, match="input 'seed' must be an integer, not 'abc'"):
        _run(build_graph(), sample_dir, seed="abc", run_dir=str(tmp_path / "run"))


def test_an_unwritable_run_dir_fails_the_run_naming_the_field(sample_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # a file where a folder must go: unwritable even for root
    with pytest.raises(RunInputError, match=f"input 'run_dir': cannot write to {blocker}/run"):
        _run(build_graph(), sample_dir, run_dir=str(blocker / "run"))


def test_the_served_graph_refuses_a_run_dir_out_of_run_root(sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_AGENT_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("ANOMALY_AGENT_INPUT_ROOT", str(sample_dir))
    served = build_graph(served=True)
    with pytest.raises(RunInputError, match="input 'run_dir'"):
        _run(served, sample_dir, run_dir="../escaped")
    assert not (tmp_path / "escaped").exists()
    out = _run(served, sample_dir, run_dir="mine", seed=2)
    assert Path(out["result"]["anomaly_path"]).parent == (tmp_path / "runs" / "mine").resolve()
    assert os.listdir(tmp_path) == ["runs"]


def test_a_confined_image_path_must_resolve_inside_input_root(tmp_path):
    root = tmp_path / "inputs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"")
    inside = str((root / "a" / "x.png").resolve())
    assert resolve_image("a/x.png", str(root), confined=True) == inside  # relative: taken inside the root
    assert resolve_image(inside, str(root), confined=True) == inside  # absolute: must point into it
    assert resolve_image("data:image/png;base64,AAAA", str(root), confined=True) == "data:image/png;base64,AAAA"


@pytest.mark.parametrize(
    ("image", "why"),
    [("/etc/passwd", "'/etc/passwd' leads outside input_root$"),
     ("../x.png", r"may not contain '\.\.' \(it must stay inside input_root\)"),
     ("a/../../x.png", r"may not contain '\.\.'"), ("~/x.png", "must be a path inside input_root"),
     ("out/secret.png", "leads outside input_root \\(through a symlink\\)")],
)
def test_a_confined_image_path_out_of_input_root_is_refused_naming_the_field(tmp_path, image, why):
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "out").symlink_to(tmp_path)
    (tmp_path / "secret.png").write_bytes(b"")
    with pytest.raises(RunInputError, match=f"^input 'image' .*{why}"):
        resolve_image(image, str(root), confined=True)


def test_an_in_process_image_is_any_path_unless_input_root_is_set(tmp_path):
    assert resolve_image("/etc/passwd", None, confined=False) == "/etc/passwd"
    with pytest.raises(RunInputError, match="input 'image' '/etc/passwd' leads outside input_root"):
        resolve_image("/etc/passwd", str(tmp_path), confined=False)
    with pytest.raises(RunInputError, match="input 'image' must be a file path or a data URL, not int"):
        resolve_image(3, None, confined=False)


def test_the_served_graph_reads_image_files_only_inside_input_root(sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_AGENT_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)  # the default input_root, 'inputs', is relative to the working directory
    with pytest.raises(RunInputError, match="input 'image' .* leads outside input_root"):
        _run(build_graph(served=True), sample_dir)
    monkeypatch.setenv("ANOMALY_AGENT_INPUT_ROOT", str(sample_dir))
    assert _run(build_graph(served=True), sample_dir)["status"] in ("success", "budget_exhausted")
    out = _run(build_graph(), sample_dir, run_dir=str(tmp_path / "in-process"))  # in-process: input_root set, inside
    assert out["status"] in ("success", "budget_exhausted")
