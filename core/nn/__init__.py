"""Building blocks for model files: tensor-parallel linears, norms, activations, rotary, attention.

Plugins build models only from these; the blocks call ``vlm.kernels`` for the hot ops.
"""

from vlm.nn.activation import GeluAndMul, SiluAndMul
from vlm.nn.attention import Attention
from vlm.nn.embedding import ParallelLMHead, VocabParallelEmbedding
from vlm.nn.linear import (
    ColwiseLinear,
    MergedColwiseLinear,
    QKVLinear,
    RowwiseLinear,
    build_colwise_linear,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rowwise_linear,
)
from vlm.nn.norm import RMSNorm
from vlm.nn.rotary import RotaryEmbedding
from vlm.nn.weights import WeightMapping, default_weight_loader, load_weights_by_mapping

__all__ = [
    "Attention",
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
