"""Tensor parallelism on one machine (``LLM(..., tensor_parallel_size=N)``, ``vlmrun --tp N``).

Rank 0 owns the request stream: the user's process (CLI, server or Python API) runs rank 0's
engine and spawns ranks 1..N-1 as worker processes that build the same engine. Before every
step, rank 0 broadcasts what changed since the last one (requests added, requests aborted); each
worker replays those commands on its own engine and steps. Scheduling and sampling are
deterministic functions of that state, so every rank runs the same batch and meets the others
in the same collectives (the all-reduces and all-gathers of ``vlm.nn``'s sharded layers).

Commands travel in their own process group with no practical timeout (a worker may wait for
the next request for days); the model's collectives keep :data:`COLLECTIVE_TIMEOUT`. A step that
fails on rank 0 stops the workers: after a failure the ranks may no longer agree on the batch,
so the engine refuses further steps instead of hanging in a collective.

Under ``torchrun`` there is nothing to spawn: every rank runs the user's script (SPMD), as
``tests/test_tensor_parallel.py`` shows.

The ranks talk over loopback (``GLOO_SOCKET_IFNAME=lo``) and commands are pickled
(``broadcast_object_list``) between processes this one started; the store that pairs them up has
no authentication, so other local users of the machine are trusted as with any local port.
Each step costs one small broadcast; a request's pixels travel to every worker once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlm.distributed.parallel_state import tp_world_size
from vlm.errors import ConfigError

logger = logging.getLogger("vlm")

# A step waits this long for the other ranks (the slowest step is a large prefill or image batch).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# Waiting for the next command is waiting for users: effectively forever.
COMMAND_TIMEOUT = timedelta(days=365)
# Spawned workers import torch and vlm before they can join; beyond this, start-up has failed.
STARTUP_TIMEOUT_S = 300.0

_active_driver: TensorParallelDriver | None = None


def active_driver() -> TensorParallelDriver | None:
    """The driver this process started, if it still runs (one tensor-parallel engine per process)."""
    return _active_driver if _active_driver is not None and not _active_driver.closed else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _init_group(rank: int, world_size: int, port: int) -> dist.ProcessGroup:
    """Join the default group (model collectives) and return the command group."""
    seconds = os.environ.get("VLM_TP_COLLECTIVE_TIMEOUT_S")  # for tests
    timeout = timedelta(seconds=float(seconds)) if seconds else COLLECTIVE_TIMEOUT
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timeout
    )
    return dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)


class TensorParallelDriver:
    """Rank 0's side: starts the workers, then sends each step's commands."""

    def __init__(self, engine_factory: Callable[[dict[str, Any]], Any], engine_fields: dict[str, Any], world_size: int):
        """:param engine_factory: a module-level function (spawned workers unpickle it by name)
        that builds a worker's engine from ``engine_fields``; the engine passes its own, so this
        module never imports the engine."""
        global _active_driver
        self.world_size = world_size
        self.closed = False
        self._pending: list[tuple] = []
        self._lock = threading.Lock()  # add/abort come from the engine's callers, step/shutdown too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; the workers inherit it
        port = _free_port()
        context = mp.get_context("spawn")  # fork would copy rank 0's threads and torch state
        self._workers = [
            context.Process(
                target=_worker_main,
                args=(rank, world_size, port, engine_factory, engine_fields),
                daemon=True,
                name=f"vlm-tp-rank{rank}",
            )
            for rank in range(1, world_size)
        ]
        for worker in self._workers:
            worker.start()
        self._commands = self._rendezvous(world_size, port)
        _active_driver = self
        logger.info("tensor parallel: rank 0 of %d, workers %s", world_size, [w.pid for w in self._workers])

    def _rendezvous(self, world_size: int, port: int) -> dist.ProcessGroup:
        """Join the workers, but notice a worker that dies before it joins instead of waiting."""
        result: dict[str, Any] = {}

        def join() -> None:
            try:
                result["group"] = _init_group(0, world_size, port)
            except BaseException as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=join, name="vlm-tp-rendezvous", daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while thread.is_alive():
            thread.join(0.2)
            dead = [w for w in self._workers if w.exitcode is not None]
            if dead or time.monotonic() > deadline:
                for worker in self._workers:
                    worker.terminate()
                why = (
                    f"exited with code {dead[0].exitcode}" if dead else f"did not join within {STARTUP_TIMEOUT_S:.0f} s"
                )
                raise RuntimeError(
                    f"tensor-parallel worker {(dead or self._workers)[0].name} {why}; see its log above "
                    "(in a script, start the engine under `if __name__ == '__main__':`, which spawned workers need)"
                )
        if "error" in result:
            raise result["error"]
        return result["group"]

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
        dead = [w for w in self._workers if not w.is_alive()]
        if dead:
            raise RuntimeError(
                f"tensor-parallel worker {dead[0].name} exited (code {dead[0].exitcode}); see its log above "
                "and restart vlmrun"
            )
        dist.broadcast_object_list([commands + [("step",)]], src=0, group=self._commands)

    def shutdown(self, tell_workers: bool = True, leave_group: bool = True) -> None:
        """Stop the workers (they leave their loop, or are terminated) and leave the group.

        ``tell_workers=False`` terminates them without a last broadcast (they may be waiting in a
        step's collective); ``leave_group=False`` when another thread may still use the group.
        """
        global _active_driver
        if self.closed:
            return
        self.closed = True
        try:
            if tell_workers and all(w.is_alive() for w in self._workers):
                dist.broadcast_object_list([[("stop",)]], src=0, group=self._commands)
            for worker in self._workers:
                worker.join(timeout=30)
        except RuntimeError:  # a worker went away meanwhile: nothing left to stop
            pass
        finally:
            for worker in self._workers:
                if worker.is_alive():
                    worker.terminate()
                    worker.join(10)
            if dist.is_initialized() and leave_group:
                dist.destroy_process_group()
            if _active_driver is self:
                _active_driver = None


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    engine_factory: Callable[[dict[str, Any]], Any],
    engine_fields: dict[str, Any],
) -> None:
    logging.basicConfig(level=logging.INFO, format=f"vlm rank {rank}: %(message)s")
    torch.set_num_threads(engine_fields.get("num_threads") or threads_per_rank(world_size))
    commands = _init_group(rank, world_size, port)
    try:
        engine = engine_factory(engine_fields)
    except Exception as exc:  # rank 0 builds the same engine and fails the same way
        logger.error("could not build the engine: %s", exc)
        dist.destroy_process_group()
        sys.exit(1)
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=commands)
            for command in box[0]:
                kind = command[0]
                if kind == "add":
                    _, request_id, inputs, params = command
                    engine.add_request(inputs, params, request_id)
                elif kind == "abort":
                    engine.abort(command[1])
                elif kind == "step":
                    engine.step()
                elif kind == "stop":
                    return
    except Exception:
        # out of step with rank 0 from here on: leave, so rank 0 sees a dead worker, not a hang
        logger.exception("tensor-parallel rank %d failed", rank)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_driver(
    size: int, device: torch.device, engine_factory: Callable[[dict[str, Any]], Any], engine_fields: dict[str, Any]
) -> TensorParallelDriver | None:
    """Spawn ranks 1..N-1 for ``tensor_parallel_size=N`` unless a launcher (torchrun) already did.

    :return: the driver, or ``None`` when this process runs alone or under torchrun (SPMD).
    """
    driver = active_driver()
    if driver is not None:
        raise ConfigError(
            f"this process already runs a tensor-parallel engine (rank 0 of {driver.world_size}), whose "
            "process group any other engine here would join; close it first (llm.close())"
        )
    if tp_world_size() > 1:
        if size not in (1, tp_world_size()):
            raise ConfigError(
                f"tensor_parallel_size={size} but the process group has {tp_world_size()} ranks; "
                "leave tensor_parallel_size unset under torchrun"
            )
        return None
    if size == 1:
        return None
    if device.type != "cpu":
        raise ConfigError(
            f"tensor_parallel_size={size} spawns CPU (gloo) ranks; on {device.type} launch one "
            "process per device with torchrun instead"
        )
    return TensorParallelDriver(engine_factory, engine_fields, size)
