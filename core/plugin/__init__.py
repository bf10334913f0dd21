"""What a plugin imports from vlm-core, besides :mod:`vlm.nn` for its model code.

This is the stable, plugin-facing surface: the component registries (``vlm.registry``) and
config builders, hook markers and claims (the contract itself is
documented in :mod:`vlm.hookspecs`), the config helpers, the preprocessor building blocks, the
errors a plugin raises, the model protocol, and :func:`build_language_model` for a VLM's nested
text config. Anything else in ``vlm`` may move between releases; these names keep their meaning
within a major version of the contract (``vlm_api_version``). ``tests/test_docs.py`` checks that
the first-party plugins and the template import nothing else from the core.

Importing this module does not import torch: plugin modules import it at the top and stay cheap
for ``vlmrun plugins``.
"""

from vlm.config import ConfigBuilder, ModelConfig, RawConfig, build_model_config, composite_text_config, text_config_of
from vlm.errors import ConfigError, InputError, PluginError, VlmError, WeightsError
from vlm.grounding import GroundedBox, from_normalized, from_resized
from vlm.hookspecs import API_VERSION, Claim, claim_by_architecture, hookimpl
from vlm.inputs import (
    ImageInput,
    ImagePromptPreprocessor,
    Message,
    ModelInputs,
    Prompt,
    TextPreprocessor,
    find_chat_template,
    iter_image_parts,
    load_image,
    normalize_messages,
    pixel_values_key,
    read_json,
    rescale_and_normalize,
    to_rgb,
)
from vlm.inputs.messages import has_video_parts, iter_media_parts
from vlm.inputs.preprocessor import check_text
from vlm.inputs.video import OpenedVideo, load_frames, open_video
from vlm.plugin.manager import build_language_model
from vlm.plugin.model_protocol import ModelProtocol, VisionModelProtocol
from vlm.registry import (
    ACTIVATIONS,
    CONFIG_BUILDERS,
    PATCH_EMBEDDINGS,
    PROJECTORS,
    VISION_TOWERS,
    Registry,
    RegistryError,
)

__all__ = [
    "ACTIVATIONS",
    "API_VERSION",
    "CONFIG_BUILDERS",
    "ConfigBuilder",
    "PATCH_EMBEDDINGS",
    "PROJECTORS",
    "Registry",
    "RegistryError",
    "VISION_TOWERS",
    "build_model_config",
    "Claim",
    "ConfigError",
    "GroundedBox",
    "ImageInput",
    "ImagePromptPreprocessor",
    "InputError",
    "Message",
    "ModelConfig",
    "ModelInputs",
    "ModelProtocol",
    "OpenedVideo",
    "PluginError",
    "Prompt",
    "RawConfig",
    "TextPreprocessor",
    "VisionModelProtocol",
    "VlmError",
    "WeightsError",
    "build_language_model",
    "check_text",
    "claim_by_architecture",
    "composite_text_config",
    "find_chat_template",
    "from_normalized",
    "from_resized",
    "has_video_parts",
    "hookimpl",
    "iter_media_parts",
    "iter_image_parts",
    "load_frames",
    "load_image",
    "normalize_messages",
    "open_video",
    "pixel_values_key",
    "read_json",
    "rescale_and_normalize",
    "text_config_of",
    "to_rgb",
]
