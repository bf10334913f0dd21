"""The offline Python API, named as vLLM users expect.

from vlm import LLM, SamplingParams

llm = LLM("./qwen2-dir")
outputs = llm.generate(["Hello", "The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
print(outputs[0].outputs[0].text, outputs[0].outputs[0].token_ids)

llm.chat([{"role": "user", "content": "Hi!"}])        # one conversation, chat template applied
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

from vlm.config import EngineConfig
from vlm.engine.llm_engine import LLMEngine
from vlm.inputs import Message, ModelInputs, Prompt
from vlm.outputs import RequestOutput
from vlm.sampling_params import SamplingParams


class LLM:
    """Load a model directory once; generate for many prompts.

    :param model: a model directory (or a hub id already in the local Hugging Face cache).
    :param engine_args: any :class:`vlm.config.EngineConfig` field (``dtype``, ``max_model_len``,
        ``max_num_seqs``, ``plugin``, ``kv_cache_gib``, ...).
    """

    def __init__(self, model: str, **engine_args: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))

    def close(self) -> None:
        """Release what the engine holds beyond memory: tensor-parallel worker processes."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt | ModelInputs],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings, token-id lists, or message lists), batched.

        :return: one :class:`RequestOutput` per prompt, in order.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(self.engine.add_request(prompt, params))
        except Exception:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate the assistant's reply for one conversation or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate(cast(list[Prompt], conversations), sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request piece by piece as it is generated."""
        for output in self.engine.stream(prompt, sampling_params):
            if output.outputs[0].delta:
                yield output.outputs[0].delta

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        try:
            while len(results) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for request_id in ids:
                if request_id not in results:
                    self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[request_id] for request_id in ids]
