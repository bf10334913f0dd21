"""Preprocessors: prompt (text, chat messages with images, token ids) -> :class:`ModelInputs`.

- :class:`TextPreprocessor` tokenizes plain prompts and renders chat messages with the
  tokenizer's chat template (what text-only plugins return from ``build_preprocessor``).
- :func:`template_content_form` probes whether a chat template renders string contents, text
  parts or both; both preprocessors hand every message's text to the template in a form it renders.
- :func:`read_json` reads ``preprocessor_config.json`` / ``processor_config.json`` with one-line
  errors; :func:`find_chat_template` finds the chat template transformers' *processor* would use
  (which may differ from the tokenizer's).
- :func:`to_rgb` converts a PIL image to RGB as transformers' image processors do (transparency
  composited onto white); :func:`rescale_and_normalize` turns uint8 pixels into float32 values
  with transformers' arithmetic (rescale in float64, cast, normalise in float32), bit for bit.
- :func:`preprocess_with_tools` renders chat messages with a request's tools (function
  definitions the chat template writes into the prompt, ``apply_chat_template(..., tools=...)``);
  :func:`chat_template_of` is the template a preprocessor renders with.
- :class:`ImagePromptPreprocessor` is the prompt plumbing of a preprocessor whose transformers
  processor expands one placeholder per image in the rendered chat template: a subclass says how
  a picture becomes pixels and tokens, the base does the rest.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

from vlm.errors import ConfigError, InputError
from vlm.inputs.data import ImageInput, Message, ModelInputs, Prompt, is_token_ids
from vlm.inputs.images import load_image
from vlm.inputs.messages import (
    content_list,
    has_image_parts,
    image_part_options,
    iter_image_parts,
    normalize_messages,
    text_content_as,
)

#: a marker no real prompt holds: :func:`template_content_form` looks for it in a rendered probe
_PROBE = "vlm-content-probe-5d1e"


def check_text(text: str) -> str:
    """Text a tokenizer can take: a lone surrogate (invalid UTF-16 from JSON, or undecodable
    bytes in an argv prompt) is a one-line error instead of a tokenizer traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise InputError(
            f"the prompt holds {bad!r} at character {exc.start}, which is not valid Unicode (a lone surrogate); "
            "send UTF-8 text"
        ) from None
    return text


def template_content_form(render: Callable[[list[Any]], str], template: str = "") -> str:
    """Which content form a chat template renders: ``"string"``, ``"parts"``, ``"both"`` or
    ``"content_list"``.

    ``render`` renders messages with the template (``tokenize=False``). Templates differ: SmolVLM's
    iterates parts, so string content renders as nothing; plain ChatML concatenates strings and
    fails on a list; Qwen2-VL's *base* checkpoints iterate content parts given as ``messages``
    themselves (no roles: ``"content_list"``). So a marker is rendered in each form, and a form
    counts when the marker comes out as text (a template that raises on a form does not render it).

    :raises InputError: the template renders the user's text in no form; names the template.
    """

    def renders(messages: list[Any]) -> bool:
        try:
            text = render(messages)
        except Exception:  # noqa: BLE001 - any failure means this form does not render
            return False
        # a string-only template prints a parts list as its repr (or JSON): not a rendering of the text
        return _PROBE in text and not any(f"{q}text{q}: {q}{_PROBE}{q}" in text for q in "'\"")

    part = {"type": "text", "text": _PROBE}
    string, parts = renders([{"role": "user", "content": _PROBE}]), renders([{"role": "user", "content": [part]}])
    if string or parts:
        return "both" if string and parts else "string" if string else "parts"
    if renders([part]):
        return "content_list"
    shown = " ".join(template.split())[:60]
    raise InputError(
        f"this model's chat template ({shown!r}...) renders no user text, whatever form the messages take; "
        "send a plain prompt instead of chat messages (vlmrun --no-chat-template)"
    )


def check_template_takes_tools(template: str | None, tools: list[dict[str, Any]] | None) -> None:
    """A template that never reads ``tools`` would drop them silently: refuse instead."""
    if tools and (not template or "tools" not in template):
        raise InputError(
            "this model's chat template does not render tools (it never reads 'tools'); describe the tools "
            "in a system message instead, or serve a model whose template supports tool calling"
        )


def chat_template_of(preprocessor: Any) -> str | None:
    """The chat template ``preprocessor`` renders messages with (None when it has none or is not
    one of core's preprocessors)."""
    template = getattr(preprocessor, "chat_template", None)
    if template is None and isinstance(preprocessor, TextPreprocessor):
        template = getattr(preprocessor.tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def preprocess_with_tools(preprocessor: Any, prompt: Prompt, tools: list[dict[str, Any]] | None) -> ModelInputs:
    """``preprocessor(prompt)``, its chat template also given ``tools`` (OpenAI's function
    definitions); a preprocessor that takes no ``tools`` is a one-line refusal when there are some."""
    if not tools:
        return preprocessor(prompt)
    try:
        takes_tools = "tools" in inspect.signature(preprocessor).parameters
    except (TypeError, ValueError):
        takes_tools = False
    if not takes_tools:
        raise InputError(
            "this model's preprocessor cannot render tools into the prompt; describe the tools in a system "
            "message instead (the plugin's preprocessor needs a 'tools' argument)"
        )
    return preprocessor(prompt, tools=tools)


class TextPreprocessor:
    """Tokenizes plain prompts, renders chat messages with the tokenizer's chat template."""

    _probed: tuple[str, str] | None = None  # (template, its content form), probed once per template

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def render(
        self, messages: list[Message], add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InputError(
                "this model's tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
                "send a plain prompt string instead of chat messages"
            )
        check_template_takes_tools(template, tools)
        messages = normalize_messages(messages)
        if has_image_parts(messages):
            raise InputError("this model reads text only: remove the image parts, or serve a vision-language model")
        if self._probed is None or self._probed[0] != template:
            probe = partial(self.tokenizer.apply_chat_template, tokenize=False)
            self._probed = (template, template_content_form(probe, template))
        from jinja2 import TemplateError

        try:
            if self._probed[1] == "content_list":
                return self.tokenizer.apply_chat_template(content_list(messages), tokenize=False)
            # text-only templates get a string (joined text parts), unless they render parts only
            form = "parts" if self._probed[1] == "parts" else "string"
            return self.tokenizer.apply_chat_template(
                text_content_as(messages, form),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **({"tools": tools} if tools else {}),
            )
        except TemplateError as exc:  # a sandbox violation too: the template, not the messages, is at fault
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"the model's chat template failed ({type(exc).__name__}: {first})") from None

    def raw_prompt(self, text: str, images: Sequence[Any] = ()) -> ModelInputs:
        """A prompt without the chat template; a text-only model refuses images."""
        if images:
            raise InputError("this model reads text only: remove the images, or serve a vision-language model")
        return self(text)

    def __call__(
        self, prompt: Prompt, add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> ModelInputs:
        if is_token_ids(prompt):
            return ModelInputs(token_ids=list(prompt))
        if isinstance(prompt, list):
            text = self.render(cast(list[Message], prompt), add_generation_prompt, tools)
            # the template already wrote BOS where the model wants it
            ids = self.tokenizer(check_text(text), add_special_tokens=False)["input_ids"]
            chat = True
        elif isinstance(prompt, str):
            text, chat = prompt, False
            ids = self.tokenizer(check_text(text))["input_ids"]
        else:
            raise InputError(f"a prompt must be a string, a list of messages or token ids, not {type(prompt).__name__}")
        if not ids:
            raise InputError("the prompt is empty after tokenization; send at least one token")
        return ModelInputs(token_ids=list(ids), prompt=text, chat=chat)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object; fix or re-download it")
    return data


def find_chat_template(model_path: str | Path, tokenizer: Any) -> str | None:
    """The template transformers' processor would use: the processor's, else the tokenizer's."""
    model_path = Path(model_path)
    jinja = model_path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        template = (read_json(model_path / name) or {}).get("chat_template")
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def to_rgb(image: Any) -> Any:
    """RGB, compositing transparency onto white (transformers' image-processor rule).

    An RGB image without transparency is returned as it is, not copied (a 64 MP picture is
    256 MB decoded): callers make new images from it, they do not draw on it."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def rescale_and_normalize(pixels: Any, rescale_factor: float | None, mean: Any | None, std: Any | None) -> Any:
    """uint8 ``[C, H, W]`` (numpy) -> float32, as transformers' numpy image processors compute it.

    ``x * rescale_factor`` in float64 cast to float32, then ``(x - mean) / std`` in float32 with
    float32 mean and std per channel; ``None`` skips a step.
    """
    import numpy as np

    values = pixels.astype(np.float64)
    if rescale_factor is not None:
        values = values * rescale_factor
    values = values.astype(np.float32)
    if mean is not None and std is not None:
        mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        std = np.asarray(std, dtype=np.float32)[:, None, None]
        values = (values - mean) / std
    return values


@dataclasses.dataclass(frozen=True)
class ImageBudget:
    """What a picture may cost; ``None``: the model's own setting.

    ``min_pixels`` / ``max_pixels``: how many pixels (width x height) a picture is resized into,
    for families whose processor resizes to a pixel budget (Qwen2-VL). ``max_num_tiles``: at most
    this many tiles per picture, for tiling families (InternVL's ``max_patches`` /
    ``max_dynamic_patch``; the thumbnail comes on top). Each family honours the fields its
    processor has and ignores the others; families with a fixed input size ignore them all."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    max_num_tiles: int | None = None

    def over(self, base: ImageBudget) -> ImageBudget:
        """This budget, with ``base``'s values where it has none."""
        return ImageBudget(
            self.min_pixels if self.min_pixels is not None else base.min_pixels,
            self.max_pixels if self.max_pixels is not None else base.max_pixels,
            self.max_num_tiles if self.max_num_tiles is not None else base.max_num_tiles,
        )


def apply_image_budget(
    preprocessor: Any, min_pixels: int | None, max_pixels: int | None, max_num_tiles: int | None = None
) -> None:
    """Give ``preprocessor`` the engine's image budget (``--min-pixels`` / ``--max-pixels`` /
    ``--max-num-tiles``); a preprocessor without budgets (text-only, a third-party one) is left as
    it is, and one whose ``set_image_budget`` takes pixels only (written before tile budgets) gets
    no ``max_num_tiles``."""
    setter = getattr(preprocessor, "set_image_budget", None)
    if setter is None:
        return
    try:
        takes_tiles = "max_num_tiles" in inspect.signature(setter).parameters
    except (TypeError, ValueError):
        takes_tiles = False
    if max_num_tiles is not None and takes_tiles:
        setter(min_pixels, max_pixels, max_num_tiles=max_num_tiles)
    elif min_pixels is not None or max_pixels is not None:
        setter(min_pixels, max_pixels)


class ImagePromptPreprocessor:
    """Prompts (token ids, strings, chat messages with image parts) -> :class:`ModelInputs`, the way
    transformers' processors do it: render the chat template, which writes ``placeholder`` once
    per image; replace each with :meth:`expand_image` (``image_token`` x the image's token count);
    tokenize (no special tokens when the template already wrote BOS).

    :param tokenizer: the model directory's transformers tokenizer.
    :param hf_config: the model's config.
    :param model_path: the model directory (processor files, chat template: :func:`find_chat_template`).
    :param allowed_dir, allow_remote, max_pixels: image-loading policy for :meth:`load_image`, see
        :func:`vlm.inputs.images.load_image`.

    A subclass sets ``placeholder``, ``image_token`` and ``image_token_id`` (:meth:`vocabulary_id`
    checks a token exists), ``supports_images`` for a checkpoint without a vision tower, and
    ``chat_template`` where the processor's rule is not :func:`find_chat_template`'s, and
    implements :meth:`preprocess_image`. It may override
    :meth:`prepare_messages` (rewrite messages for its template), :meth:`expand_image` (e.g. wrap
    the image tokens in start / end tokens) and :meth:`finish` (e.g. add positions). Every refusal
    is an :class:`~vlm.errors.InputError` in one line.
    """

    placeholder: str
    image_token: str
    image_token_id: int | None = None
    supports_images: bool = True
    #: the family's preprocessor reads video parts (it renders and expands them itself); others refuse them
    supports_video: bool = False
    #: the engine's image budget (``--min-pixels`` / ``--max-pixels`` / ``--max-num-tiles``), over the model's own
    image_budget: ImageBudget = ImageBudget()
    #: what ``detail: "low"`` means for this family, at most the engine's budget (None: the family
    #: has no budget, ``detail`` is ignored; ``"high"`` and ``"auto"`` are the engine's budget)
    low_detail_budget: ImageBudget | None = None
    #: the most pixels a request may ask one picture to be resized into when the engine sets no
    #: ``--max-pixels`` (a family with a pixel budget: the model's own maximum); ``None``: no pixel budget
    model_max_pixels: int | None = None
    _probed: tuple[str, str] | None = None  # (template, its content form), probed once per template

    def __init__(self, tokenizer: Any, hf_config: Any, model_path: str | Path):
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.model_path = Path(model_path)
        self.chat_template = find_chat_template(self.model_path, tokenizer)

    def load_image(self, source: Any) -> Any:
        """A PIL image from a path, ``file://`` or ``data:`` URL, bytes or PIL image (no remote
        media: the server loads those itself, under its own policy, before preprocessing)."""
        return load_image(source)

    def vocabulary_id(self, token: str, needs: str, required: bool = True) -> int | None:
        """The id of ``token``; a :class:`~vlm.errors.ConfigError` naming ``needs`` when the tokenizer
        lacks it (``None`` instead when not ``required``, e.g. a text-only checkpoint's image token)."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", None):
            if not required:
                return None
            raise ConfigError(f"the tokenizer in {self.model_path} has no {token} token; {needs}")
        config_id = getattr(self.hf_config, "image_token_id", None)
        if token == self.image_token and config_id is not None and config_id != token_id:
            raise ConfigError(
                f"config.json image_token_id is {config_id} but the tokenizer's {token} is {token_id}; "
                "the tokenizer does not belong to this model"
            )
        return token_id

    def preprocess_image(self, source: Any) -> ImageInput:
        """Load one image (path, URL, bytes, PIL image) and make its pixels and token count."""
        raise NotImplementedError

    def set_image_budget(
        self, min_pixels: int | None, max_pixels: int | None, max_num_tiles: int | None = None
    ) -> None:
        """The engine's image budget (``--min-pixels`` / ``--max-pixels`` / ``--max-num-tiles``);
        families without budgets ignore it."""
        self.image_budget = ImageBudget(min_pixels, max_pixels, max_num_tiles)

    def budget_for(self, options: dict[str, Any]) -> ImageBudget:
        """One image's budget: its own ``min_pixels`` / ``max_pixels`` / ``max_num_tiles``, else
        ``detail: "low"``'s (:attr:`low_detail_budget`), else the engine's (``high`` and ``auto``
        mean the engine's)."""
        budget = self.image_budget
        low = self.low_detail_budget
        if options.get("detail") == "low" and low is not None:
            # never more than the engine's own budget allows
            if low.max_pixels is not None and budget.max_pixels is not None:
                low = dataclasses.replace(low, max_pixels=min(low.max_pixels, budget.max_pixels))
            if low.max_num_tiles is not None and budget.max_num_tiles is not None:
                low = dataclasses.replace(low, max_num_tiles=min(low.max_num_tiles, budget.max_num_tiles))
            budget = low.over(budget)
        own = ImageBudget(options.get("min_pixels"), options.get("max_pixels"), options.get("max_num_tiles"))
        # a request may lower its pictures' cost, never raise it past what the server allows
        # (a huge min_pixels would otherwise resize a small picture into gigabytes)
        ceiling = self.image_budget.max_pixels if self.image_budget.max_pixels is not None else self.model_max_pixels
        for name in ("min_pixels", "max_pixels"):
            value = getattr(own, name)
            if value is not None and ceiling is not None and value > ceiling:
                raise InputError(
                    f"image {name} {value} exceeds the server's limit of {ceiling} pixels per picture "
                    f"(--max-pixels, else the model's own); ask for at most {ceiling}"
                )
        return own.over(budget)

    def preprocess_image_within(self, source: Any, budget: ImageBudget) -> ImageInput:
        """:meth:`preprocess_image` within ``budget``; a family with a pixel budget overrides this
        (the default ignores the budget)."""
        return self.preprocess_image(source)

    def prepare_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Normalized messages -> what the chat template expects (default: unchanged)."""
        return messages

    def expand_image(self, image: ImageInput) -> str:
        """The text an image's placeholder becomes."""
        return self.image_token * image.num_tokens

    def finish(self, inputs: ModelInputs) -> ModelInputs:
        """Last touches on a prompt's inputs (default: none)."""
        return inputs

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
        """Messages -> (prompt text with one placeholder per image, image sources in order)."""
        return self.render_with_tools(messages, add_generation_prompt, None)

    def render_with_tools(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict[str, Any]] | None
    ) -> tuple[str, list[Any]]:
        """:meth:`render`, with ``tools`` (function definitions) for the chat template. A subclass
        that overrides :meth:`render` renders no tools unless it overrides this too."""
        messages = normalize_messages(messages, videos=self.supports_video)
        sources = list(iter_image_parts(messages))
        if sources and not self.supports_images:
            raise InputError("this model takes no images (config.json has no vision_config); send text only")
        if not self.chat_template:
            raise InputError(
                "this model has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json "
                "'chat_template'); send a plain prompt string instead of chat messages"
            )
        check_template_takes_tools(self.chat_template, tools)
        from jinja2 import TemplateError

        render = partial(self.tokenizer.apply_chat_template, chat_template=self.chat_template, tokenize=False)
        if self._probed is None or self._probed[0] != self.chat_template:
            self._probed = (self.chat_template, template_content_form(render, self.chat_template))
        form = self._probed[1]
        messages = self.prepare_messages(messages)
        # text in the form the template renders ("both": as prepare_messages left it)
        rendered: list[Any] = content_list(messages) if form == "content_list" else text_content_as(messages, form)
        try:
            text = render(rendered, add_generation_prompt=add_generation_prompt, **({"tools": tools} if tools else {}))
        except TemplateError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InputError(f"the chat template rejected the messages ({type(exc).__name__}: {first})") from None
        return text, sources

    def __call__(
        self, prompt: Prompt, add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
    ) -> ModelInputs:
        if is_token_ids(prompt):
            if self.image_token_id is not None and self.image_token_id in prompt:
                raise InputError(
                    f"a token-id prompt cannot carry images (it holds {self.image_token} tokens); send chat "
                    "messages with image parts instead"
                )
            return self.finish(ModelInputs(token_ids=list(prompt), image_token_id=self.image_token_id))
        if isinstance(prompt, list):
            messages = cast(list[Message], prompt)
            if not tools:
                text, sources = self.render(messages, add_generation_prompt)
            elif type(self).render is ImagePromptPreprocessor.render or (
                type(self).render_with_tools is not ImagePromptPreprocessor.render_with_tools
            ):
                text, sources = self.render_with_tools(messages, add_generation_prompt, tools)
            else:  # the subclass renders its own way (a conversation template), without tools
                raise InputError(
                    "this model's prompt format cannot render tools (its preprocessor renders without the chat "
                    "template's tools); describe the tools in a system message instead"
                )
            bos = getattr(self.tokenizer, "bos_token", None)
            add_special_tokens = not (bos and text.startswith(bos))  # as transformers' processors decide
        elif isinstance(prompt, str):
            text, sources, add_special_tokens = prompt, [], True
        else:
            raise InputError(f"a prompt must be a string, a list of messages or token ids, not {type(prompt).__name__}")
        options = image_part_options(cast(list[Message], prompt)) if isinstance(prompt, list) else []
        inputs = self._expand(text, sources, add_special_tokens, templated=isinstance(prompt, list), options=options)
        return dataclasses.replace(inputs, chat=isinstance(prompt, list))

    def raw_prompt(self, text: str, images: Sequence[Any] = ()) -> ModelInputs:
        """A prompt without the chat template (base checkpoints, ``vlmrun --no-chat-template``):
        each image's :attr:`raw_image_text`, then ``text``, as the family's processor takes a raw prompt."""
        if images and not self.supports_images:
            raise InputError("this model takes no images (config.json has no vision_config); send text only")
        return self._expand(self.raw_image_text * len(images) + text, list(images), add_special_tokens=True)

    @property
    def raw_image_text(self) -> str:
        """What stands for one image in a raw prompt (default: the placeholder and a newline)."""
        return self.placeholder + "\n"

    def _expand(
        self,
        text: str,
        sources: list[Any],
        add_special_tokens: bool,
        templated: bool = False,
        options: list[dict[str, Any]] | None = None,
    ) -> ModelInputs:
        """Placeholders -> each image's tokens (``options``: each image's budget options); tokenize; check the counts."""
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 < len(sources) and templated:
            shown = " ".join((self.chat_template or "").split())[:60]
            raise InputError(
                f"the chat template ({shown!r}...) wrote {len(pieces) - 1} image placeholder(s) {self.placeholder!r} "
                f"for {len(sources)} image(s): it drops images; send the picture with a raw prompt "
                "(vlmrun --no-chat-template) or use a template that places images"
            )
        if len(pieces) - 1 != len(sources):
            raise InputError(
                f"the prompt has {len(pieces) - 1} image placeholder(s) {self.placeholder!r} but {len(sources)} "
                f"image(s); remove {self.placeholder!r} from the text and send images as image parts"
            )
        options = options if options and len(options) == len(sources) else [{} for _ in sources]
        images = [
            self.preprocess_image_within(source, self.budget_for(opts))
            if opts or self.image_budget != ImageBudget()
            # (no budget asked for: the family's own preprocess_image, as before budgets existed)
            else self.preprocess_image(source)
            for source, opts in zip(sources, options)
        ]
        expanded = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            expanded += [self.expand_image(image), piece]
        ids = list(self.tokenizer(check_text("".join(expanded)), add_special_tokens=add_special_tokens)["input_ids"])
        if not ids:
            raise InputError("the prompt is empty after tokenization; send at least one token")
        if self.image_token_id is not None and ids.count(self.image_token_id) != sum(i.num_tokens for i in images):
            raise InputError(f"the prompt text contains {self.image_token!r}, which is reserved for images; remove it")
        return self.finish(ModelInputs(token_ids=ids, images=images, prompt=text, image_token_id=self.image_token_id))


__all__ = [
    "ImageBudget",
    "apply_image_budget",
    "ImagePromptPreprocessor",
    "chat_template_of",
    "check_template_takes_tools",
    "find_chat_template",
    "preprocess_with_tools",
    "read_json",
    "rescale_and_normalize",
    "template_content_form",
    "to_rgb",
]
