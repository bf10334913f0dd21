"""The engine loop: add requests, ``step()`` until done. ``vlm.LLM``, the CLI and the server sit on top.

The work is split by job, as in vLLM v1: the :class:`InputProcessor` turns a prompt into a
validated sequence, the :class:`Scheduler` picks each step's batch, the :class:`ModelRunner` runs
it, the sampler picks tokens and the :class:`OutputProcessor` turns them into outputs. This class
only loads the model, wires those together and, under tensor parallelism, keeps the worker
ranks in step (:mod:`vlm.distributed.driver`).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch

from vlm import platform
from vlm.config import EngineConfig, load_model_config
from vlm.distributed import tp_world_size
from vlm.distributed.driver import start_driver, threads_per_rank
from vlm.engine.input_processor import InputProcessor
from vlm.engine.kv_cache import CacheShape, KVCache, blocks_for_budget
from vlm.engine.model_runner import ModelRunner
from vlm.engine.output_processor import OutputProcessor
from vlm.engine.sampler import sample
from vlm.engine.scheduler import Scheduler
from vlm.engine.sequence import Sequence
from vlm.engine.structured import StructuredOutputs
from vlm.errors import InputError
from vlm.inputs import ModelInputs, Prompt
from vlm.inputs.preprocessor import apply_image_budget
from vlm.loader import load_model, load_tokenizer, read_generation_config, resolve_model_path
from vlm.outputs import RequestOutput
from vlm.plugin.manager import build_preprocessor, grounding_parser
from vlm.quantization import QuantConfig
from vlm.rewrite import RewriterContext
from vlm.sampling_params import SamplingParams

logger = logging.getLogger("vlm")


def eos_token_ids(generation_config: dict[str, Any], tokenizer: Any, hf_config: Any) -> set[int]:
    """Every id that ends a sequence: config.json's, the tokenizer's and generation_config.json's."""
    ids: set[int] = set()
    for value in (
        getattr(hf_config, "eos_token_id", None),
        tokenizer.eos_token_id,
        generation_config.get("eos_token_id"),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """Sampling defaults as transformers' ``generate`` would use them: generation_config.json's."""
    values: dict[str, Any] = {"temperature": 0.0}
    if generation_config.get("do_sample"):
        values = {
            k: generation_config[k] for k in ("temperature", "top_p", "top_k") if generation_config.get(k) is not None
        }
    if generation_config.get("repetition_penalty") is not None:
        values["repetition_penalty"] = generation_config["repetition_penalty"]
    return values


def worker_engine(engine_fields: dict[str, Any]) -> LLMEngine:
    """How a spawned tensor-parallel rank builds its engine (unpickled by name in the worker)."""
    return LLMEngine(EngineConfig(**engine_fields))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = platform.default_device(config.device)
        self.model_dir = resolve_model_path(config.model, config.allow_download)
        self.model_config = load_model_config(self.model_dir)
        self.dtype = platform.default_dtype(self.device, config.dtype, self.model_config.torch_dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.generation_config = read_generation_config(self.model_dir)
        self._step_lock = threading.Lock()
        # the rewriters of this device (vlm.rewrite) apply around every forward step, and only then
        self._rewrites = RewriterContext(config, backend=self.device.type)
        self._tp = start_driver(config.tensor_parallel_size, self.device, worker_engine, config.model_dump())
        if self._tp is not None:
            atexit.register(self.close)
        if config.num_threads or self._tp:
            torch.set_num_threads(config.num_threads or threads_per_rank(config.tensor_parallel_size))
        try:
            self._build(config)
        except BaseException:
            self.close()  # the workers failed the same way; leave no process group behind
            raise

    def _build(self, config: EngineConfig) -> None:
        quantization = None
        if config.quantization is not None:
            quantization = QuantConfig(
                config.quantization, config.quantization_group_size, config.quantize_vision, config.quantize_lm_head
            )
        self.model, self.plugin, _ = load_model(
            self.model_config, self.dtype, self.device, config.plugin, quantization=quantization, rewrite_cfg=config
        )
        self.preprocessor = build_preprocessor(self.model_config, self.tokenizer, self.plugin)
        apply_image_budget(self.preprocessor, config.min_pixels, config.max_pixels, config.max_num_tiles)

        text = self.model_config.text
        self.max_model_len = min(config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        shape = CacheShape(
            num_layers=text.num_hidden_layers,
            num_kv_heads=max(1, text.num_key_value_heads // tp_world_size()),
            head_dim=text.head_dim,
            block_size=config.block_size,
        )
        num_blocks = blocks_for_budget(
            shape,
            self.dtype,
            config.kv_cache_gib * 2**30,
            config.max_num_seqs * (self.max_model_len + config.block_size),
        )
        self.kv_cache = KVCache(shape, num_blocks, self.dtype, self.device)
        self.scheduler = Scheduler(
            self.kv_cache.allocator,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens or platform.default_step_tokens(self.device),
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self.inputs = InputProcessor(
            self.preprocessor,
            self.tokenizer,
            vocab_size=text.vocab_size,
            max_model_len=self.max_model_len,
            cache_capacity=num_blocks * config.block_size,
            position_dims=getattr(self.model, "position_dims", 1),
        )
        self.eos_token_ids = eos_token_ids(self.generation_config, self.tokenizer, self.model_config.hf_config)
        self.outputs = OutputProcessor(
            self.tokenizer,
            self.eos_token_ids,
            self.max_model_len,
            parse_grounding=grounding_parser(self.plugin, self.model_config.hf_config),
        )
        # structured outputs: compiles constraints against the vocabulary (xgrammar loads on first use)
        self.structured = StructuredOutputs(self.tokenizer, text.vocab_size, self.eos_token_ids)
        self._sequences: dict[str, Sequence] = {}
        self._counter = itertools.count()
        logger.info(
            "loaded %s with plugin %s (%s, %s); KV cache %d blocks x %d tokens",
            self.model_dir,
            self.plugin,
            self.dtype,
            self.device,
            num_blocks,
            config.block_size,
        )

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at exit)."""
        if self._tp is None:
            return
        # not while another thread is inside a step's collectives; if one seems stuck there, the
        # workers are terminated without a last word
        if self._step_lock.acquire(timeout=30):
            try:
                self._tp.shutdown()
            finally:
                self._step_lock.release()
        else:
            self._tp.shutdown(tell_workers=False, leave_group=False)

    def default_sampling_values(self) -> dict[str, Any]:
        return sampling_defaults(self.generation_config)

    # -- requests ----------------------------------------------------------------------------

    def preprocess(self, prompt: Prompt | ModelInputs) -> ModelInputs:
        return self.inputs.preprocess(prompt)

    def add_request(
        self, prompt: Prompt | ModelInputs, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        inputs = self.preprocess(prompt)
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._sequences:
            raise InputError(f"request id {request_id!r} is already in use")
        seq = self.inputs.sequence(request_id, inputs, params, seed=self.config.seed + len(self._sequences))
        if params.structured_outputs is not None:  # raises StructuredOutputError (an InputError)
            seq.grammar = self.structured.matcher(params.structured_outputs, params.stop_token_ids)
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        if self._tp is not None:
            self._tp.add(request_id, inputs, params)
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
            if self._tp is not None:
                self._tp.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def unfinished_request_ids(self) -> list[str]:
        return list(self._sequences)

    # -- the loop ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward step; return an output for every sequence that produced a token."""
        if self._tp is None:
            return self._step()
        with self._step_lock:
            if self._tp.closed:
                raise RuntimeError("the tensor-parallel engine is stopped (closed, or a step failed); start a new one")
            try:
                self._tp.before_step()
                return self._step()
            except BaseException:
                # the workers may now disagree with us about the batch (and may be waiting in one of
                # its collectives): stop them rather than hang later
                self._tp.shutdown(tell_workers=False)
                raise

    def _step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.empty:
            if self.scheduler.waiting:
                raise RuntimeError("scheduler could not place any request; the KV cache is too small")
            return []
        with self._rewrites:
            logits, seqs = self.runner.execute(scheduled)
        self.scheduler.register_full_blocks(scheduled.decodes + [seq for seq, _ in scheduled.prefills])
        if logits is None:
            return []
        tokens, logprobs, failed = sample(logits, seqs, self.eos_token_ids)
        outputs = []
        for i, (seq, token, lp) in enumerate(zip(seqs, tokens, logprobs)):
            if i in failed:  # this request alone fails; the others of the batch go on
                seq.finish_reason, seq.error = "error", failed[i]
            else:
                self.outputs.append(seq, token, lp)
            outputs.append(self.outputs.output(seq))
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self._sequences.pop(seq.request_id, None)
        return outputs

    def stream(self, prompt: Prompt | ModelInputs, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Run one request alone, yielding after every token (for the CLI)."""
        request_id = self.add_request(prompt, params)
        try:
            while True:
                for output in self.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.abort(request_id)
