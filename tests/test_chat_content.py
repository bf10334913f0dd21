"""Chat text reaches every chat template: string contents (what vlmrun and the server send for
text-only turns, system messages and history) and text parts are handed to a template in the form
it renders (issue 10, item 5), and the token ids of the first-party families do not change."""

from __future__ import annotations

import pytest

from vlm.config import load_model_config
from vlm.errors import InputError
from vlm.inputs.messages import normalize_messages
from vlm.inputs.preprocessor import ImagePromptPreprocessor, TextPreprocessor, template_content_form
from vlm.plugin.manager import build_preprocessor, choose_plugin

#: iterates parts only, as SmolVLM's template does: a string content renders as nothing
PARTS_ONLY = (
    "{% for m in messages %}<|{{ m.role }}|>"
    "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}\n"
    "{% endfor %}"
)
#: renders roles only, never any text
NO_TEXT = "{% for m in messages %}<|{{ m.role }}|>\n{% endfor %}"

CHAT = [
    {"role": "system", "content": "Be brief, sailor."},
    {"role": "user", "content": "Name a red fruit."},
    {"role": "assistant", "content": "A cherry."},
    {"role": "user", "content": "And a yellow one?"},
]
TEXTS = [m["content"] for m in CHAT]


class PlainVLM(ImagePromptPreprocessor):
    """The base's prompt plumbing with no image handling (text-only chats need none)."""

    placeholder = image_token = "<image>"


def tokenizer_of(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def with_template(kind: str, path: str, template: str) -> TextPreprocessor | PlainVLM:
    """A text (``kind`` "text") or image-prompt preprocessor for ``path`` that renders ``template``."""
    tokenizer = tokenizer_of(path)
    if kind == "text":
        tokenizer.chat_template = template
        return TextPreprocessor(tokenizer)
    pre = PlainVLM(tokenizer, None, path)
    pre.chat_template = template
    return pre


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory) -> dict[str, str]:
    """One tiny checkpoint per first-party family (and template flavour)."""
    from vlm_plugin_internvl.testing import write_tiny_internvl
    from vlm_plugin_llava.testing import write_tiny_llava
    from vlm_plugin_qwen2vl.testing import write_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("chat-content")
    return {
        "llama": tiny_models("llama"),
        "qwen2": tiny_models("qwen2"),
        "internvl-hf": str(write_tiny_internvl(root / "internvl-hf", layout="hf")),
        "internvl-original": str(write_tiny_internvl(root / "internvl-original", layout="original")),
        "qwen2_vl": str(write_tiny_qwen2_vl(root / "qwen2_vl", "qwen2_vl")),
        "llava": str(write_tiny_llava(root / "llava", "llava-clip-llama")),
        "llava-next-mistral": str(write_tiny_llava(root / "llava-next", "llava-next-clip-mistral")),
    }


def family_preprocessor(path: str):
    """The preprocessor the engine builds for ``path`` (through the plugin that claims it)."""
    config = load_model_config(path)
    return build_preprocessor(config, tokenizer_of(path), choose_plugin(config.hf_config))


def test_content_form_is_probed_from_the_template(tiny_qwen2):
    tokenizer = tokenizer_of(tiny_qwen2)

    def form(template: str) -> str:
        return template_content_form(
            lambda messages: tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        )

    assert form(tokenizer.chat_template) == "string"  # ChatML concatenates strings, fails on a list
    assert form(PARTS_ONLY) == "parts"
    assert form("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% endif %}{% endfor %}") == "string"
    # a list printed as its repr is not rendered text
    assert form("{% for m in messages %}{{ m.content }}{% endfor %}") == "string"
    assert form("{% for m in messages %}{{ m.content | tojson }}{% endfor %}") == "string"


@pytest.mark.parametrize("kind", ["text", "image"])
def test_parts_only_template_renders_string_contents(tiny_qwen2, kind):
    pre = with_template(kind, tiny_qwen2, PARTS_ONLY)
    inputs = pre(CHAT)
    # (transformers' jinja trims the newline after a block tag)
    assert inputs.prompt == "".join(f"<|{m['role']}|>{m['content']}" for m in CHAT)
    assert inputs.token_ids == pre.tokenizer(inputs.prompt, add_special_tokens=False)["input_ids"]
    # text parts and mixed contents come out the same
    mixed = [{**m, "content": [{"type": "text", "text": m["content"]}]} if i % 2 else m for i, m in enumerate(CHAT)]
    assert pre(mixed).prompt == inputs.prompt


@pytest.mark.parametrize("kind", ["text", "image"])
def test_template_without_user_text_is_refused_in_one_line(tiny_qwen2, kind):
    pre = with_template(kind, tiny_qwen2, NO_TEXT)
    with pytest.raises(InputError) as info:
        pre(CHAT)
    message = str(info.value)
    assert "renders no user text" in message and "--no-chat-template" in message and "\n" not in message
    assert pre("a plain prompt").prompt == "a plain prompt"  # plain prompts still work


def test_probe_runs_once_per_template(tiny_qwen2):
    calls = []

    class Counting:
        def __init__(self, tokenizer):
            self.tokenizer, self.chat_template = tokenizer, PARTS_ONLY

        def apply_chat_template(self, messages, **kwargs):
            calls.append(kwargs.get("add_generation_prompt", False))
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

        def __call__(self, *args, **kwargs):
            return self.tokenizer(*args, **kwargs)

    tokenizer = Counting(tokenizer_of(tiny_qwen2))
    pre = TextPreprocessor(tokenizer)
    for _ in range(3):
        pre(CHAT)
    assert len(calls) == 2 + 3  # two probes, then one rendering per prompt
    tokenizer.chat_template = NO_TEXT  # a new template is probed again
    with pytest.raises(InputError, match="renders no user text"):
        pre(CHAT)


@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "internvl-hf", "internvl-original", "qwen2_vl", "llava", "llava-next-mistral"]
)
def test_every_family_renders_system_history_and_user_text(checkpoints, family):
    pre = family_preprocessor(checkpoints[family])
    inputs = pre(CHAT)
    for text in TEXTS:
        assert text in inputs.prompt
        assert text in pre.tokenizer.decode(inputs.token_ids)
    # the same chat in text parts renders the same prompt
    assert pre([{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]).prompt == inputs.prompt


@pytest.mark.parametrize(
    "family", ["llama", "qwen2", "internvl-hf", "internvl-original", "qwen2_vl", "llava", "llava-next-mistral"]
)
def test_family_token_ids_are_unchanged(checkpoints, family):
    """What the preprocessors rendered before content forms were probed, token for token."""
    pre = family_preprocessor(checkpoints[family])
    tokenizer = pre.tokenizer
    if isinstance(pre, TextPreprocessor):
        # string contents went to the tokenizer's template as they were
        before = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(before, add_special_tokens=False)["input_ids"]
    else:
        # normalized messages, rewritten by the plugin, through the processor's template
        messages = pre.prepare_messages(normalize_messages(CHAT))
        before = tokenizer.apply_chat_template(
            messages, chat_template=pre.chat_template, tokenize=False, add_generation_prompt=True
        )
        bos = tokenizer.bos_token
        ids = tokenizer(before, add_special_tokens=not (bos and before.startswith(bos)))["input_ids"]
    inputs = pre(CHAT)
    assert inputs.prompt == before
    assert inputs.token_ids == ids
