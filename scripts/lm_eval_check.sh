#!/usr/bin/env bash
# EleutherAI's lm-evaluation-harness against `vlmrun serve`, offline, in one command:
#
#   scripts/lm_eval_check.sh [MODEL_DIR]     # default: a tiny random Qwen2 written to a temp dir
#
# 1. lm-eval (`lm-eval[api]`, LM_EVAL_VERSION, default 0.4.13) goes into its own venv
#    (LM_EVAL_VENV, default .cache/lm-eval-venv) that sees .venv's packages through a .pth file,
#    so torch and transformers are not downloaded again and .venv is not touched (~1 minute, once);
# 2. two tiny tasks are written as local JSON Lines (no dataset is downloaded: the `json` loader of
#    `datasets` reads them): a multiple-choice task (loglikelihood requests: token ids of context +
#    continuation, echo=true, logprobs=1, max_tokens=1, batched) and a generate-until task
#    (token-id prompts, until "\n", 8 tokens, greedy);
# 3. `vlmrun serve` runs the model on 127.0.0.1 (a free port) and `lm_eval --model local-completions`
#    runs both tasks against it, logging every sample;
# 4. the logged answers are checked: each loglikelihood equals transformers' (the model's own
#    forward over context + continuation, fp32, within 1e-4 per token) with the same is-greedy
#    flag, and each generation equals what vlm's offline engine gives for the same token ids.
#
# Exits 0 when lm-eval ran and every check passed. Works without network once the venv exists
# (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for every step).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
LM_EVAL_VERSION=${LM_EVAL_VERSION:-0.4.13}
VENV=${LM_EVAL_VENV:-$ROOT/.cache/lm-eval-venv}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$VENV/bin/python" -c "import lm_eval, tenacity" 2>/dev/null; then
  echo "== installing lm-eval[api]==$LM_EVAL_VERSION into $VENV (sharing $PYTHON's packages)"
  "$PYTHON" -m venv "$VENV"
  shared=$("$PYTHON" -c "import site; print(site.getsitepackages()[0])")
  own=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
  echo "$shared" >"$own/vlm-shared-packages.pth"
  HF_HUB_OFFLINE=0 "$VENV/bin/python" -m pip install -q "lm-eval[api]==$LM_EVAL_VERSION"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=$WORK/tiny-qwen2
  "$PYTHON" -c "from vlm.testing.checkpoints import write_tiny_text_model as w; w('$MODEL')" >/dev/null 2>&1
fi

LM_EVAL="$VENV/bin/lm_eval" MODEL="$MODEL" WORK="$WORK" "$PYTHON" - <<'EOF'
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlm.testing.server import ServerProcess

model_dir, work, lm_eval = os.environ["MODEL"], Path(os.environ["WORK"]), os.environ["LM_EVAL"]
tasks = work / "tasks"
tasks.mkdir()
choice_docs = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Cats say", "choices": [" woof", " meow"], "answer": 1},
    {"question": "Fire is", "choices": [" hot", " cold"], "answer": 0},
    {"question": "A long context that the model reads before it is asked: the answer is", "choices": [" yes", " no"], "answer": 0},
]
generate_docs = [
    {"question": "Say hi:", "answer": "hi"},
    {"question": "Count: one two", "answer": "three"},
    {"question": "Repeat: abc", "answer": "abc"},
]
for name, docs in (("choice", choice_docs), ("generate", generate_docs)):
    (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
(tasks / "vlm_tiny_choice.yaml").write_text(f"""task: vlm_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "choice.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
(tasks / "vlm_tiny_generate.yaml").write_text(f"""task: vlm_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "generate.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")

server = ServerProcess(model_dir, "--served-model-name", "tiny", "--dtype", "float32", log_path=work / "serve.log")
try:
    model_args = ",".join([
        "model=tiny",
        f"base_url={server.url}/v1/completions",
        "tokenizer_backend=huggingface",
        f"tokenizer={model_dir}",
        "num_concurrent=1",
        "max_retries=1",
        "max_length=512",
    ])
    command = [
        lm_eval, "--model", "local-completions", "--model_args", model_args, "--batch_size", "4",
        "--tasks", "vlm_tiny_choice,vlm_tiny_generate", "--include_path", str(tasks),
        "--output_path", str(work / "out"), "--log_samples",
    ]
    print("== " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=work)
finally:
    server.stop()

tokenizer = AutoTokenizer.from_pretrained(model_dir)
reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
failures = []


def samples(task):
    [path] = glob.glob(str(work / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


checked = 0
for sample in samples("vlm_tiny_choice"):
    for arguments, (logprob, greedy) in zip(sample["arguments"].values(), sample["filtered_resps"]):
        context, continuation = arguments["arg_0"], arguments["arg_1"]
        # lm-eval's _encode_pair: trailing spaces of the context move to the continuation
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            rows = reference(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
        want = sum(float(rows[i - 1, whole[i]]) for i in range(start, len(whole)))
        want_greedy = all(int(rows[i - 1].argmax()) == whole[i] for i in range(start, len(whole)))
        if abs(float(logprob) - want) > 1e-4 * (len(whole) - start) or (greedy == "True") != want_greedy:
            failures.append(f"loglikelihood {context!r} + {continuation!r}: lm-eval {logprob} {greedy}, transformers {want} {want_greedy}")
        checked += 1
print(f"== {checked} loglikelihoods checked against transformers")

from vlm import LLM, SamplingParams  # noqa: E402

llm = LLM(model_dir, dtype="float32")
generated = 0
for sample in samples("vlm_tiny_generate"):
    context = sample["arguments"]["gen_args_0"]["arg_0"]
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    [out] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, stop=["\n"], seed=1234))
    if sample["filtered_resps"][0] != out.outputs[0].text:
        failures.append(f"generation {context!r}: lm-eval {sample['filtered_resps'][0]!r}, vlm {out.outputs[0].text!r}")
    generated += 1
print(f"== {generated} generations checked against vlm's offline engine")
if failures or not checked or not generated:
    print("\n".join(["FAILED:", *failures]), file=sys.stderr)
    sys.exit(1)
print("== lm-eval check passed")
EOF
