"""Chat templates for SFT checkpoints: the Hermes ChatML one the local policy uses, and a compact variant.

Why a compact variant: the Hermes layout puts every tool's full JSON schema into the system prompt,
about 700 SmolLM2 tokens, which is 70% of a short trajectory. SFT on a 2-core CPU pays for every token
of every example, and inference pays for it on every turn. A fine-tuned policy has learned the tools'
names and arguments from the data (and the system prompt already says what each tool does), so the
compact template renders each as one line, ``- image_gen(prompt: string, image: integer)``, about 80
tokens in all, and keeps everything else byte for byte
as in `graph.inference.chat_template.HERMES_CHATML_TEMPLATE`: the system prompt, ``<tool_call>{json}</tool_call>``
calls, ``<tool_response>`` results, and the ``{% generation %}`` markers around each assistant turn
(its ``<|im_end|>`` included, so the model learns to stop). It is still rendered from the ``tools`` the
policy sends, so a changed schema changes the prompt.

The template is saved with the checkpoint (``tokenizer.chat_template``), so the `local` policy,
``serve-policy`` and TRL render a conversation the same way; `template_supports_tools` accepts it, so
`LocalModel` passes ``tools`` to it instead of writing the Hermes block itself.
"""

from __future__ import annotations

from graph.inference.chat_template import HERMES_CHATML_TEMPLATE

_HERMES_TOOLS_START = "{%- if tools %}"
_HERMES_TOOLS_END = "{%- endif %}{{- '<|im_end|>\\n' }}"

_COMPACT_TOOLS = (
    "{%- if tools %}"
    "{{- '\\n\\n# Tools' }}"
    "{%- for tool in tools %}"
    "{%- set function = tool['function'] if tool['function'] is defined else tool %}"
    "{{- '\\n- ' + function['name'] + '(' }}"
    "{%- for name, spec in (function['parameters']['properties'] or {}).items() %}"
    "{{- name + ': ' + (spec['type'] or 'any') }}{%- if not loop.last %}{{- ', ' }}{%- endif %}"
    "{%- endfor %}"
    "{{- ')' }}"
    "{%- endfor %}"
    "{{- '\\n\\nCall one tool per turn as <tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
)


def _compact() -> str:
    start = HERMES_CHATML_TEMPLATE.index(_HERMES_TOOLS_START)
    end = HERMES_CHATML_TEMPLATE.index(_HERMES_TOOLS_END) + len(_HERMES_TOOLS_END)
    return HERMES_CHATML_TEMPLATE[:start] + _COMPACT_TOOLS + HERMES_CHATML_TEMPLATE[end:]


COMPACT_CHATML_TEMPLATE = _compact()

TEMPLATES = {"hermes": HERMES_CHATML_TEMPLATE, "compact": COMPACT_CHATML_TEMPLATE}


def has_generation_markers(template: str | None) -> bool:
    """Whether a template marks assistant text with ``{% generation %}`` (needed for assistant-only loss)."""
    return bool(template) and "generation" in template and "endgeneration" in template
