"""Random dihedral augmentation on the devices, and in the train step."""

import jax
import jax.numpy as jnp
import numpy as np

from astra_jax import augment
from astra_jax import sharding
from astra_jax import train
from experiments.configs import baseline


def test_dihedral_is_rot90_then_flip():
  images = np.arange(8 * 2 * 3 * 3, dtype=np.float32).reshape(8, 2, 3, 3)
  got = np.asarray(augment.dihedral(jnp.asarray(images), jnp.arange(8)))
  for k in range(8):
    expected = np.rot90(images[k], k % 4, axes=(1, 2))
    expected = expected[:, :, ::-1] if k >= 4 else expected
    np.testing.assert_array_equal(got[k], expected, err_msg=f"k={k}")
  # The 8 elements of the group: 8 different images of the same asymmetric one.
  same = np.broadcast_to(images[:1], images.shape)
  outs = np.asarray(augment.dihedral(jnp.asarray(same), jnp.arange(8)))
  assert len({o.tobytes() for o in outs}) == 8


def test_dihedral_keeps_dtype_and_band_sums():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5, 8, 8)), jnp.float16)
  out = augment.dihedral(images, jnp.arange(16) % 8)
  assert out.dtype == jnp.float16
  np.testing.assert_array_equal(np.sort(np.asarray(out).reshape(16, 5, -1), axis=-1),
                                np.sort(np.asarray(images).reshape(16, 5, -1), axis=-1))


def test_random_elements_do_not_depend_on_how_the_batch_is_split():
  rng = jax.random.key(3)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(32, 2, 4, 4)), jnp.float32)
  whole = augment.random_dihedral(rng, images)
  shards = [augment.random_dihedral(rng, images[8 * i:8 * (i + 1)], i, 4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate(shards), whole)
  moved = [not np.array_equal(a, b) for a, b in zip(np.asarray(whole), np.asarray(images))]
  # Element 0 (identity) has probability 1/8: about 4 of the 32 images stay put.
  assert 20 <= sum(moved) < 32


def test_train_step_augments_only_when_configured():
  def loss(augmented: bool):
    config = baseline.get_config("tiny")
    config.model.dropout = 0.0
    config.augment = augmented
    mesh = sharding.create_mesh(jax.devices()[:1])
    model, tx = train.make_model(config), train.make_optimizer(config)
    state = train.init_state(config, model, tx, mesh)
    rng = np.random.default_rng(0)
    b = config.batch_size
    batch = {"image": rng.normal(size=(b, *train.image_shape(config))).astype(np.float16),
             "flux": np.ones((b, 4000), np.float32), "weight": np.ones((b, 4000), np.float32),
             "z": np.full(b, 0.1, np.float32), "has_z": np.ones(b, bool),
             "aperture_fluxes": np.full((b, *train.aperture_fluxes_shape(config)), 10.0,
                                        np.float32), "fiber_diameter": np.full(b, 3.0, np.float32)}
    step = train.make_train_step(config, model, tx, mesh)
    _, metrics = step(state, sharding.to_global(batch, mesh), jax.random.key(0))
    return float(metrics["loss"])

  assert loss(True) != loss(False)
