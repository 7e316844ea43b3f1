"""The command line: outputs on the happy path, one clear line on every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly_agent_cli import main


def _synthesize(image, out, category="metal_nut", anomaly_type="scratch", *extra):
    return main(["synthesize", "--image", str(image), "--category", category, "--anomaly-type", anomaly_type, "--out", str(out), *extra])


def test_synthesize_writes_outputs_and_prints_one_json_line(sample_dir, tmp_path, capsys):
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    assert _synthesize(image, tmp_path / "out", "metal_nut", "scratch", "--seed", "4") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] in ("success", "budget_exhausted")
    assert set(line) >= {"status", "score", "steps", "seconds"}
    for name in ("anomaly.png", "mask.png", "trajectory.json"):
        assert (tmp_path / "out" / name).is_file()


def _odd_images(tmp_path: Path, sample: Path) -> dict[str, Path]:
    rgb = np.asarray(Image.open(sample).convert("RGB"))
    files = {}
    files["rgba"] = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), "RGBA").save(files["rgba"])
    files["palette"] = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette"])
    files["gray16"] = tmp_path / "gray16.png"
    Image.fromarray((rgb.mean(axis=2) * 257).astype(np.uint16)).save(files["gray16"])
    files["gray"] = tmp_path / "gray.png"
    Image.fromarray(rgb).convert("L").save(files["gray"])
    return files


@pytest.mark.parametrize("kind", ["rgba", "palette", "gray16", "gray"])
def test_odd_but_valid_images_are_converted_and_run(sample_dir, tmp_path, capsys, kind):
    image = _odd_images(tmp_path, sorted((sample_dir / "metal_nut").glob("*.png"))[0])[kind]
    assert _synthesize(image, tmp_path / "out") == 0
    out = Image.open(tmp_path / "out" / "anomaly.png")
    assert out.mode == "RGB" and out.size == Image.open(image).size


def _bad_inputs(tmp_path: Path, sample: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    return {
        "corrupt": ([str(corrupt), "metal_nut", "scratch"], "corrupt.png"),
        "tiny": ([str(tiny), "metal_nut", "scratch"], "at least 16 px"),
        "missing": ([str(tmp_path / "nope.png"), "metal_nut", "scratch"], "not found"),
        "unknown category": ([str(sample), "metal_nutt", "scratch"], "metal_nut"),
        "unknown type": ([str(sample), "metal_nut", "scrach"], "scratch"),
    }


@pytest.mark.parametrize("case", ["corrupt", "tiny", "missing", "unknown category", "unknown type"])
def test_bad_inputs_give_one_clear_line_and_exit_code_2(sample_dir, tmp_path, capsys, case):
    sample = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    (image, category, anomaly_type), expected = _bad_inputs(tmp_path, sample)[case]
    assert _synthesize(image, tmp_path / "out", category, anomaly_type) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anomaly-agent: error:") and expected in err[0]
    assert not (tmp_path / "out" / "anomaly.png").exists()


def test_an_image_outside_a_set_input_root_is_one_line_and_exit_2(sample_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ANOMALY_AGENT_INPUT_ROOT", str(tmp_path / "inputs"))
    sample = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    assert _synthesize(sample, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input 'image'" in err[0] and "leads outside input_root" in err[0], err
    assert not (tmp_path / "out" / "anomaly.png").exists()


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    cli = Path(sys.executable).with_name("anomaly-agent")
    proc = subprocess.run(
        [str(cli), "synthesize", "--image", str(corrupt), "--category", "tile", "--anomaly-type", "crack", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_kb_list_shows_every_mvtec_category(capsys):
    assert main(["kb", "list", "--dataset", "mvtec_ad"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 15
    assert sum(len(line.split("\t")[3].split(", ")) for line in lines) == 73


def _batch(sample_dir: Path, out: Path, *extra: str) -> int:
    return main(["batch", "--input", str(sample_dir / "tile"), "--category", "tile", "--anomaly-types", "crack", "--out", str(out), *extra])


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    return err[0]


@pytest.mark.parametrize("command", ["synthesize", "batch"])
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_on_a_file_is_one_line_before_any_work(sample_dir, tmp_path, capsys, command, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "sub" / "dir"
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    # A bad category too: the --out check must come first, before any other work.
    code = _synthesize(image, out, "no_such_category") if command == "synthesize" else _batch(sample_dir, out)
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("anomaly-agent: error: --out") and str(out) in line and "is a file" in line
    assert blocker.read_text() == "not a folder"


def _read_only_cli(source: Path, target: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with `target` a read-only view of `source`: a read-only bind mount in a private
    mount namespace when root (root ignores permission bits), plain chmod otherwise."""
    cli = [sys.executable, "-c", "import sys; from anomaly_agent_cli import main; sys.exit(main(sys.argv[1:]))", *args]
    if os.geteuid() != 0:
        os.chmod(target, 0o555)
        return subprocess.run(cli, capture_output=True, text=True, timeout=120)
    import shlex
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without `unshare -m`: no way to make a read-only folder here")
    script = f"mount --bind -o ro {shlex.quote(str(source))} {shlex.quote(str(target))} && exec {shlex.join(cli)}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.parametrize("command", ["synthesize", "batch"])
def test_out_in_a_read_only_folder_is_one_line_and_exit_2(sample_dir, tmp_path, command):
    source, target = tmp_path / "source", tmp_path / "readonly"
    source.mkdir()
    target.mkdir()
    out = target / "run"
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    args = (["synthesize", "--image", str(image), "--category", "metal_nut", "--anomaly-type", "scratch", "--out", str(out)]
            if command == "synthesize" else
            ["batch", "--input", str(sample_dir / "tile"), "--category", "tile", "--anomaly-types", "crack", "--out", str(out)])
    proc = _read_only_cli(source, target, args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "cannot write" in lines[0], proc.stderr
    assert not list(source.iterdir())


@pytest.mark.parametrize("flag,value", [("--per-image", "0"), ("--per-image", "-1"), ("--per-image", "1001"),
                                        ("--workers", "0"), ("--workers", "-2"), ("--workers", "two")])
def test_batch_counts_out_of_range_are_one_line_and_exit_2(sample_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        _batch(sample_dir, tmp_path / "out", flag, value)
    assert exit_.value.code == 2
    line = _one_error_line(capsys)
    assert flag in line and value in line
    assert not (tmp_path / "out").exists()


def test_every_benchmark_command_runs_its_own_modules_main(capsys):
    from importlib.util import find_spec

    from evals.commands import BENCHMARKS as EVAL_BENCHMARKS
    from training.commands import BENCHMARKS as TRAINING_BENCHMARKS

    for package, table in (("evals", EVAL_BENCHMARKS), ("training", TRAINING_BENCHMARKS)):
        for _, module, _ in table:
            assert find_spec(f"{package}.{module}") is not None, f"{package}.{module}"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "qe", "--help"])
    assert exit_info.value.code == 0 and "usage: bench_qe" in capsys.readouterr().out
