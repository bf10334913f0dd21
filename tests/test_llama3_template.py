"""A Llama-3-style chat template (``bos_token`` written by the template, a date variable filled in
at render time): vlm renders and tokenizes exactly what transformers' ``apply_chat_template``
gives (one BOS, not two), and greedy tokens equal transformers' ``generate`` on it."""

from __future__ import annotations

import shutil

import pytest
import torch

from vlm import LLM, SamplingParams

LLAMA3_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: {{ strftime_now('%d %b %Y') }}\n\n{{ system }}<|eot_id|>"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def llama3_dir(tiny_models, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("llama3") / "model"
    shutil.copytree(tiny_models("llama"), path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.bos_token = "<|endoftext|>"  # the byte-level test tokenizer has none; Llama 3 has <|begin_of_text|>
    tokenizer.chat_template = LLAMA3_STYLE
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_llama3_style_template_renders_and_answers_as_transformers(llama3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_dir)
    assert tokenizer.bos_token is not None
    expected_text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    llm = LLM(llama3_dir)
    inputs = llm.engine.preprocess(MESSAGES)
    assert inputs.prompt == expected_text and "Today Date: " in expected_text
    assert inputs.token_ids == list(expected_ids)
    assert inputs.token_ids.count(tokenizer.bos_token_id) == 1

    model = AutoModelForCausalLM.from_pretrained(llama3_dir, dtype=torch.float32).eval()
    ids = torch.tensor([inputs.token_ids])
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    reference = out[0, ids.shape[1] :].tolist()
    [got] = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12, min_tokens=12, ignore_eos=True))
    assert got.outputs[0].token_ids == reference
