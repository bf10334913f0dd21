"""Where a reply's text starts, decided per API (issue: SentencePiece's word-start space).

SentencePiece tokenizers (Llama-2, LLaVA-1.5) mark a word start with "▁": the first word of a
reply decodes as " Paris" after the prompt but as "Paris" on its own. vlm's rule:

- a chat reply (the prompt was rendered from messages: ``LLM.chat``, ``/v1/chat/completions``,
  ``vlmrun`` with a chat template) is a message of its own: its text is
  ``tokenizer.decode(new_ids)``, as transformers gives it and OpenAI chat clients expect;
- a completion (a string or token-id prompt: ``LLM.generate``, ``/v1/completions``,
  ``--no-chat-template``) continues the prompt: ``decode(prompt + new)[len(decode(prompt)):]``,
  so appending it to the prompt gives the whole text back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.engine.input_processor import InputProcessor
from vlm.inputs import ModelInputs
from vlm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", "▁,", "▁indeed", ":", "▁ASSISTANT"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def _reply(tokenizer, prompt_ids, new_ids, chat):
    processor = InputProcessor(
        None, tokenizer, vocab_size=len(tokenizer), max_model_len=64, cache_capacity=64, position_dims=1
    )
    seq = processor.sequence("r", ModelInputs(token_ids=prompt_ids, chat=chat), SamplingParams(), seed=0)
    return "".join(seq.detokenizer.add(token) for token in new_ids) + seq.detokenizer.flush()


def test_sentencepiece_reply_text_per_api(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    prompt = tok("ASSISTANT :", add_special_tokens=False)["input_ids"]
    new = tok("Paris , indeed", add_special_tokens=False)["input_ids"]
    assert tok.decode(new) == "Paris , indeed"  # transformers: the reply on its own
    chat = _reply(tok, prompt, new, chat=True)
    completion = _reply(tok, prompt, new, chat=False)
    assert chat == tok.decode(new)
    assert completion == " Paris , indeed"
    assert tok.decode(prompt) + completion == tok.decode(prompt + new)


def test_chat_messages_mark_inputs_as_chat_and_strings_do_not(tiny_qwen2):
    from vlm import LLM

    llm = LLM(tiny_qwen2)
    assert llm.engine.preprocess([{"role": "user", "content": "Hi"}]).chat is True
    assert llm.engine.preprocess("Hi").chat is False
    assert llm.engine.preprocess([1, 2, 3]).chat is False


def test_byte_level_replies_are_the_same_either_way(tiny_qwen2):
    """Byte-level BPE (Qwen, Llama-3) has no word-start marker: both rules give the same text."""
    from vlm.loader import load_tokenizer

    tok = load_tokenizer(Path(tiny_qwen2))
    prompt = tok("The capital is", add_special_tokens=False)["input_ids"]
    new = tok(" Paris, indeed", add_special_tokens=False)["input_ids"]
    assert _reply(tok, prompt, new, chat=True) == _reply(tok, prompt, new, chat=False) == " Paris, indeed"
    assert len(new) > 1
