"""Tensor parallelism on CPU (gloo, 2 ranks): the same tokens and logits as one process.

Each rank runs the same offline requests (SPMD): scheduling is deterministic, so the ranks stay in
step, and the vlm.nn layers shard heads, MLP columns/rows and the vocabulary between them.

Nothing here may depend on timing: these tests pass on a machine whose cores another process
keeps busy (deadlines are generous and polled, never a sleep standing in for synchronisation).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path

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
    deadline = time.monotonic() + 300
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


def _collect_logits(llm):
    """Patch rank 0's runner to keep every step's logits (the workers' are identical by construction)."""
    captured = []
    runner = llm.engine.runner
    original = runner.execute

    def execute(step):
        logits, seqs = original(step)
        if logits is not None:
            captured.append(logits.clone())
        return logits, seqs

    runner.execute = execute
    return captured


def test_spawned_ranks_match_one_process_under_continuous_batching(tiny_models):
    """``tensor_parallel_size=2``: rank 0 owns the requests and broadcasts them each step.

    Requests join mid-generation and one is aborted, so the workers must replay adds and aborts
    at the right steps to stay in lockstep; tokens and logits equal the single process's.
    """
    from vlm import LLM, SamplingParams

    model_dir = tiny_models("qwen2")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def drive(llm):
        engine = llm.engine
        logits = _collect_logits(llm)
        ids = [engine.add_request(PROMPTS[0], params)]
        outputs = {}
        for step in range(40):
            if step == 3:
                ids.append(engine.add_request(PROMPTS[1], params))
                ids.append(engine.add_request("to be aborted", params))
            if step == 5:
                engine.abort(ids[2])
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
            if not engine.has_unfinished():
                break
        return [outputs.get(i) for i in ids], torch.cat(logits), engine.kv_cache.allocator.num_used

    single = LLM(model_dir, num_threads=1)
    expected_tokens, expected_logits, _ = drive(single)
    expected_again = [o.outputs[0].token_ids for o in single.generate(PROMPTS, params)]
    # from here on this process is rank 0 of a process group: no other engine may be built in it
    llm = LLM(model_dir, tensor_parallel_size=2)
    try:
        assert llm.engine.model.model.layers[0].self_attn.num_heads == 2  # of 4: really sharded
        tokens, logits, used = drive(llm)
        assert tokens == expected_tokens and tokens[2] is None and len(tokens[0]) == 12
        torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
        assert used == 0
        # a second batch on the same workers still matches
        again = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        assert again == expected_again
    finally:
        llm.engine.close()
    assert not llm.engine._tp._workers[0].is_alive()


def test_tensor_parallel_size_must_divide_the_heads(tiny_models):
    from vlm import LLM

    with pytest.raises(Exception, match="not divisible by the tensor-parallel size"):
        LLM(tiny_models("qwen2"), tensor_parallel_size=3)
    assert not dist.is_initialized(), "a failed start must not leave this process in a process group"


def test_vlmrun_tp_prints_the_same_answer(tiny_models):
    """``vlmrun --tp 2`` in a fresh interpreter: the workers start, answer, and exit with it."""
    import subprocess
    import sys

    model_dir = tiny_models("qwen2")
    command = [
        sys.executable,
        "-m",
        "vlm.cli.main",
        "--model",
        model_dir,
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]
    one = subprocess.run(command, capture_output=True, text=True, timeout=300)
    two = subprocess.run([*command, "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and len(one.stdout.strip()) > 0


def test_vlmrun_serve_tp_answers_like_offline(tiny_models, tmp_path):
    """The server's engine thread drives rank 0; the worker follows its adds and steps."""
    import asyncio

    openai = pytest.importorskip("openai")
    from vlm import LLM, SamplingParams
    from vlm.testing.server import ServerProcess

    model_dir = tiny_models("qwen2")
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS * 2]
    expected = [
        o.outputs[0].text
        for o in LLM(model_dir, num_threads=1).chat(chats, SamplingParams(temperature=0, max_tokens=12))
    ]
    server = ServerProcess(
        model_dir, "--tp", "2", "--served-model-name", "tiny", log_path=tmp_path / "serve.log", startup_timeout=300
    )
    try:

        async def ask_all():
            async with openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300
            ) as client:

                async def ask(messages):
                    reply = await client.chat.completions.create(
                        model="tiny", messages=messages, max_tokens=12, temperature=0
                    )
                    return reply.choices[0].message.content

                return await asyncio.gather(*(ask(chat) for chat in chats))

        assert asyncio.run(ask_all()) == expected, server.log()[-3000:]
        assert "tensor parallel: rank 0 of 2" in server.log()
    finally:
        server.stop()


def test_spawned_ranks_survive_idle_time_and_fail_loudly(tiny_models, monkeypatch):
    """Waiting for requests is not a collective timeout; a second engine in the process, a dead
    worker and a failed step are one-line errors, never a hang."""
    import time

    from vlm import LLM, SamplingParams
    from vlm.errors import ConfigError

    monkeypatch.setenv("VLM_TP_COLLECTIVE_TIMEOUT_S", "2")  # the model's collectives; inherited by the worker
    model_dir = tiny_models("qwen2")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model_dir, num_threads=1).generate(PROMPTS, params)]
    with LLM(model_dir, tensor_parallel_size=2) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == expected
        time.sleep(4)  # longer than the collective timeout, with the worker waiting for a command
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == expected
        with pytest.raises(ConfigError, match="already runs a tensor-parallel engine"):
            LLM(model_dir)

        original = llm.engine.runner.execute
        llm.engine.runner.execute = lambda step: (_ for _ in ()).throw(RuntimeError("boom"))
        llm.engine.add_request("Hello", params)
        with pytest.raises(RuntimeError, match="boom"):
            llm.engine.step()
        llm.engine.runner.execute = original
        with pytest.raises(RuntimeError, match="tensor-parallel engine is stopped"):
            llm.engine.step()
        assert not any(w.is_alive() for w in llm.engine._tp._workers)
    assert not dist.is_initialized()

    with LLM(model_dir, tensor_parallel_size=2) as llm:  # a new engine after the old one stopped
        llm.engine._tp._workers[0].kill()
        llm.engine._tp._workers[0].join(60)
        llm.engine.add_request("Hello", params)
        with pytest.raises(RuntimeError, match="worker vlm-tp-rank1 exited"):
            llm.engine.step()
    assert not dist.is_initialized()


def _listening_sockets() -> dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every listening TCP socket of this network namespace: inode -> local address (Linux /proc)."""
    found: dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address = fields[1].rsplit(":", 1)[0]
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            found[int(fields[9])] = ipaddress.ip_address(raw)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else ():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _listeners(pid: int) -> set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    listening = _listening_sockets()
    return {(inode, listening[inode]) for inode in _socket_inodes(pid) if inode in listening}


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_spawned_ranks_join_however_slowly_and_listen_on_loopback_only(tiny_models, tmp_path, monkeypatch):
    """The rendezvous has its own deadline: a worker that takes longer to start than the
    collective timeout (as importing torch on a busy core does) still joins. The store and
    gloo, neither authenticated, listen on loopback and on no other interface."""
    from vlm import LLM, SamplingParams

    model_dir = tiny_models("qwen2")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model_dir, num_threads=1).generate(PROMPTS, params)]
    # the spawned worker's interpreter sleeps in sitecustomize before it even imports torch
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\n\ntime.sleep(4)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("VLM_TP_COLLECTIVE_TIMEOUT_S", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "not-an-interface")  # a caller's setting must not matter
    already = _listeners(os.getpid())
    with LLM(model_dir, tensor_parallel_size=2) as llm:
        assert os.environ["GLOO_SOCKET_IFNAME"] == "not-an-interface"  # put back
        monkeypatch.delenv("PYTHONPATH")  # the worker has started
        worker = llm.engine._tp._workers[0]
        listeners = {"rank 0": _listeners(os.getpid()) - already, "rank 1": _listeners(worker.pid)}
        # rank 0: the store and one gloo listener per group; rank 1: gloo's
        assert len(listeners["rank 0"]) >= 2 and len(listeners["rank 1"]) >= 1, listeners
        exposed = {rank: [str(a) for _, a in found if not _is_loopback(a)] for rank, found in listeners.items()}
        assert exposed == {"rank 0": [], "rank 1": []}, listeners
        # the collective timeout (1 s) bounds steps only; the worker was slower than that to join
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == expected
    assert not worker.is_alive() and worker.exitcode == 0
    assert not _listeners(os.getpid()) - already  # the store closed with the group
    assert not dist.is_initialized()


def _has_exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has exited; its new parent may not have reaped it yet


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux's /proc")
def test_workers_leave_when_rank_0_dies(tiny_models):
    """Rank 0 killed outright (no atexit, no last broadcast): its worker notices the closed
    connection while waiting for a command and exits, instead of waiting for a year."""
    import subprocess
    import sys

    model_dir = tiny_models("qwen2")
    script = (
        "import os, signal\n"
        "from vlm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({model_dir!r}, tensor_parallel_size=2)\n"
        "    llm.generate(['Hello'], SamplingParams(max_tokens=2))\n"
        "    print(llm.engine._tp._workers[0].pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    # the worker inherited the pipes: run() returns once it has closed them too, i.e. exited
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]
    worker = int(done.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while not _has_exited(worker):
        assert time.monotonic() < deadline, f"worker {worker} still runs after rank 0 died"
        time.sleep(0.1)
    assert "rank 0 went away" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
