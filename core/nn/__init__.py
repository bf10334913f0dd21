"""Building blocks for model files: tensor-parallel linears, norms, activations, rotary, attention,
and :class:`VisionLanguageModel`, the base of a VLM's model class.

Plugins build models only from these; the blocks call ``vlm.kernels`` for the hot ops.
"""

from vlm.nn.activation import GeluAndMul, QuickGELU, SiluAndMul, get_act_fn
from vlm.nn.attention import Attention, VisionAttention
from vlm.nn.embedding import ParallelLMHead, VocabParallelEmbedding
from vlm.nn.linear import (
    ColwiseLinear,
    MergedColwiseLinear,
    QKVLinear,
    ReplicatedLinear,
    RowwiseLinear,
    build_colwise_linear,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_replicated_linear,
    build_rowwise_linear,
)
from vlm.nn.norm import LayerNorm, RMSNorm
from vlm.nn.rotary import RotaryEmbedding
from vlm.nn.weights import (
    LoadReport,
    WeightLoader,
    WeightMapping,
    default_weight_loader,
    load_weights_by_mapping,
    load_with_language_model,
)
from vlm.nn.vlm import VisionLanguageModel

__all__ = [
    "Attention",
    "QuickGELU",
    "VisionLanguageModel",
    "get_act_fn",
    "LayerNorm",
    "LoadReport",
    "ReplicatedLinear",
    "VisionAttention",
    "WeightLoader",
    "build_replicated_linear",
    "load_with_language_model",
    "ColwiseLinear",
    "GeluAndMul",
    "MergedColwiseLinear",
    "ParallelLMHead",
    "QKVLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowwiseLinear",
    "SiluAndMul",
    "VocabParallelEmbedding",
    "WeightMapping",
    "build_colwise_linear",
    "build_merged_colwise_linear",
    "build_qkv_proj",
    "build_rowwise_linear",
    "default_weight_loader",
    "load_weights_by_mapping",
]
