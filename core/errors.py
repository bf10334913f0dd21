"""Errors the user can act on. Each message is one line naming the cause and the fix."""


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
