"""The shared instruction vocabulary: what PG writes, IG reads back; fixes change only what they name."""

import pytest

from tools.prompt_gen import TemplatePromptGenerator
from tools.types import KnowledgeEntry, PromptRequest
from tools.vocabulary import DefectSpec, Fix, apply_fixes, format_fixes, parse_fixes, parse_instruction, render_instruction


@pytest.mark.parametrize(
    "spec",
    [
        DefectSpec(shape="scratch", family="line", position="top-left", size="small", contrast="high", softness="sharp", colour="light"),
        DefectSpec(shape="stain", family="blob", position="center", size="large", contrast="low", softness="soft", colour="brown", count=2),
        DefectSpec(shape="hole", family="hole", position="edge", size="tiny", contrast="medium", colour="dark", region="rim"),
    ],
)
def test_rendered_instruction_parses_back_to_the_same_spec(spec):
    assert parse_instruction(render_instruction(spec, subject="the bottle")) == spec


def test_free_text_words_and_synonyms_are_read():
    spec = parse_instruction("Please put two big, faint brownish smudges near the lower right with blurred edges")
    assert (spec.shape, spec.family, spec.count, spec.size, spec.contrast, spec.position, spec.softness) == (
        "stain", "blob", 2, "large", "low", "bottom-right", "soft")


def test_fixes_change_only_their_attribute_and_ignore_unknown_values():
    spec = parse_instruction("Add one small dark scratch, low contrast, in the top of the object.")
    fixed = apply_fixes(spec, [Fix(attribute="contrast", value="high"), Fix(attribute="size", value="gigantic")])
    assert fixed.contrast == "high" and fixed.size == "small" and fixed.position == "top"


def test_review_fix_line_round_trips():
    fixes = [Fix(attribute="contrast", value="high"), Fix(attribute="position", value="center")]
    line = format_fixes(fixes)
    assert line == "Fixes: contrast=high; position=center"
    assert [(f.attribute, f.value) for f in parse_fixes("Too faint. " + line)] == [("contrast", "high"), ("position", "center")]


def test_template_pg_uses_the_knowledge_shape_and_applies_feedback():
    entry = KnowledgeEntry(category="bottle", anomaly_type="contamination", family="blob", shape="contamination",
                           appearance="a", physics="b", location="c", typical={"colour": "brown", "contrast": "medium"})
    generator = TemplatePromptGenerator()
    request = PromptRequest(category="bottle", anomaly_type="contamination", subject="the bottle", knowledge=[entry], seed=1)
    first = parse_instruction(generator.generate(request))
    assert first.shape == "contamination" and first.colour == "brown"
    reworked = parse_instruction(generator.generate(request.model_copy(update={"feedback": "Too faint. Fixes: contrast=high"})))
    assert reworked.contrast == "high" and reworked.shape == "contamination"
    assert generator.generate(request) == generator.generate(request)
