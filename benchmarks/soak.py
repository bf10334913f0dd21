"""Soak test of ``vlmrun serve``: memory, KV blocks and framing under rounds of concurrent streams.

Each round sends ``--concurrency`` streaming chat requests at once (``--disconnect`` of them hang
up after their third chunk) to a server on loopback with a tiny random model, then waits for the
engine to go idle and records the server's resident memory (``/proc/PID/status`` VmRSS), the KV
blocks still held and the requests lost (a finished stream without ``[DONE]`` or with an error).
Every event is parsed the way strict clients do: the stream is split with ``str.splitlines``
(which also splits at U+2028, U+2029 and U+0085) and each ``data:`` line must be whole JSON.

    python benchmarks/soak.py                          # 60 rounds of 64 requests, 13 disconnecting
    python benchmarks/soak.py --rounds 20 --json out.json

RSS is expected to grow during warm-up (allocator arenas, caches filling up to their bounds) and
then stay flat: the report gives the growth from the end of warm-up to the last round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from vlm.testing.server import ServerProcess


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one_stream(client: httpx.AsyncClient, url: str, index: int, disconnect: bool, tokens: int) -> dict:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": f"Request {index}: tell me a long story."}],
        "max_tokens": tokens,
        "stream": True,
        "temperature": 1.0,
        "seed": index,
        "ignore_eos": True,
    }
    chunks = bad = 0
    done = errored = False
    buffer = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        async for text in response.aiter_text():
            buffer += text
            *events, buffer = buffer.split("\n\n")
            for event in events:
                for line in event.splitlines():  # what a strict client does
                    if not line.startswith("data: "):
                        if line.strip():
                            bad += 1
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        done = True
                        continue
                    try:
                        payload = json.loads(data)
                    except json.JSONDecodeError:
                        bad += 1
                        continue
                    chunks += 1
                    errored = errored or "error" in payload
            if disconnect and chunks >= 3:
                break  # hang up mid-stream
    return {"chunks": chunks, "bad": bad, "done": done, "error": errored, "disconnected": disconnect}


async def one_round(url: str, concurrency: int, disconnects: int, tokens: int, round_index: int) -> list[dict]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        jobs = [
            one_stream(client, url, round_index * concurrency + i, i < disconnects, tokens) for i in range(concurrency)
        ]
        return await asyncio.gather(*jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--disconnect", type=int, default=13)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=10, help="rounds before RSS is expected to be flat")
    parser.add_argument("--model", help="a model directory (default: a tiny random Qwen2 written here)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from vlm.testing.checkpoints import write_tiny_text_model

            model = str(write_tiny_text_model(Path(tmp) / "qwen2", "qwen2"))
        server = ServerProcess(model, "--served-model-name", "m", log_path=Path(tmp) / "serve.log")
        rows = []
        try:
            start_rss = rss_mib(server.proc.pid)
            print(f"server pid {server.proc.pid}, RSS at start {start_rss:.0f} MiB", flush=True)
            print("round  RSS MiB  blocks  done  lost  bad-json  chunks  seconds")
            for index in range(args.rounds):
                started = time.perf_counter()
                results = asyncio.run(one_round(server.url, args.concurrency, args.disconnect, args.tokens, index))
                idle = server.wait_idle(timeout=60)
                seconds = time.perf_counter() - started
                kept = [r for r in results if not r["disconnected"]]
                row = {
                    "round": index,
                    "rss_mib": rss_mib(server.proc.pid),
                    "blocks": int(idle["vlm_kv_cache_blocks_used"]),
                    "done": sum(r["done"] and not r["error"] for r in kept),
                    "lost": sum(not r["done"] or r["error"] for r in kept),
                    "bad_json": sum(r["bad"] for r in results),
                    "chunks": sum(r["chunks"] for r in results),
                    "seconds": round(seconds, 2),
                }
                rows.append(row)
                print(
                    f"{index:5d}  {row['rss_mib']:7.0f}  {row['blocks']:6d}  {row['done']:4d}  {row['lost']:4d}  "
                    f"{row['bad_json']:8d}  {row['chunks']:6d}  {seconds:7.1f}",
                    flush=True,
                )
        finally:
            server.stop()
    warm = rows[min(args.warmup, len(rows) - 1)]["rss_mib"]
    last = rows[-1]["rss_mib"]
    summary = {
        "rss_start_mib": round(start_rss),
        "rss_after_warmup_mib": round(warm),
        "rss_end_mib": round(last),
        "growth_after_warmup_mib": round(last - warm, 1),
        "growth_after_warmup_pct": round(100 * (last - warm) / warm, 1),
        "max_blocks_after_round": max(r["blocks"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "bad_json": sum(r["bad_json"] for r in rows),
        "chunks": sum(r["chunks"] for r in rows),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "summary": summary}, indent=2))
    sys.exit(0 if summary["lost"] == 0 and summary["bad_json"] == 0 and summary["max_blocks_after_round"] == 0 else 1)


if __name__ == "__main__":
    main()
