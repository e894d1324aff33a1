"""Building blocks shared by every model: norms, MLPs, RoPE, attention, the transformer stack."""
from evejax.nn.attention import Attention, attend, make_mask
from evejax.nn.layers import MLP, Dense, DropPath, LayerNorm, RMSNorm, constrain
from evejax.nn.rope import apply_rope
from evejax.nn.transformer import REMAT_POLICIES, DecoderLayer, TransformerConfig, TransformerStack
