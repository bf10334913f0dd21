"""Tensor parallelism on one machine (``LLM(..., tensor_parallel_size=N)``, ``vlmrun --tp N``).

Rank 0 owns the request stream: the user's process (CLI, server or Python API) runs rank 0's
engine and spawns ranks 1..N-1 as worker processes that build the same engine. Before every
step, rank 0 broadcasts what changed since the last one (requests added, requests aborted); each
worker replays those commands on its own engine and steps. Scheduling and sampling are
deterministic functions of that state, so every rank runs the same batch and meets the others
in the same collectives (the all-reduces and all-gathers of ``vlm.nn``'s sharded layers).

Under ``torchrun`` there is nothing to spawn: every rank runs the user's script (SPMD), as
``tests/test_tensor_parallel.py`` shows.

Commands travel with ``torch.distributed.broadcast_object_list`` (pickle) between processes this
one started on 127.0.0.1; nothing from outside is unpickled.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger("vlm")

# A step waits this long for the other ranks (the slowest step is a large prefill or image batch).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _receive() -> Any:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TensorParallelDriver:
    """Rank 0's side: starts the workers, then sends each step's commands."""

    def __init__(self, engine_fields: dict[str, Any], world_size: int):
        self.world_size = world_size
        self._pending: list[tuple] = []
        self._lock = threading.Lock()
        port = _free_port()
        context = mp.get_context("spawn")  # fork would copy rank 0's threads and torch state
        self._workers = [
            context.Process(target=_worker_main, args=(rank, world_size, port, engine_fields), daemon=True,
                            name=f"vlm-tp-rank{rank}")
            for rank in range(1, world_size)
        ]
        for worker in self._workers:
            worker.start()
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
        )
        self._closed = False
        atexit.register(self.shutdown)
        logger.info("tensor parallel: rank 0 of %d, workers %s", world_size, [w.pid for w in self._workers])

    def add(self, request_id: str, inputs: Any, params: Any) -> None:
        with self._lock:
            self._pending.append(("add", request_id, inputs, params))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.append(("abort", request_id))

    def before_step(self) -> None:
        """Send what changed since the last step; the workers replay it and step with us."""
        with self._lock:
            commands, self._pending = self._pending, []
        self._check_workers()
        dist.broadcast_object_list([commands + [("step",)]], src=0)

    def _check_workers(self) -> None:
        dead = [w for w in self._workers if not w.is_alive()]
        if dead:
            raise RuntimeError(
                f"tensor-parallel worker {dead[0].name} exited (code {dead[0].exitcode}); see its log above "
                "and restart vlmrun"
            )

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if all(w.is_alive() for w in self._workers):
                dist.broadcast_object_list([[("stop",)]], src=0)
        except RuntimeError:  # a worker went away meanwhile: nothing left to stop
            pass
        try:
            for worker in self._workers:
                worker.join(timeout=30)
        finally:
            for worker in self._workers:
                if worker.is_alive():
                    worker.terminate()
            if dist.is_initialized():
                dist.destroy_process_group()


def _worker_main(rank: int, world_size: int, port: int, engine_fields: dict[str, Any]) -> None:
    from vlm.config import EngineConfig
    from vlm.engine.llm_engine import LLMEngine

    torch.set_num_threads(engine_fields.get("num_threads") or threads_per_rank(world_size))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    try:
        engine = LLMEngine(EngineConfig(**engine_fields))
    except Exception as exc:  # rank 0 builds the same engine, fails the same way and reports it
        logger.info("tensor-parallel rank %d: %s", rank, exc)
        dist.destroy_process_group()
        return
    try:
        while True:
            for command in _receive():
                kind = command[0]
                if kind == "add":
                    _, request_id, inputs, params = command
                    engine.add_request(inputs, params, request_id)
                elif kind == "abort":
                    engine.abort(command[1])
                elif kind == "stop":
                    return
                elif kind == "step":
                    try:
                        engine.step()
                    except Exception:  # rank 0 hit the same error and carries on: so do we
                        logger.exception("tensor-parallel rank %d: step failed", rank)
    finally:
        dist.destroy_process_group()
