"""Finding a model and loading its checkpoint: paths and hub ids, safetensors (single and
sharded), ``.bin`` through ``weights_only``, corrupt files, mismatched tensors, fused and tied
weights, and a bf16 checkpoint in the fp32 engine -- each checked against the single-file load or
against transformers."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlm
from vlm.errors import ModelNotFoundError, WeightsError
from vlm.loader import checkpoint_files, resolve_model_path
from vlm.nn import WeightMapping, load_weights_by_mapping
from vlm.nn.linear import MergedColwiseLinear, QKVLinear
from vlm.nn.weights import CheckpointMismatchError, ShapeMismatch

PROMPT = "Hello world, this is"
N_TOKENS = 16
GREEDY = vlm.SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True)


def _generate(path, prompt=PROMPT, params=GREEDY, **engine_args) -> list[int]:
    llm = vlm.LLM(str(path), **engine_args)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def _clone_without_weights(src: str | Path, dst: Path) -> Path:
    """Copy config, generation config and tokenizer files; no weights."""
    dst.mkdir(parents=True)
    for item in Path(src).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(item, dst / item.name)
    return dst


def _state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def _with_state_dict(src, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    _clone_without_weights(src, dst)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def reference_tokens(tiny_qwen2) -> list[int]:
    tokens = _generate(tiny_qwen2)
    assert len(tokens) == N_TOKENS
    # a degenerate (repeated-token) output would make every parity check below meaningless
    assert len(set(tokens)) >= 8, tokens
    return tokens


# -- resolve_model_path --------------------------------------------------------------------------


def test_resolve_directory(tiny_qwen2):
    assert resolve_model_path(tiny_qwen2) == Path(tiny_qwen2)


def test_resolve_expands_user(tiny_qwen2, monkeypatch):
    home, name = Path(tiny_qwen2).parent, Path(tiny_qwen2).name
    monkeypatch.setenv("HOME", str(home))
    assert resolve_model_path(f"~/{name}") == Path(tiny_qwen2)


def test_resolve_file_is_error(tiny_qwen2):
    config_file = str(Path(tiny_qwen2) / "config.json")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(config_file)
    message = str(info.value)
    assert "\n" not in message
    assert config_file in message and "is a file" in message
    assert "model directory" in message


@pytest.mark.parametrize("relative", [False, True])
def test_resolve_missing_path_says_where_it_looked(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "models" / "nope" / "here"
    arg = "./models/nope/here" if relative else str(missing)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(arg)
    message = str(info.value)
    assert "\n" not in message
    assert str(missing) in message  # the absolute place it looked
    assert "no such directory" in message


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline, with sockets disabled.

    huggingface_hub reads HF_HUB_CACHE / HF_HOME once, at import (tests import it long before),
    so the env vars alone would not redirect it: the constant is patched too.
    """
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so 'owner/name' is not accidentally a relative directory

    def no_network(*args, **kwargs):
        raise AssertionError("resolving a cached hub id must not touch the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_hub_id_not_in_cache(hub_cache):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path("owner/name")
    message = str(info.value)
    assert "\n" not in message
    assert "'owner/name'" in message
    assert "not in the local Hugging Face cache" in message
    assert str(hub_cache) in message
    assert "hf download owner/name" in message
    assert "--allow-download" in message


def test_hub_id_in_cache_resolves_to_snapshot(hub_cache, tiny_qwen2, reference_tokens):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--owner--name"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tiny_qwen2, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    resolved = resolve_model_path("owner/name")
    assert resolved == snapshot
    assert (resolved / "config.json").is_file()
    # and the engine runs from it
    assert _generate("owner/name") == reference_tokens


# -- safetensors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_qwen2(tiny_qwen2, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharded") / "qwen2-sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="100KB")
    for item in Path(tiny_qwen2).iterdir():
        if item.name.startswith("tokenizer") or item.suffix == ".jinja":
            shutil.copy(item, path / item.name)
    return path


def test_sharded_safetensors_same_tokens(sharded_qwen2, tiny_qwen2, reference_tokens):
    index = json.loads((sharded_qwen2 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert not (sharded_qwen2 / "model.safetensors").exists()
    files = checkpoint_files(sharded_qwen2)
    assert [f.path.name for f in files] == shards
    assert {f.format for f in files} == {"safetensors"}
    # every tensor of the single file is in exactly one shard
    assert set(index["weight_map"]) == set(_state_dict(tiny_qwen2))
    assert _generate(sharded_qwen2) == reference_tokens


def test_index_naming_missing_shard(sharded_qwen2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_qwen2, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (broken / gone).unlink()
    with pytest.raises(WeightsError) as info:
        vlm.LLM(str(broken))
    message = str(info.value)
    assert "\n" not in message
    assert "model.safetensors.index.json" in message
    assert gone in message
    assert "re-download" in message


def test_index_not_json(sharded_qwen2, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_qwen2, broken)
    (broken / "model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(WeightsError) as info:
        vlm.LLM(str(broken))
    assert "not a valid shard index" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("how", ["half", "empty", "data-cut"])
def test_truncated_safetensors(tiny_qwen2, tmp_path, how):
    broken = _clone_without_weights(tiny_qwen2, tmp_path / "broken")
    data = (Path(tiny_qwen2) / "model.safetensors").read_bytes()
    cut = {"half": len(data) // 2, "empty": 0, "data-cut": len(data) - 100}[how]
    (broken / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(WeightsError) as info:
        vlm.LLM(str(broken))
    message = str(info.value)
    assert "\n" not in message
    assert str(broken / "model.safetensors") in message
    assert "re-download" in message


def test_no_weights_at_all(tiny_qwen2, tmp_path):
    empty = _clone_without_weights(tiny_qwen2, tmp_path / "empty")
    with pytest.raises(WeightsError) as info:
        vlm.LLM(str(empty))
    assert str(empty) in str(info.value) and "no *.safetensors or *.bin" in str(info.value)


# -- .bin ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_checkpoint_same_tokens(tiny_qwen2, tmp_path, reference_tokens, zip_format):
    path = _clone_without_weights(tiny_qwen2, tmp_path / "bin")
    torch.save(_state_dict(tiny_qwen2), path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    files = checkpoint_files(path)
    assert [(f.path.name, f.format) for f in files] == [("pytorch_model.bin", "bin")]
    assert _generate(path) == reference_tokens


class _RunsShellOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_with_pickled_code_is_refused(tiny_qwen2, tmp_path):
    marker = tmp_path / "pwned"
    path = _clone_without_weights(tiny_qwen2, tmp_path / "evil")
    state = dict(_state_dict(tiny_qwen2))
    state["model.embed_tokens.weight"] = _RunsShellOnLoad(marker)
    torch.save(state, path / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(WeightsError) as info:
        vlm.LLM(str(path))
    assert not marker.exists(), "loading a .bin ran code from the pickle"
    message = str(info.value)
    assert "\n" not in message
    assert str(path / "pytorch_model.bin") in message
    assert "only plain tensors" in message and "safetensors" in message
    assert "system" in message  # names what was refused
    assert "weights_only` set to `False`" not in message  # never advise the unsafe load


def test_bin_with_non_tensor_entry(tiny_qwen2, tmp_path):
    path = _clone_without_weights(tiny_qwen2, tmp_path / "odd")
    state = dict(_state_dict(tiny_qwen2))
    state["step"] = 1000  # plain ints pass weights_only but are not weights
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(WeightsError) as info:
        vlm.LLM(str(path))
    assert "'step'" in str(info.value) and "not a tensor" in str(info.value)


def test_training_args_bin_is_not_a_checkpoint(tiny_qwen2, tmp_path):
    path = _clone_without_weights(tiny_qwen2, tmp_path / "only-training-args")
    torch.save({"lr": torch.tensor(1.0)}, path / "training_args.bin")
    with pytest.raises(WeightsError, match="no \\*.safetensors or \\*.bin"):
        checkpoint_files(path)


def test_safetensors_preferred_over_bin(tiny_qwen2, tmp_path):
    path = tmp_path / "both"
    shutil.copytree(tiny_qwen2, path)
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    assert [f.format for f in checkpoint_files(path)] == ["safetensors"]


# -- tensors that do not fit the model ------------------------------------------------------------


def test_missing_unexpected_and_misshaped_tensors_listed(tiny_qwen2, tmp_path):
    state = dict(_state_dict(tiny_qwen2))
    del state["model.layers.0.mlp.down_proj.weight"]
    del state["model.layers.1.self_attn.v_proj.weight"]  # one shard of the fused qkv_proj
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    state["model.norm.weight"] = torch.ones(32)  # hidden_size is 64
    path = _with_state_dict(tiny_qwen2, tmp_path / "mismatch", state)

    with pytest.raises(CheckpointMismatchError) as info:
        vlm.LLM(str(path))
    assert isinstance(info.value, WeightsError)
    report = info.value.report
    assert sorted(report.missing) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ]
    assert report.unexpected == ["model.layers.0.mlp.extra_proj.weight"]
    assert len(report.mismatched) == 1
    assert report.mismatched[0].startswith("model.norm.weight")
    assert "[64]" in report.mismatched[0] and "[32]" in report.mismatched[0]
    assert not report.ok

    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for name in (
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.0.mlp.extra_proj.weight",
        "model.norm.weight",
    ):
        assert name in message
    assert "2 missing" in message and "1 unexpected" in message and "1 mis-shaped" in message


def test_long_lists_are_abbreviated(tiny_qwen2, tmp_path):
    state = {k: v for k, v in _state_dict(tiny_qwen2).items() if "layers.1." not in k}
    path = _with_state_dict(tiny_qwen2, tmp_path / "half", state)
    with pytest.raises(CheckpointMismatchError) as info:
        vlm.LLM(str(path))
    missing = info.value.report.missing
    assert len(missing) > 8 and all("layers.1." in name for name in missing)
    assert f"{len(missing)} missing" in str(info.value)
    assert f"and {len(missing) - 8} more" in str(info.value)


# -- fused weights -------------------------------------------------------------------------------


def _filled(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_qkv_weight_loader_places_shards():
    hidden, head_dim, heads, kv_heads = 8, 4, 4, 2
    layer = QKVLinear(hidden, head_dim, heads, kv_heads, bias=True)
    q, k, v = _filled((16, 8), 1), _filled((8, 8), 2), _filled((8, 8), 3)
    qb, kb, vb = _filled((16,), 4), _filled((8,), 5), _filled((8,), 6)
    # load out of order: placement must depend on the shard id, not on arrival
    for param, tensors in ((layer.weight, {"v": v, "q": q, "k": k}), (layer.bias, {"k": kb, "v": vb, "q": qb})):
        for shard_id, tensor in tensors.items():
            param.weight_loader(param, tensor, shard_id)
    assert torch.equal(layer.weight, torch.cat([q, k, v]))
    assert torch.equal(layer.bias, torch.cat([qb, kb, vb]))
    x = _filled((3, 8), 7)
    assert torch.allclose(layer(x), torch.cat([x @ q.T + qb, x @ k.T + kb, x @ v.T + vb], dim=-1))


def test_merged_colwise_weight_loader_places_shards():
    layer = MergedColwiseLinear(6, [10, 10])
    gate, up = _filled((10, 6), 1), _filled((10, 6), 2)
    layer.weight.weight_loader(layer.weight, up, 1)
    layer.weight.weight_loader(layer.weight, gate, 0)
    assert torch.equal(layer.weight, torch.cat([gate, up]))
    assert layer.weight.shard_ids == [0, 1]

    uneven = MergedColwiseLinear(6, [3, 5])
    a, b = _filled((3, 6), 3), _filled((5, 6), 4)
    uneven.weight.weight_loader(uneven.weight, a, 0)
    uneven.weight.weight_loader(uneven.weight, b, 1)
    assert torch.equal(uneven.weight, torch.cat([a, b]))


@pytest.mark.parametrize(
    "shard_id, shape",
    [("q", (8, 8)), ("k", (16, 8)), ("v", (8, 7))],
)
def test_qkv_wrong_shape_raises(shard_id, shape):
    layer = QKVLinear(8, 4, 4, 2)
    with pytest.raises(ShapeMismatch) as info:
        layer.weight.weight_loader(layer.weight, torch.zeros(shape), shard_id)
    expected = [16 if shard_id == "q" else 8, 8]
    assert info.value.expected == tuple(expected) and info.value.got == shape
    assert str(expected) in str(info.value)


def test_merged_colwise_wrong_shape_raises():
    layer = MergedColwiseLinear(6, [3, 5])
    with pytest.raises(ShapeMismatch):
        layer.weight.weight_loader(layer.weight, torch.zeros(5, 6), 0)
    with pytest.raises(ShapeMismatch):
        layer.weight.weight_loader(layer.weight, torch.zeros(5, 4), 1)


def test_load_weights_by_mapping_fuses_and_reports():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = QKVLinear(8, 4, 4, 2)
            self.gate_up_proj = MergedColwiseLinear(8, [6, 6])

    block = Block()
    mappings = [
        WeightMapping("qkv_proj", "q_proj", "q"),
        WeightMapping("qkv_proj", "k_proj", "k"),
        WeightMapping("qkv_proj", "v_proj", "v"),
        WeightMapping("gate_up_proj", "gate_proj", 0),
        WeightMapping("gate_up_proj", "up_proj", 1),
    ]
    q, k = _filled((16, 8), 1), _filled((8, 8), 2)
    gate = _filled((6, 8), 4)
    weights = [
        ("k_proj.weight", k),
        ("q_proj.weight", q),
        ("gate_proj.weight", gate),
        ("up_proj.weight", torch.zeros(7, 8)),  # wrong shape
        ("rotary_emb.inv_freq", torch.zeros(2)),  # ignored
        ("lm_head.weight", torch.zeros(2, 8)),  # unexpected
    ]
    report = load_weights_by_mapping(block, weights, mappings, ignore=[r"rotary_emb\.inv_freq$"])
    assert torch.equal(block.qkv_proj.weight[:24], torch.cat([q, k]))
    assert torch.equal(block.gate_up_proj.weight[:6], gate)
    assert report.loaded == 3
    assert report.unexpected == ["lm_head.weight"]
    # a mis-shaped shard is reported once, as mis-shaped (not also as missing)
    assert report.mismatched == ["up_proj.weight (expected [6, 8], got [7, 8])"]
    # a missing shard is named as in the checkpoint, not as qkv_proj.weight[v]
    assert report.missing == ["v_proj.weight"]
    assert not report.ok


# -- tied embeddings -----------------------------------------------------------------------------


def _transformers_greedy(path, prompt_ids: list[int], n: int = N_TOKENS) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
        )
    return out[0, len(prompt_ids) :].tolist()


# the reference suppresses EOS for the first n tokens (min_new_tokens); so does min_tokens here
PARITY = vlm.SamplingParams(temperature=0, max_tokens=N_TOKENS, min_tokens=N_TOKENS)


@pytest.fixture(scope="module")
def tied_qwen2(tiny_models) -> str:
    path = tiny_models("qwen2", tie_word_embeddings=True)
    assert "lm_head.weight" not in _state_dict(path)  # transformers drops the tied copy
    return path


def test_tied_embeddings_load_and_match_transformers(tied_qwen2):
    llm = vlm.LLM(tied_qwen2)
    model = llm.engine.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prompt_ids = llm.tokenizer.encode(PROMPT)
    ours = llm.generate([prompt_ids], PARITY)[0].outputs[0].token_ids
    assert len(set(ours)) >= 8, ours
    assert ours == _transformers_greedy(tied_qwen2, prompt_ids)


def test_tied_checkpoint_with_lm_head_copy_loads(tied_qwen2, tmp_path):
    state = dict(_state_dict(tied_qwen2))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    path = _with_state_dict(tied_qwen2, tmp_path / "tied-with-copy", state)
    assert _generate(path) == _generate(tied_qwen2)


# -- a bf16 checkpoint in the fp32 engine --------------------------------------------------------


def test_bf16_checkpoint_in_fp32_engine_matches_transformers(tiny_models):
    path = tiny_models("llama", dtype="bfloat16")
    assert {t.dtype for t in _state_dict(path).values()} == {torch.bfloat16}
    llm = vlm.LLM(path, dtype="float32")  # (auto picks bf16 where the CPU has it: tests/test_bf16.py)
    assert llm.engine.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in llm.engine.model.parameters())
    prompt_ids = llm.tokenizer.encode(PROMPT)
    ours = llm.generate([prompt_ids], PARITY)[0].outputs[0].token_ids
    assert len(set(ours)) >= 8, ours
    assert ours == _transformers_greedy(path, prompt_ids)
