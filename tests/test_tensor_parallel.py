"""Tensor parallelism on CPU (gloo, 2 ranks): the same tokens and logits as one process.

Each rank runs the same offline requests (SPMD): scheduling is deterministic, so the ranks stay in
step, and the vlm.nn layers shard heads, MLP columns/rows and the vocabulary between them.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROMPTS = ["Hello", "The quick brown fox jumps"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(model_dir: str):
    from vlm import LLM, SamplingParams
    from vlm.engine.model_runner import ModelRunner

    llm = LLM(model_dir, num_threads=1)
    captured = []
    original = ModelRunner.execute

    def execute(self, step):
        logits, seqs = original(self, step)
        if logits is not None:
            captured.append(logits.clone())
        return logits, seqs

    ModelRunner.execute = execute
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    finally:
        ModelRunner.execute = original
    qkv = llm.engine.model.model.layers[0].self_attn.qkv_proj
    return [o.outputs[0].token_ids for o in outputs], torch.cat(captured), qkv.num_heads


def _worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokens, logits, heads = _generate(model_dir)
    torch.save({"tokens": tokens, "logits": logits, "heads": heads}, f"{out}.{rank}")
    dist.barrier()
    # Rank 0 hosts the TCP store: if it tears down while another rank is still destroying its
    # group, gloo's background thread in that rank aborts ("terminate called without an active
    # exception"). So the other ranks finish first and say so through a file.
    done = f"{out}.done.{rank}"
    if rank:
        dist.destroy_process_group()
        open(done, "w").close()
        return
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{out}.done.{r}") for r in range(1, world)):
        if time.monotonic() > deadline:
            raise TimeoutError("the other tensor-parallel ranks did not finish")
        time.sleep(0.05)
    dist.destroy_process_group()


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_two_ranks_match_one_process(tiny_models, tmp_path, model_type):
    model_dir = tiny_models(model_type)
    expected_tokens, expected_logits, all_heads = _generate(model_dir)
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, _free_port(), model_dir, out), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        assert result["heads"] == all_heads // 2  # really sharded
        assert result["tokens"] == expected_tokens
        torch.testing.assert_close(result["logits"], expected_logits, atol=1e-4, rtol=0)
