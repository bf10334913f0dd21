"""Video input for Qwen2-VL / Qwen2.5-VL against transformers.

Preprocessing: for a list of frames (an odd count, resized), a video file decoded with PyAV and
sampled at 2 fps, a video next to a picture under a total-pixel cap, and a video under a part's
``max_pixels``, vlm's token ids, ``pixel_values_videos`` (atol 1e-6), ``video_grid_thw``, sampled
frames and Qwen2.5-VL's ``second_per_grid_ts`` equal transformers' ``Qwen2VLProcessor`` /
``Qwen2_5_VLProcessor`` with ``Qwen2VLVideoProcessor`` given the same rendered prompt. That video
processor needs torchvision, which is not installed: it runs in a subprocess with a stand-in for
torchvision's three tensor kernels (``video_reference.py`` says how); all else is transformers'
own code. M-RoPE positions and ``position_delta`` equal the reference model's
``get_rope_index``.

Generation: greedy tokens over 16 new tokens and every step's logits (within 1e-4) equal
transformers' ``generate`` with ``pixel_values_videos`` / ``video_grid_thw`` (and
``second_per_grid_ts``), for video requests alone and batched with a picture request.

Then the one-line refusals (a model that reads no video, a video over the context, a file PyAV
cannot decode, no decoder installed), and a video given as frames through ``vlmrun serve`` and
the ``openai`` client. Tests that decode files need PyAV (``pip install av``) and skip without it.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import LLM, SamplingParams
from vlm.errors import InputError
from vlm.testing.logits import generate_with_logits
from vlm_plugin_qwen2vl.testing import FLAVORS, ReferenceModel, write_tiny_qwen2_vl

sys.path.insert(0, str(Path(__file__).parent))
from video_reference import reference_video_inputs  # noqa: E402

NEW_TOKENS = 16
ENGINE_ARGS = dict(device="cpu", dtype="float32")
#: a part's total_pixels equal to transformers' cap at max_video_tokens=20 (90% of 20 tokens' pixels)
CAP_TOKENS = 20
CAP_TOTAL_PIXELS = int(CAP_TOKENS * 28 * 28 * 0.9)


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def frames(count: int, width: int, height: int, seed: int) -> list[Image.Image]:
    return [noise(width, height, seed * 100 + i) for i in range(count)]


def write_clip(path: Path, count: int = 23, fps: int = 10, size: tuple[int, int] = (90, 50)) -> Path:
    """An MPEG-4 clip of random pixels (lossy, but it decodes the same way every time)."""
    import av

    width, height = size
    rng = np.random.default_rng(11)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(count):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def have_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def user(*parts) -> list[dict]:
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        elif isinstance(part, Image.Image):
            content.append({"type": "image", "image": part})
        else:
            content.append(part)
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- the cases


def cases(clip: Path | None) -> dict[str, tuple[list[dict], dict]]:
    """name -> (messages for vlm, the reference processor's video arguments)."""
    odd = frames(5, 90, 50, seed=1)  # 5 frames: padded to 6 with the last; 90x50 resized to 84x56
    capped = frames(6, 100, 60, seed=2)
    large = frames(4, 200, 120, seed=3)
    out = {
        # a list of frames taken at 3 fps: Qwen2.5-VL's temporal positions 0, 2.67, 5.33 -> 0, 2, 5
        "frames": (
            user({"type": "video", "video": odd, "fps": 3.0}, "What happens?"),
            dict(videos=[np.stack(odd)], video_metadata=[{"total_num_frames": 5, "fps": 3.0}]),
        ),
        # a picture, then a video whose frames share 20 tokens' worth of pixels
        "picture and capped video": (
            user(noise(90, 50, seed=4), "and", {"type": "video", "video": capped, "total_pixels": CAP_TOTAL_PIXELS}),
            dict(
                videos=[np.stack(capped)],
                video_metadata=[{"total_num_frames": 6, "fps": 2.0}],
                images=[noise(90, 50, seed=4)],
                videos_kwargs=dict(cap_pixels_per_frame=True),
                video_processor_kwargs=dict(max_video_tokens=CAP_TOKENS),
            ),
        ),
        "max_pixels": (
            user("Here:", {"type": "video", "video": large, "max_pixels": 28 * 28 * 6}),
            dict(
                videos=[np.stack(large)],
                video_metadata=[{"total_num_frames": 4, "fps": 2.0}],
                videos_kwargs=dict(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 6}),
            ),
        ),
    }
    if clip is not None:
        # a file: 23 frames at 10 fps sampled at 2 fps -> 4 frames (0, 5, 11, 17)
        out["clip"] = (
            user({"type": "video_url", "video_url": {"url": f"file://{clip}"}}, "Describe the clip."),
            dict(videos=[str(clip)], videos_kwargs=dict(do_sample_frames=True, fps=2.0)),
        )
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Per flavor: the checkpoint, vlm's engine, transformers' model; and every case's reference."""
    root = tmp_path_factory.mktemp("qwen2vl-video")
    clip = write_clip(root / "clip.mp4") if have_av() else None
    models = {}
    requests = []
    for flavor in FLAVORS:
        path = write_tiny_qwen2_vl(root / flavor, flavor, seed=3)
        models[flavor] = (path, LLM(str(path), **ENGINE_ARGS), ReferenceModel.from_pretrained(path))
        for name, (messages, reference) in cases(clip).items():
            inputs = models[flavor][1].engine.preprocess(messages)
            videos_kwargs = {
                "do_sample_frames": False,
                "cap_pixels_per_frame": False,
                **reference.pop("videos_kwargs", {}),
            }
            requests.append(
                (
                    (flavor, name),
                    inputs,
                    dict(model_path=str(path), text=inputs.prompt, videos_kwargs=videos_kwargs, **reference),
                )
            )
    results = reference_video_inputs([request for _, _, request in requests], scratch=root)
    expected = {key: (inputs, result) for (key, inputs, _), result in zip(requests, results)}
    return models, expected, clip


def videos_of(inputs) -> list:
    return [image for image in inputs.images if image.extra.get("video")]


def pictures_of(inputs) -> list:
    return [image for image in inputs.images if not image.extra.get("video")]


def token_types(inputs, config) -> torch.Tensor:
    """transformers' mm_token_type_ids: 1 at picture placeholders, 2 at video placeholders."""
    ids = torch.tensor([inputs.token_ids])
    return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()


def reference_kwargs(inputs, flavor: str) -> dict:
    """transformers' model arguments for vlm's preprocessed request (its pixels and grids)."""
    kwargs = {}
    pictures, videos = pictures_of(inputs), videos_of(inputs)
    if pictures:
        kwargs["pixel_values"] = torch.cat([p.pixel_values for p in pictures])
        kwargs["image_grid_thw"] = torch.tensor([list(p.extra["image_grid_thw"]) for p in pictures])
    if videos:
        kwargs["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
        kwargs["video_grid_thw"] = torch.tensor([list(v.extra["image_grid_thw"]) for v in videos])
        if flavor == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = torch.tensor([v.extra["second_per_grid_t"] for v in videos])
    return kwargs


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["frames", "picture and capped video", "max_pixels", "clip"])
def test_preprocessing_equals_transformers(setup, flavor, name):
    models, expected, clip = setup
    if name == "clip" and clip is None:
        pytest.skip("decoding a video file needs PyAV (pip install av)")
    inputs, reference = expected[(flavor, name)]
    assert inputs.token_ids == reference["input_ids"][0].tolist()
    videos = videos_of(inputs)
    assert [v.placeholder_token_id for v in videos] == [models[flavor][2].model.config.video_token_id]
    assert [v.extra["frame_indices"] for v in videos] == reference["frames_indices"]
    grids = torch.tensor([list(v.extra["image_grid_thw"]) for v in videos])
    assert torch.equal(grids, reference["video_grid_thw"])
    pixels = torch.cat([v.pixel_values for v in videos])
    assert pixels.shape == reference["pixel_values_videos"].shape
    torch.testing.assert_close(pixels, reference["pixel_values_videos"], atol=1e-6, rtol=0)
    if flavor == "qwen2_5_vl":
        got = torch.tensor([v.extra["second_per_grid_t"] for v in videos])
        assert torch.equal(got, reference["second_per_grid_ts"])
    if pictures_of(inputs):
        assert torch.equal(torch.cat([p.pixel_values for p in pictures_of(inputs)]), reference["pixel_values"])
    settings = models[flavor][1].engine.preprocessor.video_settings
    assert {key: getattr(settings, key) for key in reference["settings"]} == reference["settings"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_positions_equal_get_rope_index(setup, flavor):
    models, expected, _ = setup
    model = models[flavor][2].model
    for (case_flavor, name), (inputs, reference) in expected.items():
        if case_flavor != flavor:
            continue
        kwargs = {k: reference[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in reference}
        want, delta = model.model.get_rope_index(
            reference["input_ids"], mm_token_type_ids=reference["mm_token_type_ids"], **kwargs
        )
        assert torch.equal(inputs.positions, want[:, 0]), name
        assert inputs.position_delta == int(delta), name
    if flavor == "qwen2_5_vl":  # the 3-fps frames: temporal patches 2/3 s apart, 4 tokens per second
        inputs, _ = expected[(flavor, "frames")]
        start = inputs.token_ids.index(model.config.video_token_id)
        assert sorted(set((inputs.positions[0, start : start + 18] - inputs.positions[0, start]).tolist())) == [0, 2, 5]


# ----------------------------------------------------------------------------- generation


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)


def reference_generate(model: ReferenceModel, inputs, flavor: str) -> tuple[list[int], torch.Tensor]:
    ids = torch.tensor([inputs.token_ids])
    with torch.inference_mode():
        out = model.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=token_types(inputs, model.model.config),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **reference_kwargs(inputs, flavor),
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack([step[0] for step in out.logits])


@pytest.mark.parametrize("flavor", FLAVORS)
def test_greedy_tokens_and_logits_equal_transformers_alone_and_batched(setup, flavor):
    models, _, clip = setup
    _, llm, reference = models[flavor]
    prompts = [
        cases(clip)["frames"][0],
        user(noise(84, 112, seed=9), "A picture, no video."),
        cases(clip)["picture and capped video"][0],
    ]
    if clip is not None:
        prompts.append(cases(clip)["clip"][0])
    expected = [reference_generate(reference, llm.engine.preprocess(p), flavor) for p in prompts]
    for tokens, _ in expected:
        assert len(set(tokens)) >= 6, "reference output is degenerate; parity would prove little"
    alone = [generate_with_logits(llm, [prompt], greedy())[0] for prompt in prompts[:1]]
    batched = generate_with_logits(llm, prompts, greedy())
    for (tokens, logits), (want_tokens, want_logits) in zip([*alone, *batched], [expected[0], *expected]):
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)


def test_chunked_prefill_through_a_video_equals_one_pass(setup):
    models, _, _ = setup
    path, llm, _ = models["qwen2_5_vl"]
    prompt = cases(None)["picture and capped video"][0]
    want = llm.generate([prompt], greedy(8))[0].outputs[0].token_ids
    small = LLM(str(path), max_num_batched_tokens=16, **ENGINE_ARGS)  # 16-token chunks cut the placeholders
    assert small.generate([prompt], greedy(8))[0].outputs[0].token_ids == want


# ----------------------------------------------------------------------------- refusals


def test_models_without_video_refuse_it_in_one_line(setup):
    from vlm.inputs import TextPreprocessor

    models, _, _ = setup
    tokenizer = models["qwen2_vl"][1].engine.preprocessor.tokenizer
    with pytest.raises(InputError, match=r"^message 0 part 0 is a video, which this model does not read; send its"):
        TextPreprocessor(tokenizer)(user({"type": "video", "video": frames(2, 28, 28, seed=5)}, "Hi"))


def test_bad_videos_are_one_line_errors(setup, tmp_path, monkeypatch):
    models, _, clip = setup
    llm = models["qwen2_vl"][1]

    def refuse(part, pattern):
        with pytest.raises(InputError, match=pattern) as caught:
            llm.engine.preprocess(user(part, "What happens?"))
        assert "\n" not in str(caught.value)

    refuse({"type": "video", "video": [noise(90, 50, 1), noise(50, 90, 2)]}, r"frame 1 is 50x90 but frame 0 is 90x50")
    refuse({"type": "video", "video": frames(2, 28, 28, 1), "fps": -1}, r"fps must be a positive number")
    refuse({"type": "video", "video": frames(2, 28, 28, 1), "nframes": 2}, r"^nframes choose frames from a video file")
    refuse({"type": "video_url", "video_url": {"url": str(tmp_path / "missing.mp4")}}, r"no such file")
    refuse({"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}, r"remote video URLs are disabled")
    # a video whose tokens alone overflow the model's 1024 positions, refused before decoding it
    if clip is not None:
        budget = 28 * 28 * 600  # frames upscaled to 924x532: 627 tokens per 2 frames
        refuse(
            {"type": "video", "video": str(clip), "min_pixels": budget, "max_pixels": budget},
            r"^a video of 4 sampled frames at 924x532 is 1,254 tokens, more than this model's context of 1,024; lower",
        )
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
        refuse({"type": "video", "video": str(bad)}, r"not a video PyAV can decode .*; re-encode it")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    refuse(
        {"type": "video", "video": b"\x00" * 64},
        r"decoding video files needs PyAV, which is not installed \(pip install av\)",
    )
    # frames need no decoder
    assert llm.engine.preprocess(user({"type": "video", "video": frames(2, 56, 56, 1)})).images


def test_a_video_over_the_context_is_refused(setup):
    models, _, _ = setup
    path, llm, _ = models["qwen2_vl"]
    text = len(llm.engine.preprocess(user("What happens?")).token_ids)
    small = LLM(str(path), max_model_len=text + 8, **ENGINE_ARGS)
    prompt = user({"type": "video", "video": frames(6, 90, 50, seed=6)}, "What happens?")  # 18 video tokens
    with pytest.raises(
        InputError, match=rf"prompt of {text + 20} tokens does not fit the context of {text + 8} tokens"
    ):
        small.chat([prompt], greedy(2))


# ----------------------------------------------------------------------------- the server


def data_url(image: Image.Image) -> tuple[str, Image.Image]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), decoded


def test_served_video_as_frames_equals_offline(setup, tmp_path):
    openai = pytest.importorskip("openai")
    from vlm.testing.server import ServerProcess

    models, _, _ = setup
    path, llm, _ = models["qwen2_5_vl"]
    encoded = [data_url(frame) for frame in frames(3, 70, 40, seed=7)]
    text = {"type": "text", "text": "What happens in this video?"}
    api = [{"role": "user", "content": [{"type": "video", "video": [url for url, _ in encoded], "fps": 1.0}, text]}]
    local = [
        {"role": "user", "content": [{"type": "video", "video": [image for _, image in encoded], "fps": 1.0}, text]}
    ]
    expected = llm.chat([local], SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0].outputs[0].text

    server = ServerProcess(str(path), "--served-model-name", "tiny", log_path=tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny", messages=api, max_tokens=NEW_TOKENS, temperature=0)
        assert reply.choices[0].message.content == expected, server.log()
        # a video file on the server's disk is refused unless --allowed-media-dir allows it
        refused = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "/tmp/clip.mp4"}}, text]}]
        with pytest.raises(openai.BadRequestError, match="local video files are disabled on this server"):
            client.chat.completions.create(model="tiny", messages=refused, max_tokens=2)
    finally:
        server.stop()
