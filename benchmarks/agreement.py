"""How far vlm's bf16 / int8 / int4 outputs stay from fp32, on a Qwen2-0.5B-shaped random checkpoint.

The checkpoint is benchmarks/decode.py's with every matrix scaled from its ``initializer_range``
(0.02, at which greedy output is one token repeated: with tied embeddings the tiny layers leave
each token predicting itself) to ``--init-range``, so that greedy output varies; the number of
distinct tokens in the fp32 output is printed and must reach ``--min-distinct``. The default, 0.03,
is about the smallest that varies. Larger is not better: at 0.3 (the tiny test checkpoints'
value) this 24-layer network is chaotic (bf16 leaves fp32's greedy path after 2 tokens, int4
agrees with nothing, measured 2026-12-01), which measures the random network, not the number
formats. Even at 0.03 a random network's predictions are near ties (the median fp32 top-1 / top-2
logit gap is printed; a trained model's is far larger), so top-1 agreement here is a pessimistic,
relative measure: compare the variants with each other, and read the KL column.

From one fixed prompt vlm generates ``--steps`` tokens greedily in fp32; then for each variant:

- **teacher-forced top-1 agreement**: the prompt and the fp32 tokens go through the variant in one
  prefill (the engine's own path, ``LLM.generate`` with one new token, and the hidden state of
  every position captured at ``ModelRunner.forward``); the share of positions whose argmax is the
  fp32 token. The fp32 row is the baseline (prefill vs decode numerics; ideally 100%);
- **free-running**: the variant's own greedy output; the length of the prefix identical to fp32's,
  and the share of positions equal to fp32's;
- **KL**: mean KL(fp32 || variant) of the teacher-forced next-token distributions, in nats, and
  the median fp32 top-1 / top-2 logit gap (how close the calls were);
- **reference**: the same two teacher-forced numbers from transformers with the variant's numbers
  applied by hand (bf16 model; int8 / int4 weights rounded to nearest in a few lines of torch,
  no vlm code), against vlm's fp32 logits: where vlm's columns match these, what is lost is the
  format's, not vlm's (skip with ``--no-reference``).

    python benchmarks/agreement.py
    python benchmarks/agreement.py --only bf16 int4-g32 --steps 128
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def load_decode() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_decode", HERE / "decode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decode = load_decode()

#: variant -> LLM keyword arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(quantization="int8"),
    "int4-g128": dict(quantization="int4", quantization_group_size=128),
    "int4-g32": dict(quantization="int4", quantization_group_size=32),
}
DEFAULT_INIT_RANGE = 0.02  # decode.checkpoint()'s


def varied_checkpoint(base: Path, init_range: float) -> Path:
    """decode.py's checkpoint with every matrix (not the norms' vectors) scaled to ``init_range``."""
    from safetensors.torch import load_file, save_file

    path = base.parent / f"{base.name}-init{init_range:g}"
    if (path / "config.json").is_file():
        return path
    print(f"writing {path}: {base.name} with its matrices scaled by {init_range / DEFAULT_INIT_RANGE:g} (once)")
    scale = init_range / DEFAULT_INIT_RANGE
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in base.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            save_file(
                {k: v * scale if v.dim() >= 2 else v for k, v in tensors.items()}, tmp / file.name, {"format": "pt"}
            )
        elif file.name == "config.json":
            config = json.loads(file.read_text())
            config["initializer_range"] = init_range
            (tmp / file.name).write_text(json.dumps(config, indent=2))
        elif file.is_file():
            shutil.copy(file, tmp / file.name)
    tmp.rename(path)
    return path


def teacher_forced_logits(llm: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), vocab]`` fp32 logits predicting each of ``tokens`` after ``prompt`` and the
    tokens before it, all from one (possibly chunked) prefill through the engine."""
    from vlm import SamplingParams

    runner = llm.engine.runner
    original = runner.forward
    captured: list[torch.Tensor] = []

    def forward(step: Any, inputs_embeds: torch.Tensor | None = None) -> Any:
        result = original(step, inputs_embeds)
        captured.append(result.hidden_states.clone())  # one request alone: every row is its
        return result

    runner.forward = forward
    try:
        llm.generate([prompt + tokens[:-1]], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    finally:
        runner.forward = original
    hidden = torch.cat(captured)
    assert hidden.shape[0] == len(prompt) + len(tokens) - 1, "prefix caching must be off"
    with torch.inference_mode():
        return llm.engine.model.compute_logits(hidden[len(prompt) - 1 :]).float()


def rtn_int8(weight: torch.Tensor) -> torch.Tensor:
    """Round to nearest, one symmetric scale per output channel (vlm's int8 scheme), dequantized."""
    scale = weight.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def rtn_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round to nearest, min-max scale and zero point per group of inputs (vlm's int4 scheme), dequantized."""
    groups = weight.reshape(weight.shape[0], -1, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(1e-12) / 15
    return (((groups - low) / scale).round().clamp(0, 15) * scale + low).reshape(weight.shape)


def reference_logits(path: Path, variant: str, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The teacher-forced logits of transformers with the variant's numbers applied by hand (bf16:
    the whole model in bf16; int8 / int4: every decoder-layer linear rounded to nearest, as vlm
    quantizes them, computed in fp32): a check on vlm's numbers written without vlm's code."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    settings = VARIANTS[variant]
    if variant == "bf16":
        model.bfloat16()
    elif settings.get("quantization") is not None:
        group = settings.get("quantization_group_size", 128)
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    w.copy_(rtn_int8(w) if settings["quantization"] == "int8" else rtn_int4(w, group))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    return logits.float()


def greedy(llm: Any, prompt: list[int], steps: int) -> list[int]:
    from vlm import SamplingParams

    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    return list(out[0].outputs[0].token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[v for v in VARIANTS if v != "fp32"], help="variants to compare")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--init-range", type=float, default=0.03, help="std of the matrices (see above)")
    parser.add_argument("--min-distinct", type=int, default=32, help="distinct tokens the fp32 output must have")
    parser.add_argument("--model", type=Path, default=decode.CACHE / "qwen2-0.5b-random")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the transformers + round-to-nearest reference column"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from vlm import LLM

    path = varied_checkpoint(decode.checkpoint(args.model), args.init_range)
    prompt = decode.prompts(1, args.prompt_len, decode.QWEN2_0_5B["vocab_size"])[0]
    print(
        f"{path.name}; prompt {args.prompt_len} tokens, {args.steps} greedy steps; torch threads {torch.get_num_threads()}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
    )

    def load(variant: str) -> Any:
        # no prefix caching: the teacher-forced prefill must compute every position itself
        return LLM(
            str(path),
            device="cpu",
            max_model_len=args.prompt_len + args.steps + 16,
            max_num_seqs=1,
            enable_prefix_caching=False,
            **VARIANTS[variant],
        )

    llm = load("fp32")
    reference = greedy(llm, prompt, args.steps)
    distinct = len(set(reference))
    print(f"fp32 greedy output: {distinct} distinct tokens in {args.steps}; first 16: {reference[:16]}")
    if distinct < args.min_distinct:
        raise SystemExit(f"fp32 output too uniform ({distinct} < {args.min_distinct} distinct): raise --init-range")
    ref_logits = teacher_forced_logits(llm, prompt, reference)
    top2 = ref_logits.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).median().item()
    ref_logprobs = ref_logits.log_softmax(-1)
    print(f"fp32 teacher-forced: median top-1 - top-2 logit gap {gap:.3f}, logit std {ref_logits.std().item():.2f}")
    del llm
    gc.collect()

    def kl_from_reference(logits: torch.Tensor) -> float:
        return (ref_logprobs.exp() * (ref_logprobs - logits.log_softmax(-1))).sum(-1).mean().item()

    rows = []
    for variant in ["fp32", *(args.only or [v for v in VARIANTS if v != "fp32"])]:
        if variant == "fp32":
            free, logits = reference, ref_logits
        else:
            llm = load(variant)
            free = greedy(llm, prompt, args.steps)
            logits = teacher_forced_logits(llm, prompt, reference)
            del llm
            gc.collect()
        teacher = (logits.argmax(-1) == torch.tensor(reference)).float().mean().item()
        prefix = next((i for i, (a, b) in enumerate(zip(free, reference)) if a != b), len(reference))
        same = sum(a == b for a, b in zip(free, reference)) / len(reference)
        kl = kl_from_reference(logits)
        row: dict[str, Any] = dict(
            variant=variant, teacher_forced=teacher, identical_prefix=prefix, free_same=same, kl=kl
        )
        if not args.no_reference and variant != "fp32":
            hf_logits = reference_logits(path, variant, prompt, reference)
            row["ref_teacher_forced"] = (hf_logits.argmax(-1) == torch.tensor(reference)).float().mean().item()
            row["ref_kl"] = kl_from_reference(hf_logits)
            del hf_logits
            gc.collect()
        rows.append(row)
        print(f"  {variant}: teacher-forced {teacher:.1%}, identical prefix {prefix}, KL {kl:.2e}", flush=True)

    print(f"\ntop-1 agreement with vlm fp32 greedy over {args.steps} steps\n")
    reference_columns = "" if args.no_reference else " reference: teacher-forced top-1 | reference: KL |"
    print(
        "| variant | teacher-forced top-1 | free-running identical prefix | free-running same token | KL (nats) |"
        + reference_columns
    )
    print("| --- | --- | --- | --- | --- |" + ("" if args.no_reference else " --- | --- |"))
    for row in rows:
        cells = [
            row["variant"],
            f"{row['teacher_forced']:.1%}",
            f"{row['identical_prefix']} / {args.steps}",
            f"{row['free_same']:.1%}",
            f"{row['kl']:.2e}",
        ]
        if not args.no_reference:
            has = "ref_kl" in row
            cells += [f"{row['ref_teacher_forced']:.1%}" if has else "-", f"{row['ref_kl']:.2e}" if has else "-"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(dict(distinct=distinct, median_gap=gap, rows=rows), indent=2))


if __name__ == "__main__":
    main()
