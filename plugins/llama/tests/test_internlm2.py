"""InternLM2 by equivalence: a tiny Llama checkpoint re-packed into the InternLM2 layout
(grouped wqkv, w1/w3/w2, tok_embeddings, output) must give the Llama model's outputs.

transformers has no InternLM2 class and vlm never runs model-repo code, so the reference is the
original Llama checkpoint through transformers ``generate`` (and through vlm). fp32 throughout.

Tolerances: against vlm's own Llama load the logits must be *identical* (the re-packed weights
end up in the same fused parameters, so the computation is the same); against transformers
1e-4, as in test_parity.py: vlm's Llama path itself differs from transformers by up to ~2.5e-5
on these logits (magnitude ~10; packed GEMMs, fused norms), so 1e-5 would test that, not InternLM2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm import LLM, SamplingParams
from vlm.testing.logits import generate_with_logits
from vlm_plugin_llama.testing import write_tiny_internlm2

NEW_TOKENS = 32
PROMPTS = ["Hello", "The quick brown fox jumps over", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"]
ATOL = 1e-4  # against transformers


def reference(llama_dir, prompts):
    """transformers greedy tokens and per-step logits of the Llama checkpoint, each prompt alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
        results.append((out.sequences[0, ids.shape[1] :].tolist(), torch.stack([step[0] for step in out.logits])))
    return results


def run_capturing_logits(llm: LLM, prompts):
    """vlm greedy tokens, plus the logits each request was sampled from at every step."""
    return generate_with_logits(llm, prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))


def assert_same(results, ref, atol=ATOL):
    assert len(results) == len(ref)
    for (tokens, logits), (ref_tokens, ref_logits) in zip(results, ref):
        assert tokens == ref_tokens
        assert logits.shape == ref_logits.shape
        torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(internlm2_dir, llama_dir)`` per set of overrides, written once per module."""
    cache = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            name = "internlm2" + "".join(f"-{k}={v}" for k, v in key)
            cache[key] = tuple(str(p) for p in write_tiny_internlm2(tmp_path_factory.mktemp(name), **overrides))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def pair(checkpoints):
    """The default pair (4 heads over 2 kv heads): InternLM2 LLM, Llama LLM, transformers reference."""
    internlm2_dir, llama_dir = checkpoints()
    return LLM(internlm2_dir), LLM(llama_dir), reference(llama_dir, PROMPTS)


def test_reference_output_is_varied(pair):
    """Parity on a degenerate (one repeated token) output would prove little."""
    for tokens, _ in pair[2]:
        assert len(set(tokens)) >= 8, tokens


def test_config_is_read_raw_and_served_by_llama_plugin(pair):
    from vlm.config import RawConfig
    from vlm_plugin_llama.internlm2 import InternLM2ForCausalLM

    llm = pair[0]
    assert isinstance(llm.engine.model_config.hf_config, RawConfig)
    assert llm.engine.plugin == "llama"
    assert type(llm.engine.model) is InternLM2ForCausalLM
    assert llm.engine.model.model.layers[0].self_attn.qkv_proj.bias is None  # bias: false


def test_greedy_tokens_and_logits_alone(pair):
    internlm2, llama, ref = pair
    for prompt, expected in zip(PROMPTS, ref):
        results = run_capturing_logits(internlm2, [prompt])
        assert_same(results, [expected])
        assert_same(results, run_capturing_logits(llama, [prompt]), atol=0)


def test_greedy_tokens_and_logits_batched(pair):
    internlm2, llama, ref = pair
    results = run_capturing_logits(internlm2, PROMPTS)
    assert_same(results, ref)
    assert_same(results, run_capturing_logits(llama, PROMPTS), atol=0)
    assert internlm2.engine.kv_cache.allocator.num_used == 0


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(num_attention_heads=4, num_key_value_heads=4), id="no-gqa"),
        pytest.param(dict(num_attention_heads=8, num_key_value_heads=2), id="4-q-per-kv"),
        pytest.param(dict(attention_bias=True), id="bias"),
        pytest.param(dict(tie_word_embeddings=True), id="tied"),
    ],
)
def test_variants_match_transformers(checkpoints, overrides):
    internlm2_dir, llama_dir = checkpoints(**overrides)
    ref = reference(llama_dir, PROMPTS)
    assert all(len(set(tokens)) >= 8 for tokens, _ in ref)
    llm = LLM(internlm2_dir)
    qkv, o = llm.engine.model.model.layers[0].self_attn.qkv_proj, llm.engine.model.model.layers[0].self_attn.o_proj
    bias = bool(overrides.get("attention_bias"))
    assert (qkv.bias is not None, o.bias is not None) == (bias, bias)  # InternLM2's one `bias` flag
    assert_same(run_capturing_logits(llm, PROMPTS), ref)


@pytest.mark.parametrize("heads,kv_heads,world", [(4, 2, 2), (8, 2, 4), (4, 1, 2), (6, 3, 3)])
def test_grouped_wqkv_loads_each_tensor_parallel_rank_like_q_k_v(monkeypatch, heads, kv_heads, world):
    """Un-grouped wqkv gives every rank the slice that separate q/k/v tensors give it (kv heads
    split across ranks, or replicated when there are fewer than ranks), weight and bias."""
    import vlm.nn.linear as linear
    from vlm.nn import build_qkv_proj
    from vlm_plugin_llama.internlm2 import grouped_qkv_loader
    from vlm_plugin_llama.testing import pack_wqkv

    head_dim, hidden = 4, 8
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (heads, kv_heads, kv_heads))
    qb, kb, vb = (torch.randn(n * head_dim) for n in (heads, kv_heads, kv_heads))
    monkeypatch.setattr(linear, "tp_world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(linear, "tp_rank", lambda rank=rank: rank)
        separate, grouped = (build_qkv_proj(hidden, head_dim, heads, kv_heads, bias=True) for _ in range(2))
        for param, tensors in ((separate.weight, (q, k, v)), (separate.bias, (qb, kb, vb))):
            for shard, tensor in zip("qkv", tensors):
                param.weight_loader(param, tensor, shard)
        load = grouped_qkv_loader(grouped)
        load(grouped.weight, pack_wqkv(q, k, v, kv_heads))
        load(grouped.bias, pack_wqkv(qb, kb, vb, kv_heads))
        assert torch.equal(grouped.weight, separate.weight) and torch.equal(grouped.bias, separate.bias)
        rows = heads // world * head_dim  # this rank's q heads come first
        assert torch.equal(grouped.weight[:rows], q[rank * rows : (rank + 1) * rows])


def _load_report(model_dir, edit):
    """Build the model on the meta device and load the checkpoint's shapes, edited by ``edit``."""
    from vlm.config import load_model_config
    from vlm.loader import checkpoint_files, iter_checkpoint
    from vlm.plugin.manager import build_model

    config = load_model_config(model_dir)
    model, _ = build_model(config, torch.float32, torch.device("meta"))
    weights = dict(iter_checkpoint(checkpoint_files(Path(model_dir)), meta=True))
    return model.load_weights(edit(weights).items())


def test_misshaped_wqkv_is_reported_by_name(checkpoints):
    internlm2_dir, _ = checkpoints()
    name = "model.layers.1.attention.wqkv.weight"

    def ungrouped_mha_size(weights):  # as if num_key_value_heads were 4: [(4 + 2 * 4) * 16, 64]
        weights[name] = torch.empty(192, 64, device="meta")
        return weights

    report = _load_report(internlm2_dir, ungrouped_mha_size)
    assert report.mismatched == [f"{name} (expected [128, 64], got [192, 64])"]
    assert report.missing == [] and report.unexpected == []
    assert "mis-shaped" in str(report.error(internlm2_dir)) and name in str(report.error(internlm2_dir))


def test_missing_tensors_are_reported_by_checkpoint_name(checkpoints):
    internlm2_dir, _ = checkpoints()
    dropped = ["model.layers.0.attention.wqkv.weight", "model.layers.1.feed_forward.w3.weight", "output.weight"]

    def drop(weights):
        return {k: v for k, v in weights.items() if k not in dropped}

    report = _load_report(internlm2_dir, drop)
    assert sorted(report.missing) == sorted(dropped)
    assert report.mismatched == [] and report.unexpected == []


def test_rope_scaling():
    """dynamic NTK is the plain rope within max_position_embeddings (the engine's cap); linear
    divides the frequencies by the factor; anything else is a config error naming the type."""
    from vlm.config import RawConfig
    from vlm.errors import ConfigError
    from vlm_plugin_llama.internlm2 import InternLM2ForCausalLM

    base = dict(
        architectures=["InternLM2ForCausalLM"],
        model_type="internlm2",
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        rope_theta=1e6,
    )

    def inv_freq(**extra):
        model = InternLM2ForCausalLM(RawConfig({**base, **extra}), device=torch.device("meta"))
        return model.model.layers[0].self_attn.rotary_emb.inv_freq

    plain = inv_freq()
    torch.testing.assert_close(plain, 1.0 / 1e6 ** (torch.arange(0, 8, 2).float() / 8))
    torch.testing.assert_close(inv_freq(rope_scaling={"type": "dynamic", "factor": 2.0}), plain)
    torch.testing.assert_close(inv_freq(rope_scaling={"type": "linear", "factor": 4.0}), plain / 4)
    with pytest.raises(ConfigError, match="'yarn'"):
        inv_freq(rope_scaling={"type": "yarn", "factor": 2.0})


def test_internlm2_defaults_for_absent_fields():
    """Absent fields take InternLM2Config's defaults: bias=True (wqkv and wo), kv heads = heads."""
    from vlm.config import RawConfig
    from vlm_plugin_llama.internlm2 import InternLM2ForCausalLM

    config = RawConfig(
        dict(
            architectures=["InternLM2ForCausalLM"],
            model_type="internlm2",
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    )
    attn = InternLM2ForCausalLM(config, device=torch.device("meta")).model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is not None
    assert attn.num_kv_heads == 4 and attn.head_dim == 8


def test_vlmrun_check(checkpoints, capsys):
    from vlm.cli.main import main

    internlm2_dir, _ = checkpoints()
    assert main(["check", "--model", internlm2_dir]) == 0
    out = capsys.readouterr().out
    assert "plugin: llama" in out and out.rstrip().endswith("OK")
