"""``AsyncEngine``: one ``LLMEngine`` in a dedicated thread, driven from asyncio.

The engine thread is the only thread that touches the engine's scheduler, KV cache and model.
Asyncio handlers talk to it through a thread-safe inbox (``queue.Queue``) of commands (add,
abort, stop) that the thread drains between steps; when the engine has nothing to do the thread
blocks on the inbox, so an idle server burns no CPU. Each request gets a :class:`RequestStream`
whose ``asyncio.Queue`` the engine thread feeds with ``loop.call_soon_threadsafe`` (one call per
event loop per step, however many requests it carries).

Preprocessing runs in thread pools (:meth:`AsyncEngine.run_in_pool`) before a request is
submitted, so a big image never stalls the decoding of the requests already running. There are
three, so that one kind of work never waits behind another: ``text`` (chat template and
tokenization of prompts without images), ``media`` (reading and downloading images: waiting on
the network, many threads) and ``preprocess`` (decoding images and making their pixels:
CPU-bound, few threads).

If ``step()`` raises, the thread survives: every in-flight request is failed with
:class:`EngineStepError` and aborted (its KV blocks are freed), and new requests are served.

``n > 1`` adds n sequences that share the prompt, with seeds ``seed + i`` (with no seed, the
engine's per-sequence default seeds).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import CancelledError as FutureCancelledError
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vlm.errors import VlmError

logger = logging.getLogger("vlm.server")

#: Seconds of history behind the tokens-per-second gauge.
THROUGHPUT_WINDOW_S = 10.0


class EngineStepError(VlmError):
    """The engine failed while running a request; the request was aborted, the engine lives on."""


class EngineStoppedError(VlmError):
    """The engine thread is not running (not started, shut down, or it died)."""


class RequestAbortedError(VlmError):
    """The request was aborted (its client went away, or someone called ``abort``)."""


@dataclass
class EngineStats:
    """A snapshot the engine thread publishes after every step (read by /metrics and /health)."""

    num_waiting: int = 0
    num_running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps_total: int = 0
    step_errors_total: int = 0
    requests_in_flight: int = 0


class RequestStream:
    """The outputs of one submitted request (``n`` sequences), on the submitting event loop.

    Iterate it (``async for index, output in stream``) to get ``(choice index, RequestOutput)``
    pairs until every sequence has finished; an engine failure is raised from the iteration.
    """

    def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop, arrival_time: float | None = None):
        self.request_id = request_id
        self.n = n
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.accepted: asyncio.Future = loop.create_future()
        self.finished = False  # every sequence finished (or the request failed / was aborted)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_output_time: float | None = None
        # engine-thread side
        self._engine_ids: list[str] = []
        self._unfinished = n

    # called on the loop (through call_soon_threadsafe)
    def _put(self, item: Any) -> None:
        if self.first_output_time is None and not isinstance(item, BaseException):
            self.first_output_time = time.monotonic()
        self.queue.put_nowait(item)

    def _accept(self, error: BaseException | None) -> None:
        if self.accepted.done():
            return
        if error is None:
            self.accepted.set_result(None)
        else:
            self.accepted.set_exception(error)

    def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, Any]]:
        remaining = self.n
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            index, output = item
            if output.finished:
                remaining -= 1
            yield index, output
        self.finished = True


@dataclass
class _Add:
    stream: RequestStream
    inputs: Any
    params: Any


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _Pending:
    """Deliveries of one step, grouped by event loop."""

    items: dict[asyncio.AbstractEventLoop, list[tuple[Callable, Any]]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def add(self, stream: RequestStream, method: Callable, arg: Any) -> None:
        self.items[stream.loop].append((method, arg))

    def flush(self) -> None:
        for loop, calls in self.items.items():
            try:
                loop.call_soon_threadsafe(_run_calls, calls)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        self.items.clear()


def _run_calls(calls: list[tuple[Callable, Any]]) -> None:
    for method, arg in calls:
        method(arg)


class AsyncEngine:
    """Run an ``LLMEngine`` in its own thread and serve it to asyncio code.

    :param engine: an ``EngineConfig`` (the engine is built in the engine thread) or a callable
        that returns a built engine (tests).
    :param preprocess_workers: threads of the ``preprocess`` pool (image decoding, pixels).
    :param text_workers: threads of the ``text`` pool (prompts without images).
    :param media_workers: threads of the ``media`` pool (reading and downloading images).
    """

    def __init__(self, engine: Any, preprocess_workers: int = 4, text_workers: int = 2, media_workers: int = 16):
        self._factory = engine if callable(engine) else (lambda: _build_engine(engine))
        self.engine: Any = None  # set once started; only the engine thread may call into it
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._sub_ids: dict[str, tuple[RequestStream, int]] = {}  # engine request id -> (stream, index)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._pools = {
            "preprocess": ThreadPoolExecutor(max_workers=preprocess_workers, thread_name_prefix="vlm-preprocess"),
            "text": ThreadPoolExecutor(max_workers=text_workers, thread_name_prefix="vlm-text"),
            "media": ThreadPoolExecutor(max_workers=media_workers, thread_name_prefix="vlm-media"),
        }
        self._counter = itertools.count()
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self.stats = EngineStats()
        self.dead_reason: str | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> AsyncEngine:
        """Start the engine thread and wait until the model is loaded (raises what loading raised)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name="vlm-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the engine did not start in time")
        if self._start_error is not None:
            raise self._start_error
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still running fail with :class:`EngineStoppedError`."""
        self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_Stop())
            self._thread.join(timeout)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()  # tensor-parallel workers, if any
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._start_error is None and not self._stopping

    # -- read-only facts about the loaded model (set before the thread starts serving) --------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_multimodal(self) -> bool:
        return bool(self.engine.model_config.is_multimodal)

    def default_sampling_values(self) -> dict:
        return self.engine.default_sampling_values()

    def preprocess(self, prompt: Any, tools: list[dict[str, Any]] | None = None) -> Any:
        """Turn a prompt into ``ModelInputs`` (the plugin's preprocessor; thread-safe, no engine state);
        ``tools``: function definitions for the chat template (tool calling)."""
        if not tools:
            return self.engine.preprocess(prompt)
        from vlm.inputs.preprocessor import preprocess_with_tools

        return preprocess_with_tools(self.engine.inputs.preprocessor, prompt, tools)

    @property
    def chat_template(self) -> str | None:
        """The chat template the model's preprocessor renders messages with (None if unknown)."""
        from vlm.inputs.preprocessor import chat_template_of

        return chat_template_of(self.engine.inputs.preprocessor)

    async def run_in_pool(
        self, func: Callable, *args: Any, pool: str = "preprocess", on_done: Callable[[], None] | None = None
    ) -> Any:
        """Run blocking preprocessing work off the event loop and off the engine thread.

        :param pool: ``"preprocess"``, ``"text"`` or ``"media"`` (see the module's docstring).
        :param on_done: called on this event loop once ``func`` has returned or raised in its
            thread (or was cancelled before it started), even if the caller stopped waiting: for
            resources the work holds, such as memory budgets.
        :raises EngineStoppedError: the engine was shut down (the work may have been dropped).
        """
        loop = asyncio.get_running_loop()
        try:
            future: Future = self._pools[pool].submit(func, *args)
        except RuntimeError:  # the pool was shut down
            if on_done is not None:
                on_done()
            raise EngineStoppedError(self.dead_reason or "the server is shutting down") from None
        if on_done is not None:
            callback = on_done

            def done(_: Future) -> None:
                try:
                    loop.call_soon_threadsafe(callback)
                except RuntimeError:  # the loop is closed
                    pass

            future.add_done_callback(done)
        try:
            return await asyncio.wrap_future(future)
        except (asyncio.CancelledError, FutureCancelledError):
            if future.cancelled() and self._stopping:  # dropped by shutdown(), not by our caller
                raise EngineStoppedError(self.dead_reason or "the server is shutting down") from None
            raise

    # -- requests (any thread / event loop) ----------------------------------------------------

    async def add_request(
        self, inputs: Any, params: Any, n: int = 1, request_id: str | None = None, arrival_time: float | None = None
    ) -> RequestStream:
        """Submit preprocessed ``inputs``; returns once the engine accepted them.

        :param arrival_time: ``time.monotonic()`` when the request arrived (for time-to-first-token),
            default now.
        :raises InputError: the engine refused the request (e.g. the prompt is too long).
        :raises EngineStoppedError: the engine thread is not running.
        """
        if not self.is_running:
            raise EngineStoppedError(self.dead_reason or "the engine is not running")
        request_id = request_id or f"req-{next(self._counter)}"
        stream = RequestStream(request_id, n, asyncio.get_running_loop(), arrival_time)
        self._inbox.put(_Add(stream, inputs, params))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request and free its KV blocks (thread-safe; unknown or finished ids are ignored)."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_Abort(request_id))

    async def generate(
        self, inputs: Any, params: Any, n: int = 1, request_id: str | None = None
    ) -> AsyncIterator[tuple[int, Any]]:
        """Submit and iterate; leaving the iteration early aborts the request."""
        stream = await self.add_request(inputs, params, n, request_id)
        try:
            async for item in stream:
                yield item
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def generation_throughput(self) -> float:
        """Generated tokens per second over the last :data:`THROUGHPUT_WINDOW_S` seconds."""
        now = time.monotonic()
        try:
            samples = tuple(self._token_times)
        except RuntimeError:  # appended to by the engine thread meanwhile
            return 0.0
        recent = sum(count for t, count in samples if t >= now - THROUGHPUT_WINDOW_S)
        return recent / THROUGHPUT_WINDOW_S

    # -- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self.dead_reason = f"the engine failed to start: {exc}"
            self._ready.set()
            return
        self.stats.kv_blocks_total = self.engine.kv_cache.allocator.num_blocks
        self._publish_stats()
        self._ready.set()
        try:
            self._loop()
        except BaseException as exc:  # a bug in this loop: fail everyone rather than hang them
            logger.exception("the engine thread died")
            self.dead_reason = f"the engine thread died: {type(exc).__name__}: {exc}"
            pending = _Pending()
            for stream in list(self._streams.values()):
                pending.add(stream, stream._accept, None)
                pending.add(stream, stream._put, EngineStoppedError(self.dead_reason))
            pending.flush()
            raise

    def _loop(self) -> None:
        engine = self.engine
        while True:
            commands = []
            if not engine.has_unfinished():
                self._publish_stats()
                commands.append(self._inbox.get())  # idle: block, no busy loop
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            pending = _Pending()
            for command in commands:
                if isinstance(command, _Stop):
                    self._stop(pending)
                    return
                if isinstance(command, _Add):
                    self._add(command, pending)
                elif isinstance(command, _Abort):
                    self._abort(command.request_id, pending)
            if engine.has_unfinished():
                self._step(pending)
            pending.flush()
            self._publish_stats()

    def _add(self, command: _Add, pending: _Pending) -> None:
        stream, params = command.stream, command.params
        if stream.request_id in self._streams:
            pending.add(stream, stream._accept, _input_error(f"request id {stream.request_id!r} is already in use"))
            return
        added: list[str] = []
        try:
            for i in range(stream.n):
                sub_params = params
                if stream.n > 1 and params.seed is not None:
                    sub_params = params.model_copy(update={"seed": params.seed + i})
                engine_id = stream.request_id if stream.n == 1 else f"{stream.request_id}/{i}"
                self.engine.add_request(command.inputs, sub_params, engine_id)
                added.append(engine_id)
                self._sub_ids[engine_id] = (stream, i)
        except Exception as exc:  # noqa: BLE001 - InputError and anything else: refuse this request only
            for engine_id in added:
                self._sub_ids.pop(engine_id, None)
                self._safe_abort(engine_id)
            if not isinstance(exc, VlmError):
                logger.exception("could not add request %s", stream.request_id)
            pending.add(stream, stream._accept, exc)
            return
        stream._engine_ids = added
        stream._unfinished = stream.n
        self._streams[stream.request_id] = stream
        self.stats.prompt_tokens_total += len(command.inputs.token_ids) * stream.n
        pending.add(stream, stream._accept, None)

    def _abort(self, request_id: str, pending: _Pending) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        for engine_id in stream._engine_ids:
            if self._sub_ids.pop(engine_id, None) is not None:
                self._safe_abort(engine_id)
        # a reader still iterating the stream ends instead of waiting forever
        pending.add(stream, stream._put, RequestAbortedError(f"request {request_id} was aborted"))

    def _safe_abort(self, engine_id: str) -> None:
        try:
            self.engine.abort(engine_id)
        except Exception:  # noqa: BLE001
            logger.exception("could not abort %s", engine_id)

    def _step(self, pending: _Pending) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the in-flight requests, keep serving
            logger.exception("engine step failed; failing %d in-flight request(s)", len(self._streams))
            self.stats.step_errors_total += 1
            message = f"the engine failed while running this request ({type(exc).__name__}: {exc}); it was aborted"
            self._fail_all(EngineStepError(message), pending)
            return
        self.stats.steps_total += 1
        if outputs:
            self.stats.generation_tokens_total += len(outputs)
            now = time.monotonic()
            self._token_times.append((now, len(outputs)))
            while self._token_times and self._token_times[0][0] < now - THROUGHPUT_WINDOW_S:
                self._token_times.popleft()
        for output in outputs:
            entry = self._sub_ids.get(output.request_id)
            if entry is None:
                continue  # aborted meanwhile
            stream, index = entry
            if output.finished:
                del self._sub_ids[output.request_id]
                stream._unfinished -= 1
                if stream._unfinished == 0:
                    self._streams.pop(stream.request_id, None)
            error = output.outputs[0].error if output.outputs else None
            if error is not None:  # this request failed alone; its neighbours in the batch go on
                self._abort_siblings(stream, pending)
                pending.add(stream, stream._put, _input_error(error))
                continue
            pending.add(stream, stream._put, (index, output))

    def _abort_siblings(self, stream: RequestStream, pending: _Pending) -> None:
        """The other choices (n > 1) of a request that failed: stop them too."""
        for engine_id, (other, _) in list(self._sub_ids.items()):
            if other is stream:
                del self._sub_ids[engine_id]
                self._safe_abort(engine_id)
        self._streams.pop(stream.request_id, None)

    def _fail_all(self, error: BaseException, pending: _Pending) -> None:
        """Fail and abort every in-flight request and leave the engine with nothing in it."""
        for stream in list(self._streams.values()):
            pending.add(stream, stream._put, error)
        for engine_id in list(self._sub_ids):
            self._safe_abort(engine_id)
        self._sub_ids.clear()
        self._streams.clear()
        # anything the engine still holds (a step may have failed half-way) goes too
        engine = self.engine
        for engine_id in engine.unfinished_request_ids():
            self._safe_abort(engine_id)
        scheduler = engine.scheduler
        for seq in list(scheduler.running) + list(scheduler.waiting):
            try:
                scheduler.finish(seq)
            except Exception:  # noqa: BLE001
                logger.exception("could not release a sequence after a failed step")

    def _stop(self, pending: _Pending) -> None:
        error = EngineStoppedError("the server is shutting down")
        self.dead_reason = str(error)
        self._fail_all(error, pending)
        while True:  # requests submitted behind the stop command are refused, not left waiting
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                pending.add(command.stream, command.stream._accept, error)
        pending.flush()
        self._publish_stats()

    def _publish_stats(self) -> None:
        engine = self.engine
        stats = self.stats
        stats.num_waiting = len(engine.scheduler.waiting)
        stats.num_running = len(engine.scheduler.running)
        stats.kv_blocks_used = engine.kv_cache.allocator.num_used
        stats.kv_blocks_total = engine.kv_cache.allocator.num_blocks
        stats.num_preemptions = getattr(engine.scheduler, "num_preemptions", 0)
        stats.requests_in_flight = len(self._streams)


def _build_engine(config: Any) -> Any:
    from vlm.engine.llm_engine import LLMEngine

    return LLMEngine(config)


def _input_error(message: str) -> Exception:
    from vlm.errors import InputError

    return InputError(message)
