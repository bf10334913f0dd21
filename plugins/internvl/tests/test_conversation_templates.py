"""The original OpenGVLab layout answers the prompt ``model.chat`` builds, for every conversation
template config.json can name (InternVL 1.5 / 2 / 2.5 / 3), one- and multi-turn, with and without a
picture, with the template's system message or the user's.

The reference is ``InternVLChatModel.chat``'s prompt rules written out plainly here (independent
of the plugin's code: the template table below is typed from OpenGVLab's published definitions),
tokenized as ``model.chat`` does (``tokenizer(query)``). Greedy parity: vlm's answer to the chat
messages equals transformers' ``InternVLForConditionalGeneration`` (same weights, the Hugging Face
sibling directory) generating from the reference prompt.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm_plugin_internvl.testing import write_tiny_internvl

SYSTEM_V2 = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
SYSTEM_V25 = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

#: name -> (system template, default system message, user marker, assistant marker, separator)
REFERENCE_TEMPLATES = {
    "Hermes-2": ("<|im_start|>system\n{}", SYSTEM_V2, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "internlm2-chat": (
        "<|im_start|>system\n{}",
        SYSTEM_V2,
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    "phi3-chat": ("<|system|>\n{}", SYSTEM_V2, "<|user|>\n", "<|assistant|>\n", "<|end|>"),
    "internvl2_5": (
        "<|im_start|>system\n{}",
        SYSTEM_V25,
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
}


def model_chat_query(template, question, history=(), num_patches_list=(), tokens_per_tile=1, system_message=None):
    """``InternVLChatModel.chat``'s query: '<image>\\n' before a first question that has a picture
    but no placeholder, the MPT-style conversation, then each <image> -> <img> + context + </img>."""
    if not history and num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    system_template, default_system, user, assistant, sep = REFERENCE_TEMPLATES[template]
    query = system_template.format(default_system if system_message is None else system_message) + sep
    for old_question, old_answer in history:
        query += user + old_question + sep + assistant + old_answer + sep
    query += user + question + sep + assistant
    for num_patches in num_patches_list:
        query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * tokens_per_tile * num_patches + "</img>", 1)
    return query


def picture(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny original-layout checkpoint once per template (config.json's "template" differs)."""
    root = tmp_path_factory.mktemp("internvl-templates")
    base = write_tiny_internvl(root / "base" / "original", "original", seed=0, max_patches=1)
    write_tiny_internvl(root / "base" / "hf", "hf", seed=0, max_patches=1)
    paths = {}
    for name in REFERENCE_TEMPLATES:
        path = root / name / "original"
        shutil.copytree(base, path)
        config = json.loads((path / "config.json").read_text())
        config["template"] = name
        (path / "config.json").write_text(json.dumps(config, ensure_ascii=False))
        paths[name] = str(path)
    return paths, str(root / "base" / "hf")


@pytest.fixture(scope="module")
def engines(checkpoints):
    paths, _ = checkpoints
    return {name: LLM(path, dtype="float32") for name, path in paths.items()}


def _tokens_per_tile(llm: LLM) -> int:
    return llm.engine.preprocessor.tokens_per_tile


def _image_turn(image, text):
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


CASES = {
    "text, one turn": lambda img: ([{"role": "user", "content": "Hello there"}], "Hello there", (), 0, None),
    "picture, one turn": lambda img: ([_image_turn(img, "What is this?")], "What is this?", (), 1, None),
    "picture, multi-turn": lambda img: (
        [
            _image_turn(img, "What is this?"),
            {"role": "assistant", "content": "A test."},
            {"role": "user", "content": "Sure?"},
        ],
        "Sure?",
        (("<image>\nWhat is this?", "A test."),),
        1,
        None,
    ),
    "text, the user's system message": lambda img: (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "Hi",
        (),
        0,
        "Be brief.",
    ),
}


@pytest.mark.parametrize("template", list(REFERENCE_TEMPLATES))
@pytest.mark.parametrize("case", list(CASES))
def test_prompt_ids_equal_model_chat(engines, template, case):
    llm = engines[template]
    image = picture(3)
    messages, question, history, images, system = CASES[case](image)
    inputs = llm.engine.preprocess(messages)
    num_patches = [img.pixel_values.shape[0] for img in inputs.images]
    assert len(num_patches) == images
    query = model_chat_query(template, question, history, num_patches, _tokens_per_tile(llm), system)
    expected = llm.tokenizer(query)["input_ids"]
    assert inputs.token_ids == expected, (template, case, inputs.prompt, query)


def test_hermes_2_greedy_answer_equals_transformers_on_model_chats_prompt(engines, checkpoints):
    from transformers import InternVLForConditionalGeneration

    _, hf_dir = checkpoints
    llm = engines["Hermes-2"]
    image = picture(5)
    inputs = llm.engine.preprocess([_image_turn(image, "Describe it.")])
    query = model_chat_query(
        "Hermes-2", "Describe it.", (), [inputs.images[0].pixel_values.shape[0]], _tokens_per_tile(llm)
    )
    ids = llm.tokenizer(query, return_tensors="pt")["input_ids"]
    reference = InternVLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = reference.generate(
            input_ids=ids,
            pixel_values=inputs.images[0].pixel_values,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
        )
    expected = out[0, ids.shape[1] :].tolist()
    assert len(set(expected)) >= 4, "degenerate reference output proves little"
    [got] = llm.chat(
        [_image_turn(image, "Describe it.")], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    assert got.outputs[0].token_ids == expected


def test_unknown_template_name_is_a_one_line_error(checkpoints, tmp_path):
    from vlm.errors import ConfigError

    paths, _ = checkpoints
    path = tmp_path / "unknown"
    shutil.copytree(paths["Hermes-2"], path)
    config = json.loads((path / "config.json").read_text())
    config["template"] = "vicuna_v9"
    (path / "config.json").write_text(json.dumps(config, ensure_ascii=False))
    with pytest.raises(ConfigError, match=r"conversation template 'vicuna_v9'.*Hermes-2.*--no-chat-template") as err:
        LLM(str(path))
    assert "\n" not in str(err.value)


def test_hf_layout_keeps_its_chat_template(checkpoints):
    _, hf_dir = checkpoints
    llm = LLM(hf_dir, dtype="float32")
    assert getattr(llm.engine.preprocessor, "conversation", None) is None
    inputs = llm.engine.preprocess([{"role": "user", "content": "Hello there"}])
    assert inputs.prompt == llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=False, add_generation_prompt=True
    )
