"""A request's prompt as the engine's ``ModelInputs``: chat messages (with their images) or a completion prompt.

Images in chat messages (``image_url`` parts) are loaded here, in the preprocessing pool, under the
server's media policy: ``data:`` URLs always; ``file://`` URLs and plain paths only inside
``allowed_media_dir``; ``http(s)://`` only with ``allow_remote_media``. They reach the plugin's
preprocessor as decoded PIL images (``{"type": "image", "image": <PIL.Image>}`` parts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.errors import InputError
from vlm.server.async_engine import AsyncEngine
from vlm.server.errors import RequestError, message_param
from vlm.server.protocol import ChatMessage


class PromptBuilder:
    """Builds ``ModelInputs`` with the engine's preprocessor; blocking, so run it in the preprocessing pool."""

    def __init__(
        self, engine: AsyncEngine, served_model_name: str, allowed_media_dir: str | None, allow_remote_media: bool
    ):
        self.engine = engine
        self.served_model_name = served_model_name
        self.allowed_dir = Path(allowed_media_dir).expanduser().resolve() if allowed_media_dir else None
        self.allow_remote_media = allow_remote_media

    def chat(self, messages: list[ChatMessage]) -> Any:
        converted = []
        multimodal = self.engine.is_multimodal
        for i, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            content: Any = message.content if message.content is not None else ""
            if isinstance(content, list):
                parts: list[dict[str, Any]] = []
                first_image = None
                for j, part in enumerate(content):
                    if part.type == "text":
                        parts.append({"type": "text", "text": part.text})
                    else:
                        where = f"messages[{i}].content[{j}].image_url"
                        parts.append({"type": "image", "image": self.load_image(part.url, where)})
                        first_image = first_image or where
                if not multimodal and first_image is not None:
                    raise RequestError(f"{self.served_model_name!r} is a text-only model; send no images", first_image)
                content = parts  # the preprocessor joins text parts for text-only templates
            item = {"role": role, "content": content}
            if message.name:
                item["name"] = message.name
            converted.append(item)
        try:
            return self.engine.preprocess(converted)
        except InputError as exc:
            raise RequestError(str(exc), message_param(str(exc))) from None

    def completion(self, prompt: Any) -> Any:
        try:
            return self.engine.preprocess(prompt)
        except InputError as exc:
            raise RequestError(str(exc), "prompt") from None

    def load_image(self, url: str, where: str) -> Any:
        """The image at ``url`` if the media policy allows it; ``where`` is the field named in a refusal."""
        from vlm.inputs.images import load_image

        head = url[:16].lower()
        if head.startswith("data:"):
            source_kind = "data"
        elif head.startswith(("http://", "https://")):
            source_kind = "remote"
        elif "://" in url[:16] and not head.startswith("file://"):
            source_kind = "other"  # load_image explains the unsupported scheme
        else:
            source_kind = "local"
        shown = url if len(url) <= 60 else url[:40] + "..." + url[-17:]
        if source_kind == "remote" and not self.allow_remote_media:
            raise RequestError(
                f"image {shown!r}: remote image URLs are disabled on this server; send the image as a "
                "data: URL, or start the server with --allow-remote-media",
                where,
            )
        if source_kind == "local" and self.allowed_dir is None:
            raise RequestError(
                f"image {shown!r}: local image files are disabled on this server; send the image as a "
                "data: URL, or start the server with --allowed-media-dir DIR",
                where,
            )
        try:
            return load_image(url, allowed_dir=self.allowed_dir, allow_remote=self.allow_remote_media)
        except InputError as exc:
            raise RequestError(str(exc), where) from None
