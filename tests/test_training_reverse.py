"""Reverse synthesis: staged trajectories that end in the real anomaly, with graph-identical messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graph import prompts
from anomaly_agent_cli import main
from tools.imaging import load_image, load_mask
from tools.knowledge.catalog import load_catalog
from tools.samples import sample_image
from tools.vocabulary import parse_fixes, parse_instruction
from training.reverse import ReverseError, list_anomalies, pseudo_normal, too_faint, too_large, wrong_place
from training.synthetic_mvtec import build_mvtec_like


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    build_mvtec_like(root, {"metal_nut": ["scratch"]}, per_type=1, size=128, seed=5)
    return root


def _pair(mvtec_root: Path):
    (anomaly,) = list_anomalies(mvtec_root)
    real, mask = load_image(str(anomaly.image)), load_mask(str(anomaly.mask))
    normal = load_image(str(anomaly.normals[0]))
    return normal, real, mask


def test_mvtec_layout_is_read_and_the_anomalys_own_normal_is_found(mvtec_root):
    (anomaly,) = list_anomalies(mvtec_root)
    assert (anomaly.category, anomaly.anomaly_type) == ("metal_nut", "scratch")
    normal, real, mask = _pair(mvtec_root)
    found, how = pseudo_normal(real, mask, [normal])
    assert how == "paired" and np.array_equal(found, normal)
    inpainted, how = pseudo_normal(real, mask, [])
    assert how == "inpainted"
    assert np.abs(inpainted.astype(int) - normal)[mask].mean() < np.abs(real.astype(int) - normal)[mask].mean()


def test_degradations_fade_enlarge_and_move_the_real_defect(mvtec_root):
    from tools.foreground import estimate_foreground

    normal, real, mask = _pair(mvtec_root)
    foreground = estimate_foreground(normal, False)
    rng = np.random.default_rng(0)
    faint, region = too_faint(normal, real, mask, foreground, rng)
    assert np.array_equal(region, mask)
    assert 0 < np.abs(faint.astype(int) - normal).sum() < 0.3 * np.abs(real.astype(int) - normal).sum()
    large, region = too_large(normal, real, mask, foreground, rng)
    assert region.sum() > 3 * mask.sum()
    moved, region = wrong_place(normal, real, mask, foreground, rng)
    assert region.sum() > 0 and (region & foreground).mean() < 0.2 * region.mean()


def test_staged_trajectories_end_in_the_real_anomaly_after_reviews_whose_fixes_the_next_prompt_applies(mvtec_root, tmp_path):
    out = tmp_path / "reverse.jsonl"
    assert main(["trajectories", "reverse", "--dataset", str(mvtec_root), "--out", str(out), "--stages", "1,2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["reverse"]["stage"] for r in records) == [1, 2]
    (anomaly,) = list_anomalies(mvtec_root)
    real = load_image(str(anomaly.image))
    for record in records:
        stage = record["reverse"]["stage"]
        assert record["source"] == "reverse" and record["status"] == "success"
        assert record["calls"].count("image_gen") == stage and record["calls"][0] == "prompt_gen"
        assert record["calls"][-1] == "mask_gen"
        # The accepted image is the real anomaly, scored by the real QE and masked by the real MG.
        final = record["final"]
        assert np.array_equal(load_image(final["anomaly_path"]), real)
        assert final["passed"] and record["reverse"]["mask_iou_gt"] > 0.5
        assert Path(record["reverse"]["gt_mask"]).is_file()
        # Messages are the graph's own: same system prompt and observation formats.
        messages = record["messages"]
        subject = load_catalog().category("metal_nut").subject
        assert messages[0]["content"] == prompts.system_prompt(category="metal_nut", anomaly_type="scratch", subject=subject,
                                                               max_steps=10, max_image_gens=3)
        assert messages[1]["content"] == prompts.task_prompt(anomaly_type="scratch", subject=subject)
        evaluations = [m["content"] for m in messages if m["role"] == "tool" and m["name"] == "quality_eval"]
        assert len(evaluations) == stage and "PASS" in evaluations[-1]
        assert all("FAIL" in e and "Fixes:" in e for e in evaluations[:-1])
        if stage == 2:
            prompts_used = [json.loads(c["function"]["arguments"])["prompt"] for m in messages
                            for c in m.get("tool_calls") or [] if c["function"]["name"] == "image_gen"]
            fixes = parse_fixes(evaluations[0].split("Fixes:")[1])
            refined = parse_instruction(prompts_used[1])
            assert fixes and all(str(getattr(refined, f.attribute)) == f.value for f in fixes)
            # The failed attempt's image is stored beside the JSONL.
            assert Path(record["images"]["2"]).is_absolute() or (Path(final["run_dir"]) / record["images"]["2"]).is_file()


def test_a_folder_without_anomalies_is_refused_with_the_expected_layout(tmp_path):
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ReverseError, match="ground_truth"):
        list_anomalies(tmp_path)


def test_normals_for_the_fixture_differ_from_the_eval_tasks_images():
    from training.data import eval_image_hashes
    from tools.image_store import content_id

    held_out = eval_image_hashes(128)
    assert content_id(sample_image("metal_nut", 0, size=128, seed=5)) not in held_out
    assert content_id(sample_image("metal_nut", 0, size=128, seed=0)) in held_out
