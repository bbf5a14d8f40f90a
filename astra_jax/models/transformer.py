"""Pre-norm transformer encoder over a grid of patch tokens, plus a learned summary token.

Token layout (B = batch, N = grid_h * grid_w patch tokens in row-major grid order, E optional
extra tokens, D = dim): `[patch_0, ..., patch_{N-1}, extra_0, ..., extra_{E-1}, summary]`, i.e.
the summary token is APPENDED last (index -1), as in the seed. The fixed 2-D sin-cos position code
is added to the patch tokens only (an extra token, such as ASTRA's photometry token, has no place
on the grid).

Only the summary token leaves the encoder for the heads, so with `summary_only` the last block
computes the attention, output projection and MLP of the summary token alone (keys and values,
and the fused q/k/v projection, still for every token).
"""

from typing import Optional, Tuple

import flax.linen as nn
from flax.typing import Dtype
import jax
import jax.numpy as jnp
import numpy as np


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


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention of x (B, T, D) in `dtype`.

  q, k, v come from one fused `nn.DenseGeneral` (kernel (D, 3, heads, D/heads)); attention is
  `jax.nn.dot_product_attention` (XLA or cuDNN picks the kernel), or, with `return_weights`, the
  same softmax(q k^T / sqrt(D/heads)) computed explicitly (logits and softmax in float32).
  Returns `(out (B, T_query, D) in dtype, weights (B, heads, T_query, T) float32 or None)`;
  T_query = T, or 1 with `last_query_only` (only the last token attends: the summary token's row).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, last_query_only: bool = False,
               return_weights: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={self.num_heads}")
    head_dim = dim // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, heads, head_dim)
    if last_query_only:
      q = q[:, -1:]
    weights = None
    if return_weights:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1)
      out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    else:
      out = jax.nn.dot_product_attention(q, k, v)
    out = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          name="out")(out)
    return out, weights


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Dropout(MHA(LN(x))), then x + Dropout(MLP(LN(x))).

  MLP: Dense(mlp_ratio * D) -> GELU (exact, as torch's nn.GELU) -> Dropout -> Dense(D).
  The residual stream keeps the dtype of `x` (float32 in `Astra`); the branches run in `dtype`.
  Returns `(x (B, T, D), attention weights (B, heads, T, T) float32)`; the weights are computed
  explicitly only with `return_weights` or when "intermediates" is mutable (then also sown as
  `intermediates/attention_weights`), else None. With `summary_only` only the last token's row
  of both, (B, 1, D) and (B, heads, 1, T), is computed (nothing sown).
  """
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, summary_only: bool = False,
               return_weights: bool = False) -> Tuple[jax.Array, Optional[jax.Array]]:
    dim = x.shape[-1]
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    # Flax norms compute their statistics in float32 even when dtype is bfloat16.
    layer_norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name)
    dropout = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
    sow = self.is_mutable_collection("intermediates") and not summary_only

    h = layer_norm("ln_attn")(x)
    h, weights = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="attn")(h, last_query_only=summary_only,
                                                 return_weights=return_weights or sow)
    if sow:
      self.sow("intermediates", "attention_weights", weights)
    x = x[:, -1:] if summary_only else x
    x = x + dropout(h).astype(x.dtype)

    h = layer_norm("ln_mlp")(x)
    h = dense(self.mlp_ratio * dim, "mlp_in")(h)
    h = nn.gelu(h, approximate=False)
    h = dropout(h)
    h = dense(dim, "mlp_out")(h)
    x = x + dropout(h).astype(x.dtype)
    return x, weights


class TransformerEncoder(nn.Module):
  """Position code + appended summary token + `num_layers` pre-norm blocks + final LayerNorm.

  `__call__(tokens (B, N, D), grid_shape=(grid_h, grid_w), *, train, extra_tokens=None,
  summary_only=False, return_attention=False)` returns `(sequence (B, N+E+1, D), summary (B, D),
  summary_attention)`, float32: the final-LayerNorm'd tokens (`extra_tokens` (B, E, D) after the
  patches, summary last), the summary token, and, with
  `return_attention` (else None), the LAST block's attention of the summary token (as query) over
  the patch tokens, (B, heads, grid_h, grid_w). The summary token's attention to itself is
  dropped, so each map sums to 1 minus that self-weight.
  `summary_only`: the last block computes the summary token alone (see the module docstring);
  `sequence` is then (B, 1, D), the summary token, and the last block sows nothing.
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, grid_shape: Tuple[int, int], *, train: bool,
               extra_tokens: Optional[jax.Array] = None, summary_only: bool = False,
               return_attention: bool = False
               ) -> Tuple[jax.Array, jax.Array, Optional[jax.Array]]:
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    batch, num_tokens, dim = tokens.shape
    grid_h, grid_w = grid_shape
    if grid_h * grid_w != num_tokens:
      raise ValueError(f"grid_shape {grid_shape} does not match {num_tokens} tokens")
    # The residual stream is float32: summing many bf16 branch outputs in bf16 would lose precision.
    x = tokens.astype(jnp.float32) + sincos_2d(grid_h, grid_w, dim)[None]
    if extra_tokens is not None:
      x = jnp.concatenate([x, extra_tokens.astype(jnp.float32)], axis=1)
    summary = self.param("summary_token", nn.initializers.normal(stddev=0.02), (1, 1, dim),
                         self.param_dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(summary.astype(jnp.float32), (batch, 1, dim))], axis=1)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x, weights = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=f"block_{i}")(
                                        x, train=train, summary_only=summary_only and last,
                                        return_weights=return_attention and last)
    x = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")(x)
    summary_attention = None
    if return_attention:
      summary_attention = weights[:, :, -1, :num_tokens].reshape(batch, -1, grid_h, grid_w)
    return x, x[:, -1], summary_attention
