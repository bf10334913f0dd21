"""CogVLM2 and CogVLM 1 through the engine against the plain-torch reference
(vlm_plugin_cogvlm.reference): 32 greedy tokens and every step's logits, with a picture and
without, all requests batched together; prompts prefilled in chunks that cut the picture; the SAT
layout answering as the Hub layout; the visual experts taking exactly the image tokens; and
``tensor_parallel_size=2`` answering as 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.testing.conformance import Conformance
from vlm.testing.logits import generate_with_logits
from vlm_plugin_cogvlm.reference import CogVLMReference, reference_inputs

PARAMS = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _user(text: str, picture: Image.Image | None = None) -> list[dict]:
    content = ([{"type": "image", "image": picture}] if picture is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


PROMPTS = {
    "picture": _user("Describe this.", _picture(1, (90, 50))),
    "another picture": _user("What is in it?", _picture(2, (40, 120))),
    "no picture": _user("Hello there, no picture today."),
    "two turns": [
        {
            "role": "user",
            "content": [{"type": "image", "image": _picture(3, (64, 64))}, {"type": "text", "text": "Hi"}],
        },
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "Of what?"},
    ],
    "plain string": "Once upon a time",
}


def _tolerance(reference_row: torch.Tensor) -> float:
    # the conformance kit's: 1e-4, relative to the logits' magnitude (float32 sums in another order)
    return 1e-4 * max(1.0, float(reference_row.abs().max()))


@pytest.fixture(scope="module", params=["cogvlm2", "cogvlm"])
def variant(request, cogvlm_checkpoints):
    path = cogvlm_checkpoints[request.param]
    llm = LLM(path, dtype="float32", num_threads=1)
    batched = dict(zip(PROMPTS, generate_with_logits(llm, list(PROMPTS.values()), PARAMS)))
    return path, llm, batched


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_tokens_and_logits_equal_the_reference(variant, case):
    path, llm, batched = variant
    tokens, logits = batched[case]
    assert len(set(tokens)) >= 10, tokens  # a random model that repeats one token proves little
    inputs = llm.engine.preprocess(PROMPTS[case])
    # the reference in float64: in float32 its own rounding was 6.2e-4 off float64 on "two turns"
    # (an AVX2 EPYC), more than the engine's 2.5e-4, and the tolerance is meant for the engine's
    reference = CogVLMReference.from_pretrained(path).double()
    extra = {k: v.double() if v.is_floating_point() else v for k, v in reference_inputs(inputs).items()}
    ref_logits = reference(torch.tensor([inputs.token_ids + tokens[:-1]]), **extra).logits.float()
    ref_logits = ref_logits[0, len(inputs.token_ids) - 1 :]
    assert ref_logits.argmax(-1).tolist() == tokens
    for step, (row, ref_row) in enumerate(zip(logits, ref_logits)):
        assert (row - ref_row).abs().max().item() <= _tolerance(ref_row), step


def test_batched_requests_answer_as_alone(variant):
    _, llm, batched = variant
    for case, prompt in PROMPTS.items():
        ((alone_tokens, alone_logits),) = generate_with_logits(llm, [prompt], PARAMS)
        assert alone_tokens == batched[case][0], case
        torch.testing.assert_close(alone_logits, batched[case][1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk", [7, 19])
def test_prefill_in_chunks_that_cut_the_picture(cogvlm_checkpoints, chunk):
    """CogVLM2's picture is tokens 1..18 (boi, 16 patches, eoi): chunks of 7 cut it inside, chunks
    of 19 end exactly at eoi, which must still take the language expert."""
    path = cogvlm_checkpoints["cogvlm2"]
    whole = LLM(path, dtype="float32", num_threads=1, enable_prefix_caching=False)
    chunked = LLM(path, dtype="float32", num_threads=1, enable_prefix_caching=False, max_num_batched_tokens=chunk)
    prompt = PROMPTS["picture"]
    ((want, want_logits),) = generate_with_logits(whole, [prompt], PARAMS)
    ((got, got_logits),) = generate_with_logits(chunked, [prompt], PARAMS)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)


def test_sat_layout_answers_as_the_hub_layout(cogvlm_checkpoints):
    prompts = [PROMPTS["picture"], PROMPTS["no picture"], PROMPTS["two turns"]]
    hub = generate_with_logits(LLM(cogvlm_checkpoints["cogvlm"], dtype="float32", num_threads=1), prompts, PARAMS)
    sat = generate_with_logits(LLM(cogvlm_checkpoints["sat"], dtype="float32", num_threads=1), prompts, PARAMS)
    for (hub_tokens, hub_logits), (sat_tokens, sat_logits) in zip(hub, sat):
        assert sat_tokens == hub_tokens
        torch.testing.assert_close(sat_logits, hub_logits, atol=1e-5, rtol=0)


# -- the visual experts take the image tokens, and only them ------------------------------------


def _with_other_vision_experts(path: str, out: Path) -> str:
    """A copy of the checkpoint whose vision-expert weights (QKV, dense, MLP) are redrawn."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(path, out)
    tensors = load_file(str(out / "model.safetensors"))
    generator = torch.Generator().manual_seed(99)
    for name, tensor in tensors.items():
        if ".vision_expert_" in name or ".vision_mlp." in name:
            tensors[name] = 0.3 * torch.randn(tensor.shape, generator=generator)
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def _hidden_states(path: str, prompt) -> tuple[list[int], torch.Tensor]:
    conformance = Conformance("cogvlm", path)
    inputs = conformance.preprocess(prompt)
    harness = conformance.harness()
    _, hidden = harness.step(prefills=[(harness.sequence(inputs), len(inputs.token_ids))])
    return inputs.token_ids, hidden


def test_vision_expert_weights_change_image_tokens_only(cogvlm_checkpoints, tmp_path):
    path = cogvlm_checkpoints["cogvlm2"]
    other = _with_other_vision_experts(path, tmp_path / "other-experts")
    ids, hidden = _hidden_states(path, PROMPTS["picture"])
    _, other_hidden = _hidden_states(other, PROMPTS["picture"])
    image_rows = range(1, 18)  # boi and the patches take the vision expert
    assert torch.equal(hidden[0], other_hidden[0])  # BOS comes before the picture
    for row in image_rows:
        assert (hidden[row] - other_hidden[row]).abs().max() > 1e-2, row
    # a text-only prompt never meets the vision expert: bit for bit the same
    _, text = _hidden_states(path, PROMPTS["no picture"])
    _, other_text = _hidden_states(other, PROMPTS["no picture"])
    assert torch.equal(text, other_text)


def test_each_pictures_last_token_takes_the_language_expert(cogvlm_checkpoints, tmp_path):
    """Only the eoi row's own layers are checked here: with the vision experts' weights redrawn
    the eoi row still changes (it attends to the image rows), but with the *language* experts'
    dense redrawn in the last layer alone, its last-layer output moves while a patch row's does not."""
    from safetensors.torch import load_file, save_file

    path = cogvlm_checkpoints["cogvlm2"]
    out = tmp_path / "other-last-dense"
    shutil.copytree(path, out)
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.language_expert_dense.weight"
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(out / "model.safetensors"))
    _, hidden = _hidden_states(path, PROMPTS["picture"])
    _, other = _hidden_states(str(out), PROMPTS["picture"])
    eoi, patch = 18, 10
    assert torch.equal(hidden[patch], other[patch])
    assert (hidden[eoi] - other[eoi]).abs().max() > 1e-2


# -- tensor parallelism ------------------------------------------------------------------------------


def test_two_ranks_answer_like_one_process(cogvlm_checkpoints):
    path = cogvlm_checkpoints["cogvlm2"]
    prompts = [PROMPTS["picture"], PROMPTS["no picture"], PROMPTS["two turns"]]
    one = generate_with_logits(LLM(path, dtype="float32", num_threads=1), prompts, PARAMS)
    with LLM(path, dtype="float32", tensor_parallel_size=2) as llm:
        layer = llm.engine.model.model.layers[0]
        assert layer.self_attn.num_heads == 2 and layer.self_attn.num_kv_heads == 1  # of 4 and 2
        two = generate_with_logits(llm, prompts, PARAMS)
    for (want_tokens, want_logits), (got_tokens, got_logits) in zip(one, two):
        assert got_tokens == want_tokens
        torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=0)
