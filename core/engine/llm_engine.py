"""The engine loop: add requests, ``step()`` until done. ``vlm.LLM`` and the CLI sit on top."""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from vlm.config import EngineConfig, load_model_config
from vlm.distributed import tp_world_size
from vlm.engine.detokenizer import IncrementalDetokenizer
from vlm.engine.kv_cache import CacheShape, KVCache, blocks_for_budget
from vlm.engine.model_runner import ModelRunner
from vlm.engine.sampler import sample
from vlm.engine.scheduler import Scheduler
from vlm.engine.sequence import Sequence
from vlm.engine.tensor_parallel import TensorParallelDriver, active_driver, threads_per_rank
from vlm.errors import ConfigError, InputError
from vlm.inputs import ModelInputs, Prompt
from vlm.grounding import BOX_START, GroundedBox, parse_boxes
from vlm.loader import load_checkpoint, resolve_model_path
from vlm.models import build_model, build_preprocessor
from vlm.nn.gemm import prepare_for_inference
from vlm.outputs import CompletionOutput, RequestOutput
from vlm.sampling_params import SamplingParams

logger = logging.getLogger("vlm")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"no usable tokenizer in {model_dir} ({first_line}); the model directory needs tokenizer files "
            "(tokenizer.json or tokenizer_config.json + vocab)"
        ) from None


def _eos_token_ids(model_dir: Path, tokenizer, hf_config) -> set[int]:
    ids: set[int] = set()
    generation_config = model_dir / "generation_config.json"
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    if generation_config.is_file():
        try:
            sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            logger.warning("ignoring %s: not valid JSON", generation_config)
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        self.model_dir = resolve_model_path(config.model, config.allow_download)
        self.model_config = load_model_config(self.model_dir)
        self.dtype = self._dtype()
        self.tokenizer = load_tokenizer(self.model_dir)
        self._box_start_id: int | None = None  # looked up on the first finished request
        self._step_lock = threading.Lock()
        self._tp = self._start_tensor_parallel(config)
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
        self.model, self.plugin = build_model(self.model_config, self.dtype, self.device, config.plugin)
        self.preprocessor = build_preprocessor(self.model_config, self.tokenizer, self.plugin)
        load_checkpoint(self.model, self.model_dir)
        self.model.eval()
        prepare_for_inference(self.model)

        text = self.model_config.text
        self.max_model_len = min(config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        shape = CacheShape(
            num_layers=text.num_hidden_layers,
            num_kv_heads=max(1, text.num_key_value_heads // tp_world_size()),
            head_dim=text.head_dim,
            block_size=config.block_size,
        )
        num_blocks = blocks_for_budget(
            shape, self.dtype, config.kv_cache_gib * 2**30, config.max_num_seqs * (self.max_model_len + config.block_size)
        )
        self.kv_cache = KVCache(shape, num_blocks, self.dtype, self.device)
        self.scheduler = Scheduler(
            self.kv_cache.allocator,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens or (512 if self.device.type == "cpu" else 2048),
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self.eos_token_ids = _eos_token_ids(self.model_dir, self.tokenizer, self.model_config.hf_config)
        self._sequences: dict[str, Sequence] = {}
        self._counter = itertools.count()
        logger.info(
            "loaded %s with plugin %s (%s, %s); KV cache %d blocks x %d tokens",
            self.model_dir, self.plugin, self.dtype, self.device, num_blocks, config.block_size,
        )

    def _start_tensor_parallel(self, config: EngineConfig) -> TensorParallelDriver | None:
        """Spawn ranks 1..N-1 for ``tensor_parallel_size=N`` unless a launcher (torchrun) already did."""
        size = config.tensor_parallel_size
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
        if self.device.type != "cpu":
            raise ConfigError(
                f"tensor_parallel_size={size} spawns CPU (gloo) ranks; on {self.device.type} launch one "
                "process per device with torchrun instead"
            )
        return TensorParallelDriver(config.model_dump(), size)

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

    def _dtype(self) -> torch.dtype:
        if self.config.dtype != "auto":
            return _DTYPES[self.config.dtype]
        if self.device.type == "cpu":
            return torch.float32  # no native bf16 on these CPUs: fp32 is the fast dtype
        return _DTYPES.get(self.model_config.torch_dtype or "", torch.bfloat16)

    def default_sampling_values(self) -> dict:
        """Sampling defaults as transformers' ``generate`` would use them: generation_config.json's."""
        path = self.model_dir / "generation_config.json"
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            config = {}
        values: dict = {"temperature": 0.0}
        if config.get("do_sample"):
            values = {k: config[k] for k in ("temperature", "top_p", "top_k") if config.get(k) is not None}
        if config.get("repetition_penalty") is not None:
            values["repetition_penalty"] = config["repetition_penalty"]
        return values

    # -- requests ----------------------------------------------------------------------------

    def preprocess(self, prompt: Prompt | ModelInputs) -> ModelInputs:
        return prompt if isinstance(prompt, ModelInputs) else self.preprocessor(prompt)

    def add_request(
        self, prompt: Prompt | ModelInputs, params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        inputs = self.preprocess(prompt)
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._sequences:
            raise InputError(f"request id {request_id!r} is already in use")
        prompt_len = len(inputs.token_ids)
        if prompt_len >= self.max_model_len:
            raise InputError(
                f"prompt of {prompt_len} tokens does not fit the context of {self.max_model_len} tokens "
                "(it needs room for at least one new token); shorten the prompt or raise --max-model-len"
            )
        capacity = self.kv_cache.num_blocks * self.config.block_size
        if prompt_len + 1 > capacity:
            raise InputError(
                f"prompt of {prompt_len} tokens exceeds the KV cache ({capacity} tokens); raise --kv-cache-gib"
            )
        if max(inputs.token_ids) >= self.model_config.text.vocab_size or min(inputs.token_ids) < 0:
            raise InputError(f"prompt token ids must be in [0, {self.model_config.text.vocab_size})")
        self._check_positions(inputs)
        placeholders = self._placeholder_positions(inputs)
        seed = params.seed if params.seed is not None else self.config.seed + len(self._sequences)
        generator = None
        if not params.greedy:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
        seq = Sequence(
            request_id=request_id,
            inputs=inputs,
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, inputs.token_ids, params.skip_special_tokens),
            generator=generator,
            logprobs=[] if params.logprobs is not None else None,
            placeholder_positions=placeholders,
        )
        self._sequences[request_id] = seq
        self.scheduler.add(seq)
        if self._tp is not None:
            self._tp.add(request_id, inputs, params)
        return request_id

    def _check_positions(self, inputs: ModelInputs) -> None:
        positions = getattr(inputs, "positions", None)
        wants = getattr(self.model, "position_dims", 1)
        if positions is None:
            return
        if wants != 3:
            raise InputError("the preprocessor returned explicit positions but the model does not take them (position_dims != 3)")
        if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (3, len(inputs.token_ids)):
            shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise InputError(
                f"the preprocessor's positions are {shape}, expected [3, {len(inputs.token_ids)}] "
                "(one temporal/height/width column per prompt token); the plugin must fix its preprocessor"
            )

    @staticmethod
    def _placeholder_positions(inputs: ModelInputs) -> torch.Tensor | None:
        """Where image features go; the counts must agree before anything runs."""
        images = getattr(inputs, "images", None) or []
        token_id = getattr(inputs, "image_token_id", None)
        if token_id is None:
            if images:
                raise InputError("the preprocessor returned images but no image_token_id; the plugin must set it")
            return None
        positions = (torch.tensor(inputs.token_ids) == token_id).nonzero().flatten()
        expected = sum(image.num_tokens for image in images)
        if positions.numel() != expected:
            raise InputError(
                f"the prompt has {positions.numel()} image placeholder tokens but its {len(images)} image(s) "
                f"need {expected}; let the preprocessor insert image placeholders (do not type them)"
            )
        return positions if images else None

    def abort(self, request_id: str) -> None:
        seq = self._sequences.pop(request_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
            if self._tp is not None:
                self._tp.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
        logits, seqs = self.runner.execute(scheduled)
        self.scheduler.register_full_blocks(scheduled.decodes + [seq for seq, _ in scheduled.prefills])
        if logits is None:
            return []
        tokens, logprobs = sample(logits, seqs, self.eos_token_ids)
        outputs = []
        for seq, token, lp in zip(seqs, tokens, logprobs):
            self._append(seq, token, lp)
            outputs.append(self._output(seq))
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self._sequences.pop(seq.request_id, None)
        return outputs

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        params = seq.params
        seq.output_token_ids.append(token)
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        previous_len = len(seq.text)
        seq.text += seq.detokenizer.add(token)
        n = len(seq.output_token_ids)
        if n >= params.min_tokens:
            if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif params.stop:
                self._check_stop_strings(seq, previous_len)
        if seq.finish_reason is None and (n >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and not seq.stopped_by_string:
            seq.text += seq.detokenizer.flush()

    def _check_stop_strings(self, seq: Sequence, previous_len: int) -> None:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, previous_len - longest + 1)
        hits = [(seq.text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            seq.text = seq.text[: index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
            seq.finish_reason = "stop"
            seq.stopped_by_string = True

    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.finish_reason is not None
        # while running, hold back text that could still become the start of a stop string
        hold = 0 if finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        visible = max(seq.num_emitted_chars, len(seq.text) - hold)
        delta = seq.text[seq.num_emitted_chars : visible]
        seq.num_emitted_chars = visible
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.inputs.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=seq.text[:visible],
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    delta=delta,
                    boxes=self._grounded_boxes(seq) if finished else [],
                )
            ],
            finished=finished,
        )

    def _grounded_boxes(self, seq: Sequence) -> list[GroundedBox]:
        if self._box_start_id is None:
            self._box_start_id = self.tokenizer.get_vocab().get(BOX_START, -1)
        if self._box_start_id in seq.output_token_ids:
            # the box markers are special tokens, dropped from ``text``: parse with them kept
            return parse_boxes(self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=False))
        return parse_boxes(seq.text) if "bbox_2d" in seq.text else []

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
