"""Building blocks for model files: tensor-parallel linears, norms, activations, rotary, attention,
and :class:`VisionLanguageModel`, the base of a VLM's model class.

Plugins build models only from these (and :mod:`vlm.plugin` for everything that is not model
code); the blocks call ``vlm.kernels`` for the hot ops. Each layer has one name here: linear
layers are made by their ``build_*`` function (the classes they return live in
:mod:`vlm.nn.linear`).
"""

from vlm.distributed import tp_rank, tp_world_size
from vlm.kernels import apply_rotary
from vlm.nn.activation import GeluAndMul, QuickGELU, SiluAndMul, get_act_fn
from vlm.nn.attention import Attention, VisionAttention
from vlm.nn.embedding import ParallelLMHead, VocabParallelEmbedding
from vlm.nn.forward_batch import ForwardBatch
from vlm.nn.linear import (
    build_colwise_linear,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_replicated_linear,
    build_rowwise_linear,
    prepare_for_inference,
)
from vlm.nn.norm import LayerNorm, RMSNorm
from vlm.nn.patch_embedding import ConvPatchEmbedding
from vlm.nn.projectors import pixel_shuffle
from vlm.nn.rotary import RotaryEmbedding
from vlm.nn.vision_language import VisionLanguageModel
from vlm.nn.visual_expert import VisualExpertMLP, VisualExpertQKV, VisualExpertRowwiseLinear
from vlm.nn.weights import (
    LoadReport,
    ShapeMismatch,
    WeightLoader,
    WeightMapping,
    default_weight_loader,
    load_weights_by_mapping,
    load_with_language_model,
    set_weight_loader,
    weight_loader_of,
)
from vlm.platform import vision_batches

__all__ = [
    "Attention",
    "ConvPatchEmbedding",
    "ForwardBatch",
    "GeluAndMul",
    "LayerNorm",
    "LoadReport",
    "ParallelLMHead",
    "QuickGELU",
    "RMSNorm",
    "RotaryEmbedding",
    "ShapeMismatch",
    "SiluAndMul",
    "VisionAttention",
    "VisionLanguageModel",
    "VisualExpertMLP",
    "VisualExpertQKV",
    "VisualExpertRowwiseLinear",
    "VocabParallelEmbedding",
    "WeightLoader",
    "WeightMapping",
    "apply_rotary",
    "build_colwise_linear",
    "build_merged_colwise_linear",
    "build_qkv_proj",
    "build_replicated_linear",
    "build_rowwise_linear",
    "default_weight_loader",
    "get_act_fn",
    "load_weights_by_mapping",
    "load_with_language_model",
    "pixel_shuffle",
    "prepare_for_inference",
    "set_weight_loader",
    "tp_rank",
    "tp_world_size",
    "vision_batches",
    "weight_loader_of",
]
