"""``vlmrun bench``: throughput, time to first token and inter-token latency under load.

Drives the engine in-process (``--model``) or a running server (``--url``) with ``--num-requests``
requests, at most ``--concurrency`` in flight, each ``--input-len`` prompt tokens (random text)
and ``--output-len`` new tokens (EOS ignored), optionally with ``--image`` attached.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm.cli.engine_args import add_engine_arguments, engine_settings

if TYPE_CHECKING:
    from vlm.inputs import Prompt


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="model directory (in-process engine)")
    parser.add_argument("--url", help="a running `vlmrun serve`, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default="none", help="for --url")
    parser.add_argument("--num-requests", "-n", type=int, default=32)
    parser.add_argument("--concurrency", "-c", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128, help="prompt words (about one token each)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--image", help="attach this picture to every request (VLMs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_engine_arguments(parser)


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    vocabulary = "the a of to and in is it you that he was for on are with as I his they be at one".split()
    # every prompt starts differently, so prefix caching cannot skip their prefill
    return [f"{i}: " + " ".join(rng.choice(vocabulary) for _ in range(words)) for i in range(count)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def report(timings: list[RequestTiming], wall: float) -> dict:
    tokens = sum(len(t.token_times) for t in timings)
    return {
        "requests": len(timings),
        "generated_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_s": percentiles([t.ttft for t in timings if t.token_times]),
        "itl_s": percentiles([g for t in timings for g in t.gaps]),
    }


def bench_engine(args: argparse.Namespace) -> list[RequestTiming]:
    from tqdm import tqdm

    from vlm.cli.run import user_message
    from vlm.config import EngineConfig
    from vlm.engine.llm_engine import LLMEngine
    from vlm.inputs.images import load_image
    from vlm.sampling_params import SamplingParams

    settings = {"max_num_seqs": args.concurrency, **engine_settings(args)}
    engine = LLMEngine(EngineConfig(model=args.model, **settings))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    image = load_image(args.image) if args.image else None
    pending: list[Prompt] = [
        [user_message(text, [image] if image else [])] for text in prompts(args.num_requests, args.input_len, args.seed)
    ]
    timings: dict[str, RequestTiming] = {}
    in_flight: set[str] = set()
    bar = tqdm(total=args.num_requests, desc="requests", unit="req", file=sys.stderr)
    while pending or in_flight:
        while pending and len(in_flight) < args.concurrency:
            start = time.perf_counter()
            request_id = engine.add_request(pending.pop(0), params)
            timings[request_id] = RequestTiming(start)
            in_flight.add(request_id)
        for output in engine.step():
            now = time.perf_counter()
            timings[output.request_id].token_times.append(now)
            if output.finished:
                in_flight.discard(output.request_id)
                bar.update(1)
    bar.close()
    return list(timings.values())


def bench_server(args: argparse.Namespace) -> list[RequestTiming]:
    import asyncio

    from openai import AsyncOpenAI
    from tqdm import tqdm

    client = AsyncOpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key)
    image_part = None
    if args.image:
        import base64
        import mimetypes

        mime = mimetypes.guess_type(args.image)[0] or "image/png"
        data = base64.b64encode(open(args.image, "rb").read()).decode()
        image_part = {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}

    async def run() -> list[RequestTiming]:
        model = (await client.models.list()).data[0].id
        semaphore = asyncio.Semaphore(args.concurrency)
        bar = tqdm(total=args.num_requests, desc="requests", unit="req", file=sys.stderr)

        async def one(text: str) -> RequestTiming:
            content = [image_part, {"type": "text", "text": text}] if image_part else text
            async with semaphore:
                timing = RequestTiming(time.perf_counter())
                messages: Any = [{"role": "user", "content": content}]
                stream: Any = await client.chat.completions.create(
                    model=model,
                    messages=messages,
                    max_tokens=args.output_len,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        timing.token_times.append(time.perf_counter())
                bar.update(1)
                return timing

        results = await asyncio.gather(*(one(t) for t in prompts(args.num_requests, args.input_len, args.seed)))
        bar.close()
        return results

    return asyncio.run(run())


def bench_command(args: argparse.Namespace) -> int:
    from vlm.errors import VlmError

    if bool(args.model) == bool(args.url):
        raise VlmError("give either --model DIR (in-process engine) or --url http://HOST:PORT (a running server)")
    start = time.perf_counter()
    timings = bench_engine(args) if args.model else bench_server(args)
    result = report(timings, time.perf_counter() - start)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ttft, itl = result["ttft_s"], result["itl_s"]
    print(
        f"requests: {result['requests']}  generated tokens: {result['generated_tokens']}  wall: {result['wall_s']:.2f} s"
    )
    print(f"throughput: {result['throughput_tok_s']:.1f} tok/s")
    print(f"TTFT  p50 {ttft['p50'] * 1e3:.0f} ms  p90 {ttft['p90'] * 1e3:.0f} ms  p99 {ttft['p99'] * 1e3:.0f} ms")
    print(f"ITL   p50 {itl['p50'] * 1e3:.1f} ms  p90 {itl['p90'] * 1e3:.1f} ms  p99 {itl['p99'] * 1e3:.1f} ms")
    return 0
