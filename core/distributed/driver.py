"""Tensor parallelism on one machine (``LLM(..., tensor_parallel_size=N)``, ``vlmrun --tp N``).

Rank 0 owns the request stream: the user's process (CLI, server or Python API) runs rank 0's
engine and spawns ranks 1..N-1 as worker processes that build the same engine. Before every
step, rank 0 broadcasts what changed since the last one (requests added, requests aborted); each
worker replays those commands on its own engine and steps. Scheduling and sampling are
deterministic functions of that state, so every rank runs the same batch and meets the others
in the same collectives (the all-reduces and all-gathers of ``vlm.nn``'s sharded layers).

Three deadlines, each its own: joining the group (:func:`rendezvous_timeout`, 5 minutes by
default, ``VLM_TP_RENDEZVOUS_TIMEOUT_S``: a spawned worker imports torch and vlm first, which on a
busy machine takes far longer than any step), the model's collectives
(:func:`collective_timeout`, 10 minutes, ``VLM_TP_COLLECTIVE_TIMEOUT_S``: the slowest step is a
large prefill or image batch) and waiting for the next command, which travels in its own process
group with no practical timeout (a worker may wait for the next request for days). A step that
fails on rank 0 stops the workers: after a failure the ranks may no longer agree on the batch,
so the engine refuses further steps instead of hanging in a collective.

Under ``torchrun`` there is nothing to spawn: every rank runs the user's script (SPMD), as
``tests/test_tensor_parallel.py`` shows.

Everything listens on loopback only: rank 0 binds the rendezvous store (torch's ``TCPStore``,
which has no authentication) to 127.0.0.1 itself and hands it the socket, and gloo's sockets
use the loopback interface (``GLOO_SOCKET_IFNAME`` set to it while the groups are built, whatever
the caller's environment says). Commands are pickled (``broadcast_object_list``) between
processes this one started; other local users of the machine are trusted as with any local port.
Each step costs one small broadcast; a request's pixels travel to every worker once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlm.distributed.parallel_state import tp_world_size
from vlm.errors import ConfigError

logger = logging.getLogger("vlm")

#: The ranks' only address: the store and gloo listen here and nowhere else.
LOOPBACK = "127.0.0.1"
#: A step waits this long for the other ranks (the slowest step is a large prefill or image batch).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
#: Joining the group: spawned workers import torch and vlm first, slow on a loaded machine.
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
#: Waiting for the next command is waiting for users: effectively forever.
COMMAND_TIMEOUT = timedelta(days=365)
#: How long rank 0 waits for a told worker to leave before terminating it.
SHUTDOWN_TIMEOUT_S = 60.0


def _seconds_from_env(name: str, default: timedelta) -> timedelta:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"{name}={value!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def collective_timeout() -> timedelta:
    """How long a step's collective waits: ``VLM_TP_COLLECTIVE_TIMEOUT_S``, else :data:`COLLECTIVE_TIMEOUT`."""
    return _seconds_from_env("VLM_TP_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT)


def rendezvous_timeout() -> timedelta:
    """How long the ranks wait for each other to join: ``VLM_TP_RENDEZVOUS_TIMEOUT_S``, else
    :data:`RENDEZVOUS_TIMEOUT`. Independent of the collective timeout (the workers inherit both)."""
    return _seconds_from_env("VLM_TP_RENDEZVOUS_TIMEOUT_S", RENDEZVOUS_TIMEOUT)


_active_driver: TensorParallelDriver | None = None


def active_driver() -> TensorParallelDriver | None:
    """The driver this process started, if it still runs (one tensor-parallel engine per process)."""
    return _active_driver if _active_driver is not None and not _active_driver.closed else None


def threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _loopback_interface() -> str:
    names = {name for _, name in socket.if_nameindex()}
    return "lo0" if "lo0" in names and "lo" not in names else "lo"


@contextlib.contextmanager
def _gloo_on_loopback() -> Iterator[None]:
    """gloo picks its interface from ``GLOO_SOCKET_IFNAME`` when a group is built: loopback, for
    that long (a caller's own value, say for a multi-machine job, is put back after)."""
    previous = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = previous


def _serve_store(world_size: int, timeout: timedelta) -> dist.TCPStore:
    """Rank 0's rendezvous store, on loopback only: torch's own socket would listen on every
    interface, so this one binds the socket and hands it over. Its port is ``store.port``; it
    listens before any worker starts, so there is no race for the port either."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(max(16, world_size))
        store = dist.TCPStore(
            LOOPBACK,
            listener.getsockname()[1],
            world_size,
            is_master=True,
            timeout=timeout,
            wait_for_workers=False,  # rank 0 watches for dead workers meanwhile (_rendezvous)
            master_listen_fd=listener.fileno(),
        )
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store's server owns the socket now and closes it
    return store


def _init_group(
    rank: int, world_size: int, store: dist.Store, timeouts: tuple[timedelta, timedelta]
) -> dist.ProcessGroup:
    """Join the default group (model collectives) and return the command group.

    Both groups are built under the rendezvous timeout (connecting waits for the slowest rank);
    only then do they take their own (the collective timeout, the command timeout), so that a
    short collective timeout bounds steps, never start-up, and a start-up that fails ends.
    """
    rendezvous, collective = timeouts
    with _gloo_on_loopback():
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=rendezvous)
        commands = dist.new_group(backend="gloo", timeout=rendezvous)
    dist.distributed_c10d._set_pg_timeout(collective)
    dist.distributed_c10d._set_pg_timeout(COMMAND_TIMEOUT, commands)
    return commands


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
        timeouts = (rendezvous_timeout(), collective_timeout())  # the workers get the same
        store = _serve_store(world_size, timeouts[0])
        context = mp.get_context("spawn")  # fork would copy rank 0's threads and torch state
        self._workers = [
            context.Process(
                target=_worker_main,
                args=(rank, world_size, store.port, timeouts, engine_factory, engine_fields),
                daemon=True,
                name=f"vlm-tp-rank{rank}",
            )
            for rank in range(1, world_size)
        ]
        try:
            for worker in self._workers:
                worker.start()
            self._commands: dist.ProcessGroup | None = self._rendezvous(world_size, store, timeouts)
        except BaseException:
            for worker in self._workers:
                _stop_process(worker)
            raise
        _active_driver = self
        logger.info("tensor parallel: rank 0 of %d, workers %s", world_size, [w.pid for w in self._workers])

    def _rendezvous(
        self, world_size: int, store: dist.TCPStore, timeouts: tuple[timedelta, timedelta]
    ) -> dist.ProcessGroup:
        """Join the workers, but notice a worker that dies before it joins instead of waiting."""
        result: dict[str, Any] = {}

        def join() -> None:
            try:
                result["group"] = _init_group(0, world_size, store, timeouts)
            except BaseException as exc:  # reported below
                result["error"] = exc

        thread = threading.Thread(target=join, name="vlm-tp-rendezvous", daemon=True)
        thread.start()
        limit = timeouts[0].total_seconds()
        deadline = time.monotonic() + limit + 30  # the store's own timeout should fire first
        while thread.is_alive():
            thread.join(0.2)
            dead = [w for w in self._workers if w.exitcode is not None]
            if dead or time.monotonic() > deadline:
                why = (
                    f"exited with code {dead[0].exitcode}; see its log above (in a script, start the engine "
                    "under `if __name__ == '__main__':`, which spawned workers need)"
                    if dead
                    else f"did not join within {limit:.0f} s (on a busy machine, raise VLM_TP_RENDEZVOUS_TIMEOUT_S)"
                )
                raise RuntimeError(f"tensor-parallel worker {(dead or self._workers)[0].name} {why}")
        if "error" in result:
            if dist.is_initialized():  # the default group formed, the command group did not
                dist.destroy_process_group()
            raise RuntimeError(
                f"tensor-parallel ranks did not join: {result['error']} (on a busy machine, raise "
                "VLM_TP_RENDEZVOUS_TIMEOUT_S)"
            ) from result["error"]
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
        if self._commands is None:
            raise RuntimeError("the tensor-parallel group is gone (shut down)")
        dist.broadcast_object_list([commands + [("step",)]], src=0, group=self._commands)

    def shutdown(self, tell_workers: bool = True, leave_group: bool = True) -> None:
        """Stop the workers and leave the group.

        Told workers leave their loop and exit (within :data:`SHUTDOWN_TIMEOUT_S`, else they are
        terminated); ``tell_workers=False`` terminates them at once without a last broadcast (they
        may be waiting in a step's collective, or for a command that will never come);
        ``leave_group=False`` when another thread may still use the group.
        """
        global _active_driver
        if self.closed:
            return
        self.closed = True
        try:
            if tell_workers and self._commands is not None and all(w.is_alive() for w in self._workers):
                dist.broadcast_object_list([[("stop",)]], src=0, group=self._commands)
                # rank 0 hosts the store: leaving before the workers have left their groups would
                # pull it from under them (gloo aborts the process then), so wait for them to exit
                deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
                for worker in self._workers:
                    worker.join(timeout=max(0.0, deadline - time.monotonic()))
        except RuntimeError:  # a worker went away meanwhile: nothing left to tell
            pass
        finally:
            for worker in self._workers:
                _stop_process(worker)
            if leave_group:
                # the command group holds gloo's sockets and the store: let them go too
                self._commands = None
                if dist.is_initialized():
                    dist.destroy_process_group()
            if _active_driver is self:
                _active_driver = None


def _stop_process(process: BaseProcess) -> None:
    if process.is_alive():
        process.terminate()
        process.join(30)
    if process.is_alive():  # SIGTERM ignored or blocked
        process.kill()
        process.join(30)


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    timeouts: tuple[timedelta, timedelta],
    engine_factory: Callable[[dict[str, Any]], Any],
    engine_fields: dict[str, Any],
) -> None:
    logging.basicConfig(level=logging.INFO, format=f"vlm rank {rank}: %(message)s")
    torch.set_num_threads(engine_fields.get("num_threads") or threads_per_rank(world_size))
    store = dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeouts[0])
    commands = _init_group(rank, world_size, store, timeouts)
    try:
        engine = engine_factory(engine_fields)
    except Exception as exc:  # rank 0 builds the same engine and fails the same way
        logger.error("could not build the engine: %s", exc)
        dist.destroy_process_group()
        sys.exit(1)
    try:
        while True:
            box: list[Any] = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=commands)
            except RuntimeError as exc:  # its connection closed: rank 0 exited without a word
                logger.warning("rank 0 went away (%s); leaving", str(exc).splitlines()[0][:200])
                sys.exit(1)
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
