"""Errors the user can act on. Each message is one line naming the cause and the fix."""


def reason(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s message as one line (every line of it, whitespace collapsed; at most ``limit``
    characters), or its type's name when it has none: for wrapping a library's error."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class VlmError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits 1 instead of a traceback."""


class PluginError(VlmError):
    """A plugin could not be loaded, or no single plugin could be chosen for a model."""


class ConfigError(VlmError):
    """config.json (or an engine / sampling setting) is missing or invalid."""


class ModelNotFoundError(VlmError):
    """``--model`` names neither a directory nor a model in the local Hugging Face cache."""


class WeightsError(VlmError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


class InputError(VlmError):
    """A request is invalid: an over-long prompt, a bad image, a bad message list."""
