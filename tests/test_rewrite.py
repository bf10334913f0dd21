"""vlm.rewrite: function, module and symbolic rewriters per backend, and the engine entering them.

The rewritten targets live in small modules written to a temporary directory (``rw_targets``,
``rw_alias`` that imports a function from it, and modules never imported before a context needs
them), so every test sees the originals it can compare with.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from vlm.rewrite import (
    FUNCTION_REWRITER,
    MODULE_REWRITER,
    SYMBOLIC_REWRITER,
    RewriterContext,
    RewriterError,
    all_records,
    patch_model,
)

TARGETS = """
import torch


def scale(x):
    return x * 2


def offset(x):
    return x + 1


class Box:
    def value(self):
        return 1

    @staticmethod
    def static(x):
        return x + 1

    @classmethod
    def name(cls):
        return cls.__name__


class Block(torch.nn.Module):
    def __init__(self, child=None):
        super().__init__()
        self.child = child

    def forward(self, x):
        return (x if self.child is None else self.child(x)) + 1


class SubBlock(Block):
    pass
"""

ALIAS = """
from rw_targets import scale


def use(x):
    return scale(x)
"""


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewrite-targets")
    (root / "rw_targets.py").write_text(TARGETS)
    (root / "rw_alias.py").write_text(ALIAS)
    (root / "rw_lazy.py").write_text("def triple(x):\n    return x * 3\n")
    (root / "rw_lazy_rewriter.py").write_text(
        "from vlm.rewrite import FUNCTION_REWRITER\n\n\n"
        "def triple_plus_one(x):\n    return FUNCTION_REWRITER.get_context().origin_func(x) + 1\n"
    )
    sys.path.insert(0, str(root))
    targets, alias = importlib.import_module("rw_targets"), importlib.import_module("rw_alias")
    yield targets, alias
    sys.path.remove(str(root))
    for name in ("rw_targets", "rw_alias", "rw_lazy", "rw_lazy_rewriter"):
        sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def forget_new_rewriters():
    """Every test starts and ends with the rewriters registered before it."""
    before = set(all_records())
    yield
    tables = {"function": FUNCTION_REWRITER, "module": MODULE_REWRITER, "symbolic": SYMBOLIC_REWRITER}
    for record in set(all_records()) - before:
        tables[record.kind].remove(record.target, record.backend, record.owner)


def test_function_rewriter_patches_a_module_function_and_its_aliases_and_restores_them(modules):
    targets, alias = modules
    original = targets.scale
    seen = []

    @FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cpu", note="hi")
    def scale_by_ten(x):
        ctx = FUNCTION_REWRITER.get_context()
        seen.append((ctx.origin_func, ctx.cfg, ctx.backend, ctx.target, dict(ctx.extra)))
        return ctx.origin_func(x) * 5

    cfg = {"name": "cfg"}
    with RewriterContext(cfg, backend="cpu"):
        assert targets.scale(3) == 30
        assert alias.use(3) == 30  # `from rw_targets import scale` was patched too
    assert targets.scale is original and alias.scale is original
    assert targets.scale(3) == 6 and alias.use(3) == 6
    assert seen[0] == (original, cfg, "cpu", "rw_targets.scale", {"note": "hi"})


def test_method_staticmethod_classmethod_and_torch_method_rewriters(modules):
    targets, _ = modules
    box_dict = dict(vars(targets.Box))

    @FUNCTION_REWRITER.register_rewriter("rw_targets.Box.value")
    def value(self):
        return FUNCTION_REWRITER.get_context().origin_func(self) + 10

    @FUNCTION_REWRITER.register_rewriter("rw_targets.Box.static")
    def static(x):
        return FUNCTION_REWRITER.get_context().origin_func(x) * 100

    @FUNCTION_REWRITER.register_rewriter("rw_targets.Box.name")
    def name(cls):
        return "rewritten " + FUNCTION_REWRITER.get_context().origin_func(cls)

    @FUNCTION_REWRITER.register_rewriter("torch.Tensor.repeat", backend="cpu")
    def repeat(self, *sizes):
        return FUNCTION_REWRITER.get_context().origin_func(self, *sizes) * -1

    x = torch.tensor([1.0, 2.0])
    with RewriterContext(backend="cpu"):
        assert targets.Box().value() == 11
        assert targets.Box.static(1) == 200 and targets.Box().static(1) == 200
        assert targets.Box.name() == "rewritten Box"
        assert x.repeat(2).tolist() == [-1.0, -2.0, -1.0, -2.0]
    assert targets.Box().value() == 1 and targets.Box.static(1) == 2 and targets.Box.name() == "Box"
    assert x.repeat(2).tolist() == [1.0, 2.0, 1.0, 2.0]
    assert dict(vars(targets.Box)) == box_dict
    assert "repeat" not in vars(torch.Tensor)  # inherited from TensorBase: deleted again, not copied down


def test_torch_function_rewriter():
    original = torch.nn.functional.softsign

    @FUNCTION_REWRITER.register_rewriter("torch.nn.functional.softsign", backend="cpu")
    def softsign(x):
        return FUNCTION_REWRITER.get_context().origin_func(x) + 1

    x = torch.tensor([1.0])
    with RewriterContext(backend="cpu"):
        assert torch.nn.functional.softsign(x).item() == 1.5
    assert torch.nn.functional.softsign is original and original(x).item() == 0.5


def test_the_active_backend_wins_over_default(modules):
    targets, _ = modules

    @FUNCTION_REWRITER.register_rewriter("rw_targets.offset")
    def default(x):
        return "default"

    @FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cuda")
    def cuda(x):
        return "cuda"

    @FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cuda")
    def cuda_only(x):
        return "cuda only"

    with RewriterContext(backend="cuda"):
        assert (targets.offset(1), targets.scale(1)) == ("cuda", "cuda only")
    with RewriterContext(backend="cpu"):
        assert (targets.offset(1), targets.scale(1)) == ("default", 2)
    with RewriterContext(backend="default"):
        assert (targets.offset(1), targets.scale(1)) == ("default", 2)
    assert (targets.offset(1), targets.scale(1)) == (2, 2)


def test_restored_when_the_body_raises(modules):
    targets, alias = modules
    original = targets.scale
    FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cpu")(lambda x: -1)
    with pytest.raises(KeyError, match="boom"):
        with RewriterContext(backend="cpu"):
            assert targets.scale(1) == -1
            raise KeyError("boom")
    assert targets.scale is original and alias.scale is original
    with RewriterContext(backend="cpu"):  # and the next context patches again
        assert alias.use(1) == -1


def test_nested_contexts_for_another_backend_restore_the_outer_ones(modules):
    targets, alias = modules
    original = targets.scale
    origins = []

    @FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cpu")
    def on_cpu(x):
        return ("cpu", FUNCTION_REWRITER.get_context().cfg)

    @FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="onnx")
    def on_onnx(x):
        ctx = FUNCTION_REWRITER.get_context()
        origins.append(ctx.origin_func)
        return ("onnx", ctx.cfg, ctx.origin_func(x))

    with RewriterContext("outer", backend="cpu"):
        assert alias.use(1) == ("cpu", "outer")
        with RewriterContext("inner", backend="onnx"):
            assert alias.use(1) == ("onnx", "inner", 2)  # the inner origin is the original, not the outer rewrite
            with RewriterContext("innermost", backend="cpu"):
                assert targets.scale(1) == ("cpu", "innermost")
            assert targets.scale(1) == ("onnx", "inner", 2)
        assert targets.scale(1) == ("cpu", "outer") and alias.use(1) == ("cpu", "outer")
    assert targets.scale is original and alias.scale is original and origins[0] is original


def test_a_conflict_names_both_owners_and_priority_resolves_it(modules):
    targets, _ = modules
    FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cpu", owner="plugin_a")(lambda x: "a")
    FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cpu", owner="plugin_b")(lambda x: "b")
    with pytest.raises(RewriterError) as error:
        RewriterContext(backend="cpu").__enter__()
    message = str(error.value)
    assert "\n" not in message and "plugin_a" in message and "plugin_b" in message
    assert "'rw_targets.offset' for backend 'cpu' at priority 0" in message and "priority=" in message
    assert targets.offset(1) == 2  # nothing was left patched

    FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cpu", owner="plugin_c", priority=5)(lambda x: "c")
    with RewriterContext(backend="cpu"):
        assert targets.offset(1) == "c"
    with RewriterContext(backend="cuda"):  # the conflict is on cpu only
        assert targets.offset(1) == 2


def test_one_owner_cannot_register_two_rewriters_of_one_target_but_may_register_one_again(modules):
    def first(x):
        return 1

    def second(x):
        return 2

    FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cpu")(first)
    FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cpu")(first)  # a module imported twice
    with pytest.raises(RewriterError, match=r"registers two function rewriters for 'rw_targets.offset'.*first.*second"):
        FUNCTION_REWRITER.register_rewriter("rw_targets.offset", backend="cpu")(second)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(func_name="scale"), r"target 'scale' is not a dotted name"),
        (dict(func_name="rw_targets.scale", backend="CUDA!"), r"backend='CUDA!' is not a backend name"),
        (dict(func_name="rw_targets.scale", priority="high"), r"priority='high' must be an integer"),
        (dict(func_name="rw_targets.scale", location="rw_lazy.triple"), r"is not of the form 'package.module:attr'"),
    ],
)
def test_bad_registrations_are_one_line_errors(kwargs, match):
    with pytest.raises(RewriterError, match=match):
        FUNCTION_REWRITER.register_rewriter(**kwargs)(lambda x: x)


def test_registration_is_lazy_and_bad_targets_are_named_when_a_context_needs_them(modules):
    FUNCTION_REWRITER.register_rewriter("rw_lazy.triple", backend="cpu", location="rw_lazy_rewriter:triple_plus_one")
    FUNCTION_REWRITER.register_rewriter("package_that_is_not_installed.func", backend="cpu")(lambda: None)
    assert "rw_lazy" not in sys.modules and "rw_lazy_rewriter" not in sys.modules
    with RewriterContext(backend="cpu"):  # the uninstalled package is skipped
        assert sys.modules["rw_lazy"].triple(2) == 7
    assert sys.modules["rw_lazy"].triple(2) == 6

    FUNCTION_REWRITER.register_rewriter("rw_targets.scael", backend="cpu", owner="my_plugin")(lambda x: x)
    with pytest.raises(RewriterError) as error:
        RewriterContext(backend="cpu").__enter__()
    assert str(error.value).endswith(
        ":test_registration_is_lazy_and_bad_targets_are_named_when_a_context_needs_them.<locals>.<lambda> "
        "(registered by my_plugin) targets 'rw_targets.scael', which cannot be found: "
        "module 'rw_targets' has no attribute 'scael'; fix the dotted name it is registered for"
    )
    assert str(error.value).startswith("function rewriter ")


def test_wrappers_that_escape_the_context_and_other_threads_run_the_original(modules):
    targets, _ = modules
    FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cpu")(lambda x: "rewritten")
    from_thread = []
    with RewriterContext(backend="cpu"):
        escaped = targets.scale  # e.g. stored on a model by code run inside the context
        assert escaped(1) == "rewritten"
        thread = threading.Thread(target=lambda: from_thread.append(targets.scale(1)))
        thread.start()
        thread.join()
    assert from_thread == [2]  # a thread outside every context never runs a rewriter
    assert escaped(1) == 2


def test_contexts_in_two_threads_take_turns_and_see_their_own_cfg(modules):
    targets, _ = modules
    FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cpu")(
        lambda x: FUNCTION_REWRITER.get_context().cfg
    )
    first_inside, release_first = threading.Event(), threading.Event()
    results = {}

    def engine_a():
        with RewriterContext("engine a", backend="cpu"):
            first_inside.set()
            release_first.wait(30)
            results["a"] = targets.scale(1)

    def engine_b():
        first_inside.wait(30)
        with RewriterContext("engine b", backend="cpu"):
            results["b"] = targets.scale(1)
            results["b saw a finished"] = "a" in results

    threads = [threading.Thread(target=engine_a), threading.Thread(target=engine_b)]
    for thread in threads:
        thread.start()
    first_inside.wait(30)
    release_first.set()
    for thread in threads:
        thread.join(60)
    assert results == {"a": "engine a", "b": "engine b", "b saw a finished": True}
    assert targets.scale(1) == 2


def test_get_context_outside_a_rewriter_is_an_error():
    with pytest.raises(RewriterError, match="outside a function rewriter"):
        FUNCTION_REWRITER.get_context()


def test_entering_a_context_with_nothing_registered_for_its_backend_patches_nothing(modules):
    targets, _ = modules
    FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="cuda")(lambda x: "cuda")
    context = RewriterContext(backend="cpu")
    with context:
        assert targets.scale(1) == 2
    assert FUNCTION_REWRITER.plan("cpu") == ()


# -- module rewriters -----------------------------------------------------------------------------


def test_patch_model_replaces_every_instance_of_the_class_for_the_backend(modules):
    targets, _ = modules
    built = []

    @MODULE_REWRITER.register_rewrite_module("rw_targets.Block", backend="cpu", factor=10)
    class TimesBlock(torch.nn.Module):
        def __init__(self, module, cfg, backend, factor, **kwargs):
            super().__init__()
            self.module = module
            self.factor = factor
            built.append((cfg, backend, kwargs))

        def forward(self, x):
            return self.module(x) * self.factor

    @MODULE_REWRITER.register_rewrite_module("rw_targets.Block")
    class NegatedBlock(torch.nn.Module):
        def __init__(self, module, cfg, **kwargs):
            super().__init__()
            self.module = module

        def forward(self, x):
            return -self.module(x)

    def model():
        inner = targets.Block()
        return torch.nn.Sequential(targets.Block(inner), targets.SubBlock())

    x = torch.zeros(1)
    assert model()(x).item() == 3  # each block adds 1
    patched = patch_model(model(), "the cfg", backend="cpu", extra_arg=1)
    # inner: (0 + 1) * 10 = 10; outer: (10 + 1) * 10 = 110; the SubBlock is another class: + 1
    assert patched(x).item() == 111
    assert isinstance(patched[0], TimesBlock) and isinstance(patched[0].module.child, TimesBlock)
    assert type(patched[1]) is targets.SubBlock
    assert built == [("the cfg", "cpu", {"extra_arg": 1})] * 2
    assert patch_model(model(), backend="cuda")(x).item() == 1  # the default one: inner -1, outer -0, then + 1
    root = patch_model(targets.Block(), backend="cpu")  # the model itself may be replaced
    assert isinstance(root, TimesBlock)


def test_patch_model_names_a_wrapper_that_fails(modules):
    targets, _ = modules

    @MODULE_REWRITER.register_rewrite_module("rw_targets.Block", backend="cpu", owner="my_plugin")
    class Broken(torch.nn.Module):
        def __init__(self, module, cfg, **kwargs):
            raise ValueError("no such weight")

    with pytest.raises(RewriterError, match=r"Broken \(registered by my_plugin\) failed to wrap a rw_targets.Block"):
        patch_model(targets.Block(), backend="cpu")


# -- symbolic rewriters ---------------------------------------------------------------------------


def test_translation_table_keys_ops_by_overload_with_default_fallback():
    def relu_translation(x):
        return x

    def gelu_default(x, approximate="none"):
        return x

    def gelu_onnx(x, approximate="none"):
        return x

    SYMBOLIC_REWRITER.register_symbolic("aten::relu")(relu_translation)
    SYMBOLIC_REWRITER.register_symbolic("torch.ops.aten.gelu.default", backend="default")(gelu_default)
    SYMBOLIC_REWRITER.register_symbolic("torch.ops.aten.gelu.default")(gelu_onnx)
    SYMBOLIC_REWRITER.register_symbolic("aten::upsample_bicubic2d.vec", backend="tensorrt")(relu_translation)
    SYMBOLIC_REWRITER.register_symbolic("torch.nn.functional.softsign", backend="tensorrt")(relu_translation)
    assert SYMBOLIC_REWRITER.translation_table(backend="onnx") == {
        torch.ops.aten.relu.default: relu_translation,
        torch.ops.aten.gelu.default: gelu_onnx,
    }
    assert SYMBOLIC_REWRITER.translation_table(backend="tensorrt") == {
        torch.ops.aten.gelu.default: gelu_default,
        torch.ops.aten.upsample_bicubic2d.vec: relu_translation,
        torch.nn.functional.softsign: relu_translation,
    }
    SYMBOLIC_REWRITER.register_symbolic("aten::relu", owner="another_plugin")(gelu_onnx)
    with pytest.raises(RewriterError, match="another_plugin.*both rewrite 'aten::relu' for backend 'onnx'"):
        SYMBOLIC_REWRITER.translation_table(backend="onnx")
    SYMBOLIC_REWRITER.register_symbolic("nosuchlib::op", backend="x")(gelu_onnx)
    with pytest.raises(RewriterError, match="'nosuchlib::op', which is not a registered torch op"):
        SYMBOLIC_REWRITER.translation_table(backend="x")


def test_onnx_export_uses_the_symbolic_and_function_rewriters(modules, tmp_path):
    """A real ``torch.onnx.export(dynamo=True)``: relu is translated as its negation (so the file
    shows whose translation ran) and ``rw_targets.scale`` is rewritten for the "onnx" backend."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    targets, _ = modules

    @SYMBOLIC_REWRITER.register_symbolic("aten::relu")
    def relu_as_negation(x):
        from onnxscript import opset18 as op

        return op.Neg(x)

    @FUNCTION_REWRITER.register_rewriter("rw_targets.scale", backend="onnx")
    def scale_by_three(x):
        return x * 3

    class Tower(torch.nn.Module):
        def forward(self, x):
            return torch.relu(targets.scale(x))

    x = torch.tensor([[-1.0, 2.0, 3.0]])
    path = tmp_path / "tower.onnx"
    with RewriterContext(None, backend="onnx"):
        program = torch.onnx.export(
            Tower().eval(),
            (x,),
            dynamo=True,
            custom_translation_table=SYMBOLIC_REWRITER.translation_table(backend="onnx"),
            verbose=False,
        )
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert out.tolist() == [[3.0, -6.0, -9.0]]
    assert targets.scale(x).tolist() == [[-2.0, 4.0, 6.0]]


# -- the engine ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doubled_norms(tiny_models, tmp_path_factory):
    """The tiny qwen2 checkpoint, and a copy whose RMSNorm weights are doubled."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_models("qwen2")
    copy = tmp_path_factory.mktemp("doubled") / "qwen2"
    shutil.copytree(source, copy)
    weights = load_file(str(copy / "model.safetensors"))
    doubled = {name: t * 2 if name.endswith("norm.weight") else t for name, t in weights.items()}
    assert sum(name.endswith("norm.weight") for name in weights) == 5  # 2 layers x 2 + the final norm
    save_file(doubled, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return source, str(copy)


PROMPTS = ["Hello", "The quick brown fox"]


def _generate(llm):
    from vlm import SamplingParams
    from vlm.engine.model_runner import ModelRunner

    captured = []
    original = ModelRunner.execute

    def execute(self, step):
        logits, seqs = original(self, step)
        if logits is not None:
            captured.append(logits.clone())
        return logits, seqs

    ModelRunner.execute = execute
    try:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finally:
        ModelRunner.execute = original
    return [o.outputs[0].token_ids for o in outputs], torch.cat(captured)


def test_the_engine_steps_inside_the_context_of_its_device(doubled_norms):
    """A cpu rewriter of vlm.kernels' norms that doubles the weight gives the tokens and logits of
    a checkpoint with doubled norm weights; the kernels are the originals outside the steps."""
    from vlm import LLM, kernels

    source, doubled = doubled_norms
    originals = (kernels.rms_norm, kernels.fused_add_rms_norm)
    # one engine before, with and after the rewriters: its prefix cache must not hand one run's KV to the next
    llm = LLM(source, num_threads=1, enable_prefix_caching=False)
    base_tokens, base_logits = _generate(llm)
    expected_tokens, expected_logits = _generate(LLM(doubled, num_threads=1))

    @FUNCTION_REWRITER.register_rewriter("vlm.kernels.rms_norm", backend="cpu")
    def rms_norm(x, weight, eps):
        return FUNCTION_REWRITER.get_context().origin_func(x, weight * 2, eps)

    @FUNCTION_REWRITER.register_rewriter("vlm.kernels.fused_add_rms_norm", backend="cpu")
    def fused_add_rms_norm(x, residual, weight, eps):
        return FUNCTION_REWRITER.get_context().origin_func(x, residual, weight * 2, eps)

    @FUNCTION_REWRITER.register_rewriter("vlm.kernels.rms_norm", backend="cuda")
    def not_on_this_device(x, weight, eps):
        raise AssertionError("the cuda rewriter ran on cpu")

    tokens, logits = _generate(llm)  # the same engine: rewriters registered later apply from the next step
    assert tokens == expected_tokens and tokens != base_tokens
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    assert (logits - base_logits).abs().max() > 0.1
    assert (kernels.rms_norm, kernels.fused_add_rms_norm) == originals

    FUNCTION_REWRITER.remove("vlm.kernels.rms_norm", "cpu")
    FUNCTION_REWRITER.remove("vlm.kernels.fused_add_rms_norm", "cpu")
    assert _generate(llm)[0] == base_tokens


def test_the_engine_patches_the_model_it_loads_with_the_module_rewriters_of_its_device(doubled_norms):
    from vlm import LLM
    from vlm.nn.norm import RMSNorm

    source, doubled = doubled_norms

    @MODULE_REWRITER.register_rewrite_module("vlm.nn.norm.RMSNorm", backend="cpu")
    class DoubledNorm(torch.nn.Module):
        def __init__(self, module, cfg, **kwargs):
            super().__init__()
            assert cfg.model == source  # the engine's EngineConfig
            module.weight.data.mul_(2)
            self.norm = module

        def forward(self, *args):
            return self.norm(*args)

    llm = LLM(source, num_threads=1)
    assert isinstance(llm.engine.model.model.norm, DoubledNorm)
    assert isinstance(llm.engine.model.model.norm.norm, RMSNorm)
    tokens, logits = _generate(llm)
    MODULE_REWRITER.remove("vlm.nn.norm.RMSNorm", "cpu")
    expected_tokens, expected_logits = _generate(LLM(doubled, num_threads=1))
    assert tokens == expected_tokens
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


# -- listing ---------------------------------------------------------------------------------------

PLUGIN_FILE = '''
"""A plugin file that ships rewriters and nothing else; importing it must not import torch."""
from vlm.rewrite import FUNCTION_REWRITER, MODULE_REWRITER


@FUNCTION_REWRITER.register_rewriter("vlm.kernels.rms_norm", backend="cpu", priority=3)
def rms_norm(x, weight, eps):
    return FUNCTION_REWRITER.get_context().origin_func(x, weight, eps)


MODULE_REWRITER.register_rewrite_module("vlm.nn.norm.RMSNorm", backend="cuda", location="my_rewrites.norms:FastNorm")
'''


def test_vlmrun_plugins_rewriters_lists_a_plugin_files_rewriters_without_torch(tmp_path):
    path = tmp_path / "rewriting.py"
    path.write_text(PLUGIN_FILE)
    code = (
        "import sys\n"
        "from vlm.cli.main import main\n"
        "status = main(sys.argv[1:])\n"
        "assert 'torch' not in sys.modules, 'listing imported torch'\n"
        "sys.exit(status)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "VLM_LOAD_PLUGINS": ""}
    base = [sys.executable, "-c", code, "plugins", "--rewriters", "--plugin-file", str(path)]
    as_json = subprocess.run([*base, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    # the core's own (the ONNX export's, lazily registered) are listed beside the plugin's
    assert {row["target"] for row in listed if row["owner"] == "vlm.export"} == {
        "vlm.nn.linear.PackableLinear.prepare_for_inference",
        "vlm.nn.rotary.RotaryEmbedding.cos_sin",
    }
    assert [row for row in listed if row["owner"] != "vlm.export"] == [
        {
            "kind": "function",
            "target": "vlm.kernels.rms_norm",
            "backend": "cpu",
            "owner": "vlm_plugin_file_rewriting",
            "priority": 3,
            "location": "vlm_plugin_file_rewriting:rms_norm",
            "plugin": "rewriting",
        },
        {
            "kind": "module",
            "target": "vlm.nn.norm.RMSNorm",
            "backend": "cuda",
            "owner": "vlm_plugin_file_rewriting",
            "priority": 0,
            "location": "my_rewrites.norms:FastNorm",
            "plugin": "rewriting",
        },
    ]
    text = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert text.returncode == 0, text.stderr
    plugin_lines = [" ".join(line.split()) for line in text.stdout.splitlines() if "vlm.export" not in line]
    assert plugin_lines == [
        "function vlm.kernels.rms_norm cpu 3 owner vlm_plugin_file_rewriting (plugin rewriting) "
        "vlm_plugin_file_rewriting:rms_norm",
        "module vlm.nn.norm.RMSNorm cuda 0 owner vlm_plugin_file_rewriting (plugin rewriting) "
        "my_rewrites.norms:FastNorm",
    ]
    components = subprocess.run(
        [sys.executable, "-c", code, "plugins", "--components", "--json", "--plugin-file", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    rows = {(r["registry"], r["scope"], r["name"]): r["location"] for r in json.loads(components.stdout)}
    assert rows[("module_rewriter", "vlm_plugin_file_rewriting", "vlm.nn.norm.RMSNorm@cuda")] == (
        "my_rewrites.norms:FastNorm"
    )
