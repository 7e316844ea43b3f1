"""QE's camera-consistency checks on real renders: a defect whose noise, JPEG blocking, interior texture
or outline differs from its surroundings fails and names the vocabulary fix; the same defect drawn
before the camera's noise and compression (as a real defect is photographed) passes that check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from evals import bench_qe
from evals.synth import normal_for, synthesize
from tools.image_gen import ProceduralEngine
from tools.image_gen.camera import JpegSettings, jpeg_roundtrip
from tools.prompt_gen import TemplatePromptGenerator
from tools.quality_eval import BLOCK_BAND, FLAT_INTERIOR, MIN_PIXELS, NOISE_BAND, SEAM_ENERGY, MetricJudge
from tools.types import EvaluationRequest
from tools.vocabulary import apply_fixes, parse_fixes, parse_instruction, render_instruction

ENGINE = ProceduralEngine()
PG = TemplatePromptGenerator()
JUDGE = MetricJudge(use_features=False)
SIZE = 160
PROMPT = "Add one medium dark stain with soft edges, high contrast, in the center of the capsule."


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _request(syn, prompt: str | None = None) -> EvaluationRequest:
    return EvaluationRequest(category=syn.category, anomaly_type=syn.anomaly_type, prompt=prompt or syn.prompt,
                             is_texture=syn.is_texture)


@pytest.fixture(scope="module")
def photographed():
    """A capsule photographed with sensor noise; the engine's camera-consistent stain on it; and the same
    stain drawn on the noise-free capsule and pasted into the noisy photo (no noise inside the defect)."""
    clean = normal_for("capsule", 0, size=SIZE, seed=3)
    normal = _u8(clean + np.random.default_rng(0).normal(0, 3.0, clean.shape[:2])[..., None])
    syn = synthesize(ENGINE, PG, "capsule", "faulty_imprint", normal, seed=5, prompt=PROMPT)
    assert bench_qe.visible(normal, syn.result.image, syn.result.region)
    drawn_clean = synthesize(ENGINE, PG, "capsule", "faulty_imprint", clean, seed=5, prompt=PROMPT).result
    region = ndi.binary_dilation(drawn_clean.region, iterations=1)
    noise_free = _u8(ndi.gaussian_filter(drawn_clean.image.astype(np.float32), (0.8, 0.8, 0)))  # the sample's own grain too
    pasted = normal.copy()
    pasted[region] = noise_free[region]
    return syn, normal, syn.result.image, pasted


def _fixes(ev) -> dict[str, str]:
    return {f.attribute: f.value for f in ev.fixes}


def test_camera_consistent_render_passes_the_noise_check(photographed) -> None:
    syn, normal, consistent, _ = photographed
    ev = JUDGE.evaluate(normal, consistent, _request(syn))
    assert NOISE_BAND[0] <= ev.details["noise_mismatch"] <= NOISE_BAND[1]
    assert "Camera mismatch" not in ev.review and ev.passed, ev.review


def test_defect_pasted_without_the_image_noise_fails_the_check_and_asks_to_match_it(photographed) -> None:
    syn, normal, consistent, pasted = photographed
    ev = JUDGE.evaluate(normal, pasted, _request(syn))
    assert ev.details["noise_mismatch"] < NOISE_BAND[0]
    assert "Camera mismatch" in ev.review and "cleaner" in ev.review
    assert ev.score < JUDGE.evaluate(normal, consistent, _request(syn)).score - 1.0
    assert _fixes(ev)["noise"] == "match"
    # The fix is a word of the vocabulary: it survives the review text and the instruction round trip.
    assert any(f.attribute == "noise" for f in parse_fixes(ev.review))
    spec = apply_fixes(parse_instruction(PROMPT), ev.fixes)
    assert parse_instruction(render_instruction(spec, "the capsule")).noise == "match"


def test_jpeg_blocking_mismatch(photographed) -> None:
    """The engine told the input's JPEG quality re-encodes the defect's blocks and passes; the defect pasted
    with foreign, much coarser blocks fails."""
    syn, normal, _, _ = photographed
    normal_j = jpeg_roundtrip(normal, JpegSettings(quality=70))
    drawn = synthesize(ENGINE, PG, "capsule", "faulty_imprint", normal_j, seed=5, prompt=PROMPT, jpeg_quality=70).result
    ok = JUDGE.evaluate(normal_j, drawn.image, _request(syn))
    assert ok.details["blocky_normal"] >= 1.2
    assert BLOCK_BAND[0] <= ok.details["blockiness_mismatch"] <= BLOCK_BAND[1]
    assert "Compression mismatch" not in ok.review
    region = ndi.binary_dilation(drawn.region, iterations=1)
    pasted = drawn.image.copy()
    pasted[region] = jpeg_roundtrip(drawn.image, JpegSettings(quality=8))[region]
    bad = JUDGE.evaluate(normal_j, pasted, _request(syn))
    assert not BLOCK_BAND[0] <= bad.details["blockiness_mismatch"] <= BLOCK_BAND[1]
    assert "Compression mismatch" in bad.review and _fixes(bad)["noise"] == "match"
    assert bad.score < ok.score


def test_a_png_input_is_not_judged_for_jpeg_blocking(photographed) -> None:
    syn, normal, consistent, _ = photographed
    ev = JUDGE.evaluate(normal, consistent, _request(syn))
    assert ev.details["blocky_normal"] < 1.2 and "blockiness_mismatch" not in ev.details


@pytest.fixture(scope="module")
def textured():
    """A stain on a carpet whose render keeps the weave, and the same stain as a flat tone (noise kept)."""
    normal = normal_for("carpet", 0, size=SIZE, seed=3)
    prompt = "Add one large dark stain with soft edges, high contrast, in the center of the carpet."
    syn = synthesize(ENGINE, PG, "carpet", "color", normal, seed=7, prompt=prompt)
    ctx = bench_qe._Ctx(ENGINE, syn, normal)
    return syn, ctx, bench_qe.flat(ctx, np.random.default_rng(1))


def test_textured_interior_passes_and_flat_interior_fails(textured) -> None:
    syn, ctx, flat = textured
    assert flat is not None
    good = JUDGE.evaluate(syn.normal, syn.result.image, _request(syn))
    assert good.details["interior_texture"] >= FLAT_INTERIOR[1] and "Flat patch" not in good.review, good.review
    bad = JUDGE.evaluate(syn.normal, flat, _request(syn))
    assert bad.details["interior_texture"] < FLAT_INTERIOR[1]
    assert "Flat patch" in bad.review and _fixes(bad)["interior"] == "textured"
    assert bad.score < good.score


def test_soft_stain_passes_the_seam_check_and_a_binary_alpha_paste_fails(photographed) -> None:
    syn, normal, consistent, _ = photographed
    good = JUDGE.evaluate(normal, consistent, _request(syn))
    assert good.details["seam_energy"] < SEAM_ENERGY[0] and "seam" not in good.review
    # The same change applied at full strength wherever it reaches a fifth of its peak: a pasted sticker.
    change = consistent.astype(np.float32) - normal
    strength = np.abs(change).max(axis=2)
    hard = ndi.binary_fill_holes(strength >= 0.2 * np.percentile(strength[syn.result.region], 90))
    sticker = normal.astype(np.float32).copy()
    sticker[hard] += np.median(change[syn.result.region], axis=0)
    bad = JUDGE.evaluate(normal, _u8(sticker), _request(syn))
    assert bad.details["seam_energy"] > good.details["seam_energy"]
    assert "seam" in bad.review and _fixes(bad)["softness"] == "soft"


def test_the_bench_camera_breaker_scores_lower_than_the_camera_consistent_render(photographed) -> None:
    syn, normal, consistent, _ = photographed
    ctx = bench_qe._Ctx(ENGINE, syn, normal, noise=3.0)
    good = JUDGE.evaluate(normal, consistent, _request(syn))
    rng = np.random.default_rng(3)
    for _ in range(3):
        bad = JUDGE.evaluate(normal, bench_qe.camera(ctx, rng), _request(syn))
        assert bad.score < good.score - 1.0 and _fixes(bad).get("noise") == "match", bad.review


def test_size_is_judged_against_the_instructions_word_with_the_engines_ranges() -> None:
    """QE calls a defect too large only beyond what IG draws for the instruction's size word: a large stain
    the engine drew for "large" passes the size check whatever the type's typical size (PG decides how
    often a type is large), and the same defect read as "small" is too large and QE asks for a smaller word."""
    normal = normal_for("capsule", 0, size=SIZE, seed=3)
    prompt = "Add one large dark stain with soft edges, medium contrast, in the center of the capsule."
    syn = synthesize(ENGINE, PG, "capsule", "faulty_imprint", normal, seed=6, prompt=prompt)
    asked_large = EvaluationRequest(category="capsule", anomaly_type="poke", prompt=prompt)
    asked_small = EvaluationRequest(category="capsule", anomaly_type="poke", prompt=prompt.replace("large", "small"))
    fine = JUDGE.evaluate(normal, syn.result.image, asked_large)
    bad = JUDGE.evaluate(normal, syn.result.image, asked_small)
    assert bad.details["area_vs_object"] > 0.025  # beyond "small"
    assert "Too large" not in fine.review
    assert "Too large" in bad.review and _fixes(bad)["size"] in ("tiny", "small", "medium")


def test_a_defect_of_fewer_pixels_than_the_image_resolves_fails_and_asks_for_a_larger_word() -> None:
    """A speck of a few pixels is no labelable defect at the image's resolution (a mask on it teaches a
    detector to fire on normal texture): QE fails it and names a larger size word, two or more words up
    for a speck under half the floor; a defect of the same look that covers enough pixels gets no size
    complaint."""
    normal = normal_for("capsule", 0, size=SIZE, seed=3)
    prompt = "Add one tiny dark stain with sharp edges, high contrast, in the center of the capsule."
    for seed in range(20):
        speck = synthesize(ENGINE, PG, "capsule", "faulty_imprint", normal, seed=seed, prompt=prompt)
        if 0 < speck.result.region.sum() < MIN_PIXELS // 2:
            break
    else:
        pytest.fail("the engine drew no speck for 'tiny' in 20 seeds")
    small = EvaluationRequest(category="capsule", anomaly_type="poke", prompt=prompt)
    bad = JUDGE.evaluate(normal, speck.result.image, small)
    assert not bad.passed and "Too small for this resolution" in bad.review
    assert _fixes(bad)["size"] in ("medium", "large")
    bigger = prompt.replace("tiny", "medium")
    blot = synthesize(ENGINE, PG, "capsule", "faulty_imprint", normal, seed=seed, prompt=bigger)
    fine = JUDGE.evaluate(normal, blot.result.image, EvaluationRequest(category="capsule", anomaly_type="poke", prompt=bigger))
    assert blot.result.region.sum() >= MIN_PIXELS and "Too small" not in fine.review


def test_the_size_fix_goes_further_up_the_further_a_defect_is_under_the_resolution_floor() -> None:
    from tools.quality_eval import _size_steps

    assert [_size_steps(a) for a in (MIN_PIXELS - 1, MIN_PIXELS // 2, MIN_PIXELS // 2 - 1, MIN_PIXELS // 6 - 1, 1)] == [1, 1, 2, 3, 3]
