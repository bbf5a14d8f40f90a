"""Pre-norm transformer encoder over a grid of patch tokens, plus a learned summary token.

Token layout (B = batch, N = grid_h * grid_w patch tokens in row-major grid order, D = dim):
`[patch_0, ..., patch_{N-1}, summary]`, i.e. the summary token is APPENDED at index N (= -1), as in
the seed. The fixed 2-D sin-cos position code is added to the patch tokens only.
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from astra_jax.models.common import Dtype, dot_general_f32_acc, einsum_f32_acc


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position code of a patch grid, shape (grid_h * grid_w, dim), float32.

  Rows are in row-major grid order (token index = row * grid_w + col). The first dim/2 channels
  encode the column, the last dim/2 the row, each as [sin(pos * w_k), cos(pos * w_k)] with
  w_k = 10000^(-k / (dim/4)), k = 0..dim/4-1 (the MAE / big_vision "sincos2d" code).
  """
  if dim % 4:
    raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos position code, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  x = cols.reshape(-1, 1) * omega[None]
  y = rows.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective avalanche mix of uint32 words (C. Wellons' "lowbias32")."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(rng: jax.Array, shape: Sequence[int], keep_prob: float) -> jax.Array:
  """Bernoulli(keep_prob) bool mask of `shape`, a pure function of the key `rng`.

  Element i is kept when mix(mix(i ^ s0) ^ s1) < round(keep_prob * 2^32), with (s0, s1) 64 bits
  drawn from `rng`: one fused integer pass, where threefry (or rbg) bits for every element cost
  ~10% of a CPU train step. The keep rate is exact to 2^-32.
  """
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f"dropout over {size} >= 2^32 elements would repeat its mask")
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  bits = _mix32(_mix32(index ^ seed[0]) ^ seed[1])
  return bits < jnp.uint32(min(round(keep_prob * 2**32), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (`nn.Dropout`'s contract: rate, "dropout" rng) with `keep_mask` masks."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    threshold = min(round((1.0 - self.rate) * 2**32), 2**32 - 1)
    keep = keep_mask(self.make_rng("dropout"), x.shape, 1.0 - self.rate)
    # Scaled by the exact keep rate of the integer threshold, so E[output] = x.
    return jnp.where(keep, x * jnp.asarray(2**32 / threshold, x.dtype), jnp.zeros((), x.dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention that also returns its attention weights.

  Projections use float32 accumulation (see `common`); logits and softmax are float32.
  Returns `(out (B, T, D) in dtype, weights (B, heads, T_query, T_key) float32)`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={self.num_heads}")
    head_dim = dim // self.num_heads
    dense = lambda features, axis, name: nn.DenseGeneral(
        features, axis=axis, dtype=self.dtype, param_dtype=self.param_dtype,
        dot_general=dot_general_f32_acc, name=name)
    # One fused projection: one matmul instead of three.
    qkv = dense((3, self.num_heads, head_dim), -1, "qkv")(x)  # (B, T, 3, H, Dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = einsum_f32_acc("bqhd,bkhd->bhqk", q, k, dtype=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    out = einsum_f32_acc("bhqk,bkhd->bqhd", weights.astype(self.dtype), v, dtype=self.dtype)
    out = dense(dim, (-2, -1), "out")(out)
    return out, weights


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Dropout(MHA(LN(x))), then x + Dropout(MLP(LN(x))).

  MLP: Dense(mlp_ratio * D) -> GELU (exact, as torch's nn.GELU) -> Dropout -> Dense(D).
  The residual stream keeps the dtype of `x` (float32 in `Astra`); the branches run in `dtype`.
  Sows the attention weights (B, heads, T, T) float32 as `intermediates/attention_weights`
  (collected only when `mutable=["intermediates"]` is passed to `apply`).
  Returns `(x (B, T, D), attention weights (B, heads, T, T) float32)`.
  """
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> Tuple[jax.Array, jax.Array]:
    dim = x.shape[-1]
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        dot_general=dot_general_f32_acc, name=name)
    # Flax norms compute their statistics in float32 even when dtype is bfloat16.
    layer_norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name)

    h = layer_norm("ln_attn")(x)
    h, weights = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="attn")(h)
    self.sow("intermediates", "attention_weights", weights)
    x = x + Dropout(self.dropout)(h, deterministic=not train).astype(x.dtype)

    h = layer_norm("ln_mlp")(x)
    h = dense(self.mlp_ratio * dim, "mlp_in")(h)
    h = nn.gelu(h, approximate=False)
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = dense(dim, "mlp_out")(h)
    x = x + Dropout(self.dropout)(h, deterministic=not train).astype(x.dtype)
    return x, weights


class TransformerEncoder(nn.Module):
  """Position code + appended summary token + `num_layers` pre-norm blocks + final LayerNorm.

  `__call__(tokens (B, N, D), grid_shape=(grid_h, grid_w), *, train)` returns
  `(sequence (B, N+1, D), summary (B, D), summary_attention (B, heads, grid_h, grid_w))`, float32:
  the final-LayerNorm'd tokens (summary last), the summary token, and the LAST block's attention of
  the summary token (as query) over the patch tokens, reshaped onto the patch grid. The summary
  token's attention to itself is dropped, so each map sums to 1 minus that self-weight.
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, grid_shape: Tuple[int, int], *,
               train: bool) -> Tuple[jax.Array, jax.Array, jax.Array]:
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    batch, num_tokens, dim = tokens.shape
    grid_h, grid_w = grid_shape
    if grid_h * grid_w != num_tokens:
      raise ValueError(f"grid_shape {grid_shape} does not match {num_tokens} tokens")
    # The residual stream is float32: summing many bf16 branch outputs in bf16 would lose precision.
    x = tokens.astype(jnp.float32) + sincos_2d(grid_h, grid_w, dim)[None]
    summary = self.param("summary_token", nn.initializers.normal(stddev=0.02), (1, 1, dim),
                         self.param_dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(summary.astype(jnp.float32), (batch, 1, dim))], axis=1)
    for i in range(self.num_layers):
      x, weights = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=f"block_{i}")(x, train=train)
    x = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")(x)
    summary_attention = weights[:, :, -1, :num_tokens].reshape(batch, -1, grid_h, grid_w)
    return x, x[:, -1], summary_attention
