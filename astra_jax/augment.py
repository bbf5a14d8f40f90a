"""Random flips and 90-degree rotations of image batches, on the devices (inside the train step).

A galaxy's spectrum and redshift do not depend on how its cutout is oriented, so training shows
each image under one of the 8 elements of the square's symmetry group (the dihedral group D4).
They are drawn here, in the jitted step, rather than in tf.data: there they would cost the host
one or two more copies of every 288x288x5 image, while on an accelerator (and fused into the
patch embedding's reshapes on a CPU) they cost next to nothing.
"""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

NUM_ELEMENTS = 8

# Element k = np.rot90 by k % 4 quarter turns over (H, W), then a left-right flip (reverse W) if
# k >= 4. On (..., H, W) that is a transpose of (H, W) for odd k, then these reversals of (H, W).
_REVERSE = np.array([[False, False], [True, False], [True, True], [False, True],
                     [False, True], [True, True], [True, False], [False, False]])


def dihedral(images: jax.Array, k: jax.Array) -> jax.Array:
  """images (B, ..., S, S) with element k[b] (int, 0..7; see `_REVERSE`) applied to image b.

  Element k equals `np.rot90(image, k % 4, axes=(-2, -1))`, reversed along the last axis when
  k >= 4. Square images only (a transpose must keep the shape). Same dtype out as in.
  """
  if images.shape[-1] != images.shape[-2]:
    raise ValueError(f"dihedral needs square images, got shape {images.shape}")
  expand = lambda m: m.reshape(m.shape + (1,) * (images.ndim - 1))
  reverse = jnp.asarray(_REVERSE)[k]
  x = jnp.where(expand(k % 2 == 1), jnp.swapaxes(images, -1, -2), images)
  x = jnp.where(expand(reverse[:, 0]), jnp.flip(x, -2), x)
  return jnp.where(expand(reverse[:, 1]), jnp.flip(x, -1), x)


def random_dihedral(rng: jax.Array, images: jax.Array, shard: jax.Array | int = 0,
                    num_shards: int = 1) -> jax.Array:
  """`dihedral` with uniformly drawn elements for shard `shard` of a global batch.

  images (B, ..., S, S) are rows [shard * B, (shard + 1) * B) of a global batch of
  num_shards * B images. The elements of the whole global batch are drawn from `rng` and each
  shard takes its rows, so every image gets the same element however the global batch is split
  over devices and hosts.
  """
  b = images.shape[0]
  k = jax.random.randint(rng, (num_shards * b,), 0, NUM_ELEMENTS)
  return dihedral(images, lax.dynamic_slice_in_dim(k, shard * b, b))
