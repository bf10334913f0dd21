"""The quantized LM head (``vlm.nn.ParallelLMHead`` under ``--quantize``): int8 per vocabulary row
whatever the scheme, exact shards under tensor parallelism, a tied embedding reading its rows from
the int8 table, and the engine end to end (a tied model, the bundled demo).

As in ``test_quantization.py``, the reference for the quantized GEMM is ``F.linear`` with the
weight the head dequantizes to: equal up to fp32 rounding with the kernel computing in fp32, up
to bf16 rounding of the result with it computing in bf16 (the default for fp32 models on x86).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import vlm
import vlm.quantization
from vlm.nn import embedding
from vlm.quantization import QuantConfig, assign_quant_config, keeps_dense, quantize
from vlm.quantization.config import LM_HEAD
from vlm.quantization.int8 import Int8Weight
from vlm.testing.logits import generate_with_logits

VOCAB, HIDDEN = 37, 64  # an odd vocabulary: a tensor-parallel split pads the last shard


def table(rows: int = VOCAB, cols: int = HIDDEN, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def inputs(rows: int, cols: int = HIDDEN, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fp32_kernels(monkeypatch):
    """The int8 kernel computes in fp32 (not bf16), so that results compare up to fp32 rounding."""
    monkeypatch.setattr(vlm.quantization, "cpu_kernel_dtype", lambda dtype: dtype)


def head_with(weight: torch.Tensor, config: QuantConfig | None, world: int = 1, rank: int = 0, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(embedding, "tp_world_size", lambda: world)
        monkeypatch.setattr(embedding, "tp_rank", lambda: rank)
    head = embedding.ParallelLMHead(weight.shape[0], weight.shape[1])
    head.set_quant_config(config, "lm_head")
    head.weight.weight_loader(head.weight, weight)
    head.prepare_for_inference()
    return head


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_quantized_head_matches_the_dequantized_linear(fp32_kernels, scheme, rows):
    head = head_with(table(), QuantConfig(scheme, group_size=32))
    assert isinstance(head.quantized, Int8Weight)  # int8 per row under int4 as well
    assert head.weight.numel() == 0  # the dense table is freed
    x = inputs(rows)
    expected = F.linear(x, head.quantized.dequantize())
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    # the quantization itself: within half a step of each row's scale
    step = table().abs().amax(dim=1, keepdim=True) / 127
    assert bool(((head.quantized.dequantize() - table()).abs() <= step / 2 + 1e-7).all())


def test_bf16_compute_rounds_only_the_result():
    head = head_with(table(), QuantConfig("int8"))
    assert head.quantized is not None
    compute = head.quantized.scales.dtype
    assert compute == vlm.quantization.cpu_kernel_dtype(torch.float32)
    x = inputs(4)
    got = head(x)
    assert got.dtype == torch.float32
    expected = F.linear(x.to(compute).float(), head.quantized.dequantize())
    tolerance = 2**-8 if compute == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=1e-5)


def test_tensor_parallel_shards_equal_the_unsharded_head(monkeypatch, fp32_kernels):
    """Each rank's int8 rows and scales are exactly its rows of the unsharded quantized head (the
    padding rows of the last shard dequantize to zero), and its logits are its slice."""
    full = head_with(table(), QuantConfig("int8"), monkeypatch=monkeypatch)
    assert full.quantized is not None
    full_weight = full.quantized.dequantize()
    x = inputs(5)
    world = 2
    per_rank = -(-VOCAB // world)
    gathered = []
    for rank in range(world):
        shard = head_with(table(), QuantConfig("int8"), world, rank, monkeypatch)
        assert shard.quantized is not None
        rows = full_weight[rank * per_rank : (rank + 1) * per_rank]
        expected = F.pad(rows, (0, 0, 0, per_rank - rows.shape[0]))
        torch.testing.assert_close(shard.quantized.dequantize(), expected, rtol=0, atol=0)
        torch.testing.assert_close(shard.quantized.qweight[: rows.shape[0]], full.quantized.qweight[rows_of(rank)])
        gathered.append(shard.quantized.matmul(x, None))  # all_gather_last_dim's input on that rank
    logits = torch.cat(gathered, dim=-1)[:, :VOCAB]
    torch.testing.assert_close(logits, full(x), rtol=1e-5, atol=1e-5)


def rows_of(rank: int, world: int = 2) -> slice:
    per_rank = -(-VOCAB // world)
    return slice(rank * per_rank, min((rank + 1) * per_rank, VOCAB))


def tied_pair(config: QuantConfig | None, world: int = 1, rank: int = 0, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(embedding, "tp_world_size", lambda: world)
        monkeypatch.setattr(embedding, "tp_rank", lambda: rank)
    model = torch.nn.Module()
    model.embed_tokens = embedding.VocabParallelEmbedding(VOCAB, HIDDEN)
    model.lm_head = embedding.ParallelLMHead(VOCAB, HIDDEN)
    model.lm_head.tie_to(model.embed_tokens)
    assert assign_quant_config(model, config) == (["lm_head"] if config else [])
    model.embed_tokens.weight.weight_loader(model.embed_tokens.weight, table())
    model.lm_head.prepare_for_inference()
    return model


def test_a_tied_embedding_reads_the_int8_table(fp32_kernels):
    """One int8 table for both: the embedding's rows are the head's dequantized rows, the dense
    table is freed (no second copy), and the embedding keeps the model's dtype."""
    model = tied_pair(QuantConfig("int4", group_size=32))
    quantized = model.lm_head.quantized
    assert quantized is not None and model.embed_tokens.quantized_rows is quantized
    assert model.embed_tokens.weight.numel() == 0
    assert [name for name, _ in model.named_modules()] == ["", "embed_tokens", "lm_head"]  # no second parent
    ids = torch.tensor([[0, 5, 36], [7, 7, 1]])
    rows = model.embed_tokens(ids)
    assert rows.dtype == torch.float32 and rows.shape == (2, 3, HIDDEN)
    torch.testing.assert_close(rows, quantized.dequantize()[ids], rtol=0, atol=0)
    assert (rows - table()[ids]).abs().max() <= table().abs().max() / 127 / 2 + 1e-7
    torch.testing.assert_close(model.lm_head(rows), F.linear(rows, quantized.dequantize()), rtol=1e-5, atol=1e-5)


def test_tied_lookups_under_tensor_parallelism(monkeypatch, fp32_kernels):
    """Each rank looks up its own rows of the int8 table (others are zero before the all-reduce):
    summed over the ranks, the unsharded lookup."""
    ids = torch.tensor([0, 18, 19, 36, 3])
    full = tied_pair(QuantConfig("int8"), monkeypatch=monkeypatch).embed_tokens(ids)
    monkeypatch.setattr(embedding, "all_reduce", lambda tensor: tensor)  # one rank at a time here
    total = sum(tied_pair(QuantConfig("int8"), 2, rank, monkeypatch).embed_tokens(ids) for rank in range(2))
    torch.testing.assert_close(total, full, rtol=0, atol=0)


def test_an_untied_head_quantizes_when_loaded_a_tied_one_when_prepared():
    """Loading then holds one dense table at a time; a tied table is quantized once the
    embedding's lookups no longer need it dense, in prepare_for_inference."""
    head = embedding.ParallelLMHead(VOCAB, HIDDEN)
    head.set_quant_config(QuantConfig("int8"))
    head.weight.weight_loader(head.weight, table())
    assert head.quantized is not None and head.weight.numel() == 0
    model = torch.nn.Module()
    model.embed_tokens = embedding.VocabParallelEmbedding(VOCAB, HIDDEN)
    model.lm_head = embedding.ParallelLMHead(VOCAB, HIDDEN)
    model.lm_head.tie_to(model.embed_tokens)
    assign_quant_config(model, QuantConfig("int8"))
    model.lm_head.weight.weight_loader(model.lm_head.weight, table())  # a tied checkpoint's lm_head copy
    assert model.lm_head.quantized is None and model.embed_tokens.weight.shape == (VOCAB, HIDDEN)
    model.lm_head.prepare_for_inference()
    assert model.embed_tokens.quantized_rows is model.lm_head.quantized is not None


def test_the_head_can_stay_dense():
    model = tied_pair(QuantConfig("int8", quantize_lm_head=False))
    assert model.lm_head.quantized is None and model.embed_tokens.quantized_rows is None
    assert model.embed_tokens.weight.shape == (VOCAB, HIDDEN)
    assert LM_HEAD.lm_head_config() is None and QuantConfig("int4").lm_head_config() == LM_HEAD
    # a hidden size torch's int8 kernel does not take: dense, not dequantized at every step
    head = head_with(table(VOCAB, 40), QuantConfig("int8"))
    assert head.quantized is None and head.weight.shape == (VOCAB, 40)


def test_keep_dense_names():
    """A checkpoint's own exceptions, matched against vlm's module names."""
    llm_names = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj", "lm_head"]
    assert not any(keeps_dense(name, ["gate"]) for name in llm_names)  # a whole component, not a prefix
    assert keeps_dense("model.layers.0.mlp.gate", ["gate"])
    assert keeps_dense("model.layers.0.self_attn.qkv_proj", ["model.layers.0.self_attn.k_proj"])  # a fused part
    assert keeps_dense("language_model.model.layers.1.mlp.down_proj", ["model.layers.1.mlp.down_proj"])
    assert keeps_dense("language_model.model.layers.1.mlp.down_proj", ["model.language_model.layers.1.mlp.down_proj"])
    assert keeps_dense("language_model.lm_head", ["lm_head"])
    assert keeps_dense("visual.blocks.0.attn.qkv", ["visual"])
    assert keeps_dense("language_model.model.layers.3.mlp.gate_up_proj", [r"re:.*layers\.3\.mlp\.up_proj$"])
    assert not keeps_dense("language_model.model.layers.3.mlp.down_proj", [r"re:.*layers\.3\.mlp\.up_proj$"])
    # vlmrun quantize's own ignore rule (every module outside a decoder block)
    from vlm.quantization.compressed import IGNORE

    assert keeps_dense("language_model.lm_head", IGNORE)
    assert not keeps_dense("language_model.model.layers.0.self_attn.qkv_proj", IGNORE)


# -- the engine ------------------------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog. Then"
ONE = vlm.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
STEPS = 16


@pytest.fixture(scope="module")
def tied_qwen2(tiny_models) -> str:
    return tiny_models("qwen2", tie_word_embeddings=True)


def next_token_logits(llm, prefixes: list[list[int]]) -> torch.Tensor:
    return torch.stack([logits[0] for _, logits in generate_with_logits(llm, prefixes, ONE)])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tied_engine_is_fp32_on_the_dequantized_checkpoint(tied_qwen2, fp32_kernels, tmp_path, scheme):
    """A tied model end to end: its one table quantized to int8 for the head and read back by the
    embedding, the linears with the scheme; the fp32 engine on a checkpoint holding exactly those
    dequantized values gives the same logits (any error left is the quantization's own)."""
    config = QuantConfig(scheme, group_size=32)
    state = load_file(str(Path(tied_qwen2) / "model.safetensors"))
    assert "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    for name, tensor in state.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            state[name] = quantize(tensor, config).dequantize()
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = quantize(tensor, LM_HEAD).dequantize()
    fake = tmp_path / "dequantized"
    fake.mkdir()
    for item in Path(tied_qwen2).iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, fake / item.name)
    save_file(state, str(fake / "model.safetensors"), metadata={"format": "pt"})

    dense = vlm.LLM(str(fake))
    prompt = dense.engine.tokenizer(PROMPT)["input_ids"]
    [(tokens, _)] = generate_with_logits(dense, [prompt], vlm.SamplingParams(temperature=0, max_tokens=STEPS))
    prefixes = [prompt + tokens[:step] for step in range(len(tokens))]
    expected = next_token_logits(dense, prefixes)
    quantized = vlm.LLM(tied_qwen2, quantization=scheme, quantization_group_size=32)
    model = quantized.engine.model
    assert model.lm_head.quantized is not None and model.model.embed_tokens.quantized_rows is model.lm_head.quantized
    torch.testing.assert_close(next_token_logits(quantized, prefixes), expected, rtol=1e-4, atol=1e-4)


def test_bundled_demo_answers_unchanged_with_int8():
    """The bundled demo's 18 questions (6 pictures x 3) get fp32's answers with int8 linears and
    an int8 head (the kernels computing in bf16, as they do by default), and with W8A8."""
    from vlm.cli.demo import QUESTIONS
    from vlm.demo import __file__ as demo_init

    root = Path(demo_init).resolve().parent
    pictures = sorted((root / "pictures").glob("*.png"))
    assert len(pictures) == 6
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.open(picture).convert("RGB")},
                    {"type": "text", "text": q},
                ],
            }
        ]
        for picture in pictures
        for q in QUESTIONS
    ]
    params = vlm.SamplingParams(temperature=0, max_tokens=8)

    def answers(**settings) -> list[str]:
        llm = vlm.LLM(str(root / "internvl-shapes"), **settings)
        head = llm.engine.model.language_model.lm_head
        assert (head.quantized is not None) == ("quantization" in settings)
        return [out.outputs[0].text.strip() for out in llm.chat(conversations, params)]

    fp32 = answers()
    assert answers(quantization="int8") == fp32
    assert answers(quantization="w8a8") == fp32  # int8 activations too (vlm.quantization.w8a8)


def test_no_quantize_lm_head_flag_keeps_the_engines_head_dense(tied_qwen2):
    """``vlmrun --quantize int8 --no-quantize-lm-head`` / ``LLM(quantize_lm_head=False)``: the
    linears are quantized, the head and its tied table stay dense."""
    import argparse

    from vlm.cli.engine_args import add_engine_arguments, engine_settings

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    settings = engine_settings(parser.parse_args(["--quantize", "int8", "--no-quantize-lm-head"]))
    assert settings["quantize_lm_head"] is False
    model = vlm.LLM(tied_qwen2, **settings).engine.model
    assert model.lm_head.quantized is None and model.model.embed_tokens.quantized_rows is None
    assert vlm.LLM(tied_qwen2, quantization="int8").engine.model.lm_head.quantized is not None
