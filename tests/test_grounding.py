"""Grounding in the core: the box type and its conversions, drawing, the engine calling the chosen
plugin's ``parse_grounding`` hook (and only that plugin's), and ``vlmrun --draw-boxes`` in one-shot
and chat mode with a stand-in engine. Each family's formats are tested in its plugin
(``plugins/qwen2_vl/tests/test_grounding.py``, ``plugins/internvl/tests/test_grounding.py``)."""

from __future__ import annotations

import io
import logging
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vlm.grounding import COLORS, NORMALIZED_1000, GroundedBox, draw_boxes, from_normalized, from_resized
from vlm.hookspecs import Claim, hookimpl
from vlm.inputs import ImageInput, ModelInputs
from vlm.outputs import CompletionOutput, RequestOutput
from vlm.plugin.manager import get_registry, grounding_parser, reset_registry
from vlm.testing.checkpoints import build_byte_tokenizer

RED = Image.new("RGB", (1, 1), COLORS[0]).getpixel((0, 0))  # the first box's outline
GRAY = (120, 120, 120)


@pytest.fixture
def fresh_registry():
    """Plugins registered as modules by a test are forgotten after it."""
    reset_registry()
    yield get_registry()
    reset_registry()


def outline(path_or_image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the pixels that differ from the gray picture."""
    drawn = np.asarray(Image.open(path_or_image) if isinstance(path_or_image, str) else path_or_image)
    changed = np.argwhere((drawn != GRAY).any(-1))
    (top, left), (bottom, right) = changed.min(0), changed.max(0)
    return int(left), int(top), int(right), int(bottom)


def assert_outlined(path: str, box: tuple[int, int, int, int]) -> None:
    """The picture at ``path`` has ``box`` outlined in the first box colour: every edge is red at
    its middle, and nothing outside the box changed."""
    drawn = np.asarray(Image.open(path).convert("RGB"))
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    for x, y in ((left, mid_y), (right, mid_y), (mid_x, top), (mid_x, bottom)):
        assert tuple(drawn[y, x]) == RED, f"no outline at ({x}, {y})"
    assert outline(path) == box


# -- the box type and its conversions --------------------------------------------------------


def test_conversions_to_pixels_of_the_original_picture():
    assert from_normalized("a", (100, 250, 500, 1000), (640, 480)) == GroundedBox("a", (64.0, 120.0, 320.0, 480.0))
    assert from_normalized(None, (0, 0, 999, 999), (1000, 1000), scale=999).box == (0.0, 0.0, 1000.0, 1000.0)
    # a box in pixels of the 560x280 picture the model saw, on the 1000x500 original
    assert from_resized("b", (28, 56, 280, 112), (560, 280), (1000, 500)).box == pytest.approx((50, 100, 500, 200))
    assert from_resized("b", (1, 2, 3, 4), (10, 10), (10, 10)).space == "pixels"


def test_to_image_maps_normalized_boxes_and_keeps_pixel_boxes():
    normalized = GroundedBox("a", (100, 250, 500, 1000), NORMALIZED_1000)
    assert normalized.to_image((640, 480)) == pytest.approx((64, 120, 320, 480))
    assert GroundedBox("b", (28, 56, 280, 112)).to_image((1000, 500)) == (28, 56, 280, 112)


def test_draw_boxes_outlines_exactly_the_box_in_its_colour():
    image = Image.new("RGB", (200, 100), GRAY)
    boxes = [GroundedBox(None, (20, 20, 100, 80)), GroundedBox("b", (150, 10, 190, 30))]
    drawn = np.asarray(draw_boxes(image, boxes))
    assert (np.asarray(image) == GRAY).all(), "the input image is left untouched"
    assert outline(drawn[:, :120]) == (20, 20, 100, 80)
    assert tuple(drawn[50, 20]) == RED and tuple(drawn[50, 100]) == RED and tuple(drawn[50, 60]) == GRAY
    second = Image.new("RGB", (1, 1), COLORS[1]).getpixel((0, 0))
    assert tuple(drawn[20, 150]) == second and tuple(drawn[10, 170]) == second


# -- the engine calls the chosen plugin's hook ---------------------------------------------


def seq_with(tokenizer, text: str, images: list[ImageInput]) -> SimpleNamespace:
    ids = tokenizer.encode(text)
    inputs = ModelInputs(token_ids=[1], images=images)
    return SimpleNamespace(request_id="r", output_token_ids=ids, inputs=inputs, text="")


def image_input(**extra) -> ImageInput:
    return ImageInput(pixel_values=None, num_tokens=1, key="k", extra=extra)


def test_output_processor_hands_the_parser_the_text_with_special_tokens_and_the_picture_sizes(caplog):
    from vlm.engine.output_processor import OutputProcessor
    from vlm.errors import PluginError

    tokenizer = build_byte_tokenizer(["<|box_start|>", "<|box_end|>"])
    calls = []
    box = GroundedBox("x", (1.0, 2.0, 3.0, 4.0))

    def parse(text, image_sizes, model_inputs):
        calls.append((text, image_sizes, model_inputs))
        return [box]

    outputs = OutputProcessor(tokenizer, eos_token_ids=set(), max_model_len=64, parse_grounding=parse)
    seq = seq_with(tokenizer, "a <|box_start|>(1,2),(3,4)<|box_end|>", [image_input(image_size=(640, 480))])
    assert outputs._grounded_boxes(seq) == [box]
    assert calls == [("a <|box_start|>(1,2),(3,4)<|box_end|>", [(640, 480)], seq.inputs)]

    # a preprocessor that does not record the picture's size: no boxes, one warning
    no_size = seq_with(tokenizer, "a", [image_input()])
    with caplog.at_level(logging.WARNING, logger="vlm"):
        assert outputs._grounded_boxes(no_size) == [] and outputs._grounded_boxes(no_size) == []
    assert sum("extra['image_size']" in r.message for r in caplog.records) == 1 and len(calls) == 1

    # a parser that fails costs the boxes, not the answer
    def broken(text, image_sizes, model_inputs):
        raise PluginError("plugin 'p' failed in its parse_grounding hook (ValueError: bad)")

    with caplog.at_level(logging.WARNING, logger="vlm"):
        assert OutputProcessor(tokenizer, set(), 64, parse_grounding=broken)._grounded_boxes(seq) == []
    assert "ValueError: bad" in caplog.records[-1].getMessage()
    assert OutputProcessor(tokenizer, set(), 64)._grounded_boxes(seq) == []  # a family without the hook


def qwen2_plugin(name: str, priority: int, parse=None, api: str = ">=1.2,<2") -> ModuleType:
    """A plugin serving the tiny Qwen2 with the llama plugin's model at ``priority`` (``None``:
    it claims nothing), with ``parse`` as its parse_grounding hook."""
    module = ModuleType(name)
    module.vlm_api_version = api

    def match(hf_config):
        if priority is not None and "Qwen2ForCausalLM" in (getattr(hf_config, "architectures", None) or []):
            return Claim(priority=priority, reason="test")
        return None

    def build_preprocessor(tokenizer):
        from vlm.inputs import TextPreprocessor

        return TextPreprocessor(tokenizer)

    def build_model(hf_config, dtype, device):
        from vlm_plugin_llama.model import LlamaForCausalLM

        return LlamaForCausalLM(hf_config, dtype=dtype, device=device)

    hooks = dict(architectures=lambda: ["Qwen2ForCausalLM"], match=match)
    hooks.update(build_preprocessor=build_preprocessor, build_model=build_model)
    if parse is not None:
        hooks["parse_grounding"] = parse
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module


def test_hook_parse_grounding(tiny_qwen2, fresh_registry):
    """The engine calls parse_grounding on the plugin serving the model, and on no other plugin,
    once per finished request, with the answer decoded with special tokens kept; what it returns
    is ``CompletionOutput.boxes``. A family without the hook gives no boxes."""
    from vlm import LLM, SamplingParams

    chosen_calls, other_calls = [], []
    box = GroundedBox("thing", (1.0, 2.0, 3.0, 4.0))

    def chosen(text, image_sizes, hf_config, model_inputs):
        chosen_calls.append((text, image_sizes, hf_config.architectures, model_inputs.token_ids))
        return [box]

    def other(text):
        other_calls.append(text)
        return [GroundedBox("wrong plugin", (0.0, 0.0, 1.0, 1.0))]

    fresh_registry.register_module(qwen2_plugin("vlmtest_grounded", 10, chosen))
    fresh_registry.register_module(qwen2_plugin("vlmtest_bystander", None, other))  # claims nothing
    llm = LLM(tiny_qwen2)
    assert llm.engine.plugin == "vlmtest_grounded"
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    result = llm.generate(["hello", "a b c"], params)
    assert [r.outputs[0].boxes for r in result] == [[box], [box]]
    assert other_calls == []
    texts = [llm.tokenizer.decode(r.outputs[0].token_ids, skip_special_tokens=False) for r in result]
    prompts = [r.prompt_token_ids for r in result]
    assert sorted(chosen_calls) == sorted((t, [], ["Qwen2ForCausalLM"], p) for t, p in zip(texts, prompts))

    # the hook returns what is not a list of boxes: a one-line PluginError naming the plugin
    fresh_registry.register_module(qwen2_plugin("vlmtest_bad_boxes", None, lambda text: [(1, 2, 3, 4)]))
    from vlm.errors import PluginError

    parse = grounding_parser("vlmtest_bad_boxes", None)
    assert parse is not None
    with pytest.raises(
        PluginError, match=r"plugin 'vlmtest_bad_boxes' returned \[\(1, 2, 3, 4\)\] from parse_grounding"
    ):
        parse("x", [], ModelInputs(token_ids=[1]))

    # the llama plugin (no hook) serves the same model: no boxes, no error; a 1.0 plugin loads
    assert grounding_parser("llama", None) is None
    assert fresh_registry.register_module(qwen2_plugin("vlmtest_old", None, api=">=1.0,<2")).error is None


# -- vlmrun --draw-boxes with a stand-in engine ----------------------------------------------


class FakeEngine:
    """Answers every request with ``boxes``; remembers the prompts."""

    def __init__(self, boxes):
        self.boxes = boxes
        self.prompts = []

    def default_sampling_values(self):
        return {}

    def preprocess(self, prompt):
        return prompt

    def stream(self, prompt, params):
        self.prompts.append(prompt)
        boxes = self.boxes[min(len(self.prompts), len(self.boxes)) - 1]
        done = CompletionOutput(0, "a thing", [1], "stop", delta="a thing", boxes=boxes)
        yield RequestOutput("r", None, [], [done], finished=True)


@pytest.fixture
def fake_llm(monkeypatch):
    """``install(boxes_per_answer)`` makes vlmrun load a stand-in for the model."""
    import vlm.llm

    made = []

    def install(*boxes_per_answer):
        class FakeLLM:
            def __init__(self, model, **kwargs):
                self.engine, self.tokenizer = FakeEngine(list(boxes_per_answer)), SimpleNamespace(chat_template="x")
                made.append(self)

        monkeypatch.setattr(vlm.llm, "LLM", FakeLLM)
        return made

    return install


def gray_picture(path, size=(200, 100)) -> str:
    Image.new("RGB", size, GRAY).save(path)
    return str(path)


def test_vlmrun_draw_boxes_one_shot(tmp_path, fake_llm, capsys):
    from vlm.cli.main import main

    made = fake_llm([GroundedBox("thing", (20.0, 10.0, 180.0, 90.0))])
    out = tmp_path / "boxes.png"
    first, last = gray_picture(tmp_path / "a.png", (50, 50)), gray_picture(tmp_path / "b.png")
    argv = ["--model", str(tmp_path), "--image", first, "--image", last, "--prompt", "find it"]
    assert main([*argv, "--draw-boxes", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == "a thing\n"
    assert captured.err.splitlines() == ["box: thing (20, 10, 180, 90)", f"saved {out} with 1 box(es)"]
    assert_outlined(str(out), (20, 10, 180, 90))  # drawn on the last picture, the one asked about
    assert [part["type"] for part in made[0].engine.prompts[0][-1]["content"]] == ["image", "image", "text"]


def test_vlmrun_draw_boxes_refuses_bad_flags_before_loading(tmp_path, fake_llm):
    from vlm.cli.main import main

    made = fake_llm([])
    with pytest.raises(SystemExit, match="--draw-boxes with --prompt needs --image"):
        main(["--model", str(tmp_path), "--prompt", "x", "--draw-boxes", str(tmp_path / "o.png")])
    with pytest.raises(SystemExit, match=r"--draw-boxes .*boxes\.txt: name a picture file, e\.g\. boxes\.png"):
        main(["--model", str(tmp_path), "--draw-boxes", str(tmp_path / "boxes.txt")])
    assert made == []


def test_vlmrun_draw_boxes_in_a_chat_saves_each_answer(tmp_path, fake_llm, monkeypatch, capsys):
    """Each answer is saved as OUT-n.png on the conversation's latest picture, its name printed;
    an answer before any picture saves nothing; /clear forgets the picture, not the count."""
    from vlm.cli.main import main

    fake_llm(
        [],
        [GroundedBox("a", (10.0, 10.0, 100.0, 50.0))],
        [GroundedBox("b", (5.0, 20.0, 40.0, 90.0)), GroundedBox("c", (0.0, 0.0, 10.0, 10.0))],
        [],
    )
    wide, tall = gray_picture(tmp_path / "wide.png"), gray_picture(tmp_path / "tall.png", (50, 100))
    lines = ["hello", f"/image {wide}", "where?", "and now?", f"/image {tall}", "here?", "/clear", "text"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out = tmp_path / "turn.png"
    assert main(["--model", str(tmp_path), "--draw-boxes", str(out)]) == 0
    err = capsys.readouterr().err
    saved = [line for line in err.splitlines() if line.startswith(("saved", "(no picture"))]
    assert saved == [
        "(no picture in this conversation yet: no boxes to draw)",
        f"saved {tmp_path / 'turn-2.png'} with 1 box(es)",
        f"saved {tmp_path / 'turn-3.png'} with 2 box(es)",
        f"saved {tmp_path / 'turn-4.png'} with 0 box(es)",
        "(no picture in this conversation yet: no boxes to draw)",
    ]
    assert_outlined(str(tmp_path / "turn-2.png"), (10, 10, 100, 50))
    assert Image.open(tmp_path / "turn-3.png").size == (200, 100)  # still the wide picture
    assert Image.open(tmp_path / "turn-4.png").size == (50, 100)  # the tall one, now the latest
    assert not (tmp_path / "turn-1.png").exists() and not (tmp_path / "turn-5.png").exists()
