"""The conversation templates OpenGVLab's ``InternVLChatModel.chat`` builds its prompts with.

An InternVL checkpoint in the original layout names one in config.json (``"template"``), and
``model.chat`` renders with it, not with tokenizer_config.json's chat template: its own system
message, its role markers, and its separator after every turn (``<|im_end|>`` with no newline for
``Hermes-2``, with a newline for ``internvl2_5``). Written here from the published definitions
(the "MPT" separator style of OpenGVLab's ``conversation.py``): the system block, then each turn as
``role marker + text + separator``, then the assistant's marker to generate after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm.plugin import InputError

#: InternVL 1.5 / 2's system message (Chinese: "You are the Shusheng multimodal model, developed by
#: Shanghai AI Lab and SenseTime, named InternVL, a helpful and harmless AI assistant.")
INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
#: InternVL 2.5 / 3's system message
INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system_template: str  # holds "{system_message}"
    system_message: str  # the default, when the conversation brings none
    user: str  # role markers, written before each turn's text
    assistant: str
    sep: str  # after the system block and after every turn

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt ``model.chat`` builds for this conversation (string contents; images already
        written as ``<image>`` in the text). A system message replaces the template's default."""
        system = self.system_message
        turns = []
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if not isinstance(content, str):
                raise InputError(f"message {index}: InternVL's {self.name} template takes text contents")
            if role == "system":
                system = content
            elif role in ("user", "assistant"):
                turns.append((self.user if role == "user" else self.assistant) + content + self.sep)
            else:
                raise InputError(
                    f"message {index} has role {role!r}, which InternVL's {self.name} template does not know; "
                    "use system, user or assistant"
                )
        prompt = self.system_template.format(system_message=system) + self.sep + "".join(turns)
        return prompt + self.assistant if add_generation_prompt else prompt


def _chatml(name: str, system_message: str, sep: str) -> ConversationTemplate:
    return ConversationTemplate(
        name,
        "<|im_start|>system\n{system_message}",
        system_message,
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
        sep,
    )


#: ``config.json "template"`` -> the template (InternVL 1.5 to 3)
TEMPLATES: dict[str, ConversationTemplate] = {
    # Hermes-2 and internlm2-chat render alike; they differed only in training-time BOS handling
    "Hermes-2": _chatml("Hermes-2", INTERNVL2_SYSTEM, "<|im_end|>"),
    "internlm2-chat": _chatml("internlm2-chat", INTERNVL2_SYSTEM, "<|im_end|>"),
    "phi3-chat": ConversationTemplate(
        "phi3-chat", "<|system|>\n{system_message}", INTERNVL2_SYSTEM, "<|user|>\n", "<|assistant|>\n", "<|end|>"
    ),
    "internvl2_5": _chatml("internvl2_5", INTERNVL2_5_SYSTEM, "<|im_end|>\n"),
}


def template_for(hf_config: Any) -> ConversationTemplate | None:
    """The template config.json names, ``None`` when it names none (the tokenizer's chat template
    is then used); a name vlm does not know is a one-line error listing the known ones."""
    name = getattr(hf_config, "template", None)
    if name is None:
        return None
    if name not in TEMPLATES:
        from vlm.plugin import ConfigError

        raise ConfigError(
            f"config.json names the conversation template {name!r}, which vlm-plugin-internvl does not know "
            f"({', '.join(TEMPLATES)}); send plain prompts (vlmrun --no-chat-template) or add it to "
            "vlm_plugin_internvl.conversation.TEMPLATES"
        )
    return TEMPLATES[name]
