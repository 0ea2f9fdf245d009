"""Logical dimension names: what each dimension of a model array means.

Model code and parameter declarations use these names only; model/sharding.py
maps each to mesh axes (and is the only module that names the mesh axes), the
way maxtext's `common_types.py` names dimensions and its `logical_axis_rules`
place them.
"""

from __future__ import annotations

BATCH = "batch"            # rows of a batch (activations, cache)
LENGTH = "length"          # sequence positions of activations
CACHE_LENGTH = "cache_length"  # slots of the KV cache
HEADS = "heads"            # query heads (and the fused heads*head_dim of wq/wo)
KV_HEADS = "kv_heads"      # key/value heads (and the fused dim of wk/wv)
HEAD_DIM = "head_dim"
ACT_EMBED = "act_embed"    # hidden dimension of activations
EMBED = "embed"            # hidden dimension of parameters
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"          # the stacked layer axis of scanned parameters
NORM = "norm"              # norm scales

ALL = (BATCH, LENGTH, CACHE_LENGTH, HEADS, KV_HEADS, HEAD_DIM, ACT_EMBED, EMBED, MLP, VOCAB,
       LAYERS, NORM)
