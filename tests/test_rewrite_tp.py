"""A rewriter shipped by a ``--plugin-file`` plugin reaches spawned tensor-parallel workers.

The plugin file doubles the weight of every RMSNorm through cpu function rewriters of
``vlm.kernels``, and each process that runs the rewriter leaves a file named after its pid. Under
``--tp 2`` the worker computes half of every sharded layer: had it not run the rewriter, its
partial sums would disagree with rank 0's and the answer would differ from ``--tp 1``'s.
"""

from __future__ import annotations

import os
import subprocess
import sys

PLUGIN_FILE = """
import os

from vlm.rewrite import FUNCTION_REWRITER


def _mark():
    open(os.path.join(os.environ["REWRITE_MARKS"], str(os.getpid())), "w").close()


@FUNCTION_REWRITER.register_rewriter("vlm.kernels.rms_norm", backend="cpu")
def doubled_rms_norm(x, weight, eps):
    _mark()
    return FUNCTION_REWRITER.get_context().origin_func(x, weight * 2, eps)


@FUNCTION_REWRITER.register_rewriter("vlm.kernels.fused_add_rms_norm", backend="cpu")
def doubled_fused_add_rms_norm(x, residual, weight, eps):
    _mark()
    return FUNCTION_REWRITER.get_context().origin_func(x, residual, weight * 2, eps)
"""


def test_a_plugin_files_rewriter_runs_in_the_spawned_workers(tiny_models, tmp_path):
    model_dir = tiny_models("qwen2")
    plugin = tmp_path / "doubled_norms.py"
    plugin.write_text(PLUGIN_FILE)
    command = [sys.executable, "-m", "vlm.cli.main", "--model", model_dir, "--prompt", "Hello"]
    command += ["--temperature", "0", "--max-tokens", "12"]

    def run(name: str, *flags: str) -> tuple[str, set[str]]:
        marks = tmp_path / name
        marks.mkdir()
        env = {**os.environ, "REWRITE_MARKS": str(marks), "VLM_LOAD_PLUGINS": "llama"}
        result = subprocess.run([*command, *flags], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip()
        return result.stdout, {path.name for path in marks.iterdir()}

    plain, plain_marks = run("plain")
    rewritten, rewritten_marks = run("tp1", "--plugin-file", str(plugin))
    sharded, sharded_marks = run("tp2", "--plugin-file", str(plugin), "--tp", "2")
    assert not plain_marks and len(rewritten_marks) == 1
    assert rewritten != plain  # the rewrite changes the answer ...
    assert len(sharded_marks) == 2  # ... runs in rank 0 and in the spawned worker ...
    assert sharded == rewritten  # ... and both ranks agree with one process
