"""Multimodal rope (M-RoPE) through the engine: explicit ``[3, T]`` prompt positions plus a
position delta for generated tokens, checked against transformers' Qwen2-VL text model.

A tiny Qwen2 checkpoint with ``rope_scaling.mrope_section`` is served by vlm-plugin-llama; the
test marks the model ``position_dims = 3`` as a Qwen2-VL plugin's model does, and feeds
``ModelInputs`` the way such a plugin's preprocessor would.
"""

from __future__ import annotations

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.errors import InputError
from vlm.inputs import ModelInputs
from vlm.testing.checkpoints import write_tiny_text_model
from vlm.testing.logits import generate_with_logits

SECTION = [2, 3, 3]  # sums to head_dim / 2 = 8 (hidden 64, 4 heads)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def mrope_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("mrope") / "qwen2-mrope"
    return str(
        write_tiny_text_model(path, "qwen2", seed=3, rope_scaling={"rope_type": "default", "mrope_section": SECTION})
    )


def multimodal_positions(prompt_len: int, image_at: int, grid: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Positions like Qwen2-VL's get_rope_index: text, then an h x w image grid, then text."""
    h, w = grid
    text_before = torch.arange(image_at).expand(3, -1)
    t_pos = torch.zeros(h * w, dtype=torch.long)
    h_pos = torch.arange(h).repeat_interleave(w)
    w_pos = torch.arange(w).repeat(h)
    image = torch.stack([t_pos, h_pos, w_pos]) + image_at
    after_start = image_at + max(h, w)
    text_after = torch.arange(prompt_len - image_at - h * w).expand(3, -1) + after_start
    positions = torch.cat([text_before, image, text_after], dim=1)
    return positions, int(positions.max()) + 1 - prompt_len


def requests(seed: int = 0) -> list[ModelInputs]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for prompt_len, image_at, grid in [(30, 4, (4, 5)), (21, 2, (3, 3)), (40, 10, (2, 8))]:
        ids = torch.randint(0, 300, (prompt_len,), generator=rng).tolist()
        positions, delta = multimodal_positions(prompt_len, image_at, grid)
        out.append(ModelInputs(token_ids=ids, positions=positions, position_delta=delta))
    return out


def load(path: str, **kwargs) -> LLM:
    llm = LLM(path, **kwargs)
    llm.engine.model.position_dims = 3
    llm.engine.runner.position_dims = 3
    llm.engine.inputs.position_dims = 3
    return llm


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def reference(path: str, inputs: ModelInputs, n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' Qwen2-VL text model with the same weights: greedy tokens and logits per step."""
    from transformers import AutoModelForCausalLM, Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    qwen2 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fields = qwen2.config.to_dict()
    fields.pop("model_type", None)
    text = Qwen2VLTextModel(Qwen2VLTextConfig(**fields)).eval()
    missing, unexpected = text.load_state_dict(qwen2.model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    ids, positions = list(inputs.token_ids), inputs.positions
    logits = []
    with torch.inference_mode():
        for _ in range(n):
            hidden = text(input_ids=torch.tensor([ids]), position_ids=positions[:, None, :]).last_hidden_state
            step = qwen2.lm_head(hidden[0, -1]).float()
            logits.append(step)
            ids.append(int(step.argmax()))
            next_pos = torch.full((3, 1), len(ids) - 1 + inputs.position_delta)
            positions = torch.cat([positions, next_pos], dim=1)
    return ids[len(inputs.token_ids) :], torch.stack(logits)


def test_rotary_reads_mrope_section_and_one_d_positions_still_work(mrope_model):
    llm = LLM(mrope_model)
    rotary = llm.engine.model.model.layers[0].self_attn.rotary_emb
    assert rotary.mrope_section == SECTION
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    positions = torch.tensor([0, 3, 4, 9, 2])
    for one_d, three_d in zip(rotary(positions, q, k), rotary(positions.expand(3, -1), q, k)):
        torch.testing.assert_close(one_d, three_d, rtol=0, atol=0)


def test_mrope_generation_matches_transformers(mrope_model):
    llm = load(mrope_model)
    inputs = requests()
    got = generate_with_logits(llm, inputs, greedy())
    for request, (tokens, logits) in zip(inputs, got):
        want_tokens, want_logits = reference(mrope_model, request, NEW_TOKENS)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)


def test_mrope_batched_chunked_and_preempted_equal_alone(mrope_model):
    llm = load(mrope_model)
    inputs = requests(seed=1)
    alone = [llm.generate([request], greedy(24))[0].outputs[0].token_ids for request in inputs]
    assert [o.outputs[0].token_ids for o in llm.generate(inputs, greedy(24))] == alone
    small = load(mrope_model, kv_cache_gib=6e-5, max_num_batched_tokens=16)
    assert [o.outputs[0].token_ids for o in small.generate(inputs * 2, greedy(24))] == alone * 2
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv_cache.allocator.num_used == 0


def test_equal_rows_are_plain_positions(mrope_model):
    llm = load(mrope_model)
    ids = list(range(5, 40))
    plain = llm.generate([ModelInputs(token_ids=ids)], greedy())[0].outputs[0].token_ids
    explicit = ModelInputs(token_ids=ids, positions=torch.arange(len(ids)).expand(3, -1).clone())
    assert llm.generate([explicit], greedy())[0].outputs[0].token_ids == plain


def test_malformed_positions_are_refused(mrope_model):
    llm = load(mrope_model)
    with pytest.raises(InputError, match=r"expected \[3, 4\]"):
        llm.engine.add_request(ModelInputs(token_ids=[1, 2, 3, 4], positions=torch.zeros(3, 3, dtype=torch.long)))
    plain = LLM(mrope_model)  # position_dims 1: explicit positions are [T]
    with pytest.raises(InputError, match=r"expected \[2\].*position_dims is 1"):
        plain.engine.add_request(ModelInputs(token_ids=[1, 2], positions=torch.zeros(3, 2, dtype=torch.long)))
    assert llm.engine.kv_cache.allocator.num_used == 0


def test_prompt_ending_in_an_image_whose_last_token_is_a_one_token_step(mrope_model):
    """Chunks of 16 leave the 33rd prompt token to a one-token (decode-shaped) step: it must
    still take its explicit image position, not ``index + delta``."""
    positions, delta = multimodal_positions(33, 13, (4, 5))  # the prompt's last 20 tokens are the image
    assert positions[0, -1].item() != 32 + delta  # so a wrong position would change the output
    inputs = ModelInputs(token_ids=list(range(40, 73)), positions=positions, position_delta=delta)
    chunked = load(mrope_model, max_num_batched_tokens=16)
    assert chunked.generate([inputs], greedy())[0].outputs[0].token_ids == reference(mrope_model, inputs, NEW_TOKENS)[0]


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    return str(write_tiny_text_model(tmp_path_factory.mktemp("llama") / "llama", "llama", seed=5))


def shared_positions(prompt_len: int, image_at: int, image_len: int) -> tuple[torch.Tensor, int]:
    """1-D positions like CogVLM's: an image's inner tokens share one position, its first and last do not."""
    steps = torch.ones(prompt_len, dtype=torch.long)
    steps[0] = 0
    steps[image_at + 1 : image_at + image_len - 1] = 0
    steps[image_at + 1] = 1  # the first inner token follows the image's first token
    positions = steps.cumsum(0)
    return positions, int(positions.max()) + 1 - prompt_len


def test_one_d_explicit_positions_match_transformers(llama_model):
    """``[T]`` positions for a 1-D rope model: the prompt at its own positions, generated tokens at
    ``i + position_delta``, equal to transformers given the same ``position_ids``; chunked too."""
    from transformers import AutoModelForCausalLM

    positions, delta = shared_positions(30, 5, 12)
    assert delta < 0  # the shared positions shift what follows: a wrong position changes the output
    inputs = ModelInputs(token_ids=list(range(40, 70)), positions=positions, position_delta=delta)
    model = AutoModelForCausalLM.from_pretrained(llama_model, dtype=torch.float32).eval()
    ids, pos, want = list(inputs.token_ids), positions, []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            step = model(input_ids=torch.tensor([ids]), position_ids=pos[None]).logits[0, -1]
            want.append(step)
            ids.append(int(step.argmax()))
            pos = torch.cat([pos, torch.tensor([len(ids) - 1 + delta])])
    ((tokens, logits),) = generate_with_logits(LLM(llama_model), [inputs], greedy())
    assert tokens == ids[len(inputs.token_ids) :]
    torch.testing.assert_close(logits, torch.stack(want), atol=1e-4, rtol=0)
    chunked = LLM(llama_model, max_num_batched_tokens=8)
    assert chunked.generate([inputs], greedy())[0].outputs[0].token_ids == tokens
