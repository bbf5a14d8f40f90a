"""Tests of astra_jax.losses: hand-computed numbers, sharded equivalence, an overfit check."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from astra_jax import losses
from astra_jax.models import Astra, z_bin_centers

NAN = float("nan")


def test_normalise_spectrum_hand_numbers():
  flux = jnp.array([[2.0, 4.0, NAN, 6.0],      # valid mean (2 + 4 + 6) / 3 = 4
                    [-1.0, -3.0, 1.0, 0.0],    # mean -0.75 -> floor
                    [5.0, 5.0, 5.0, 5.0]])     # no valid pixel -> floor, all zero
  weight = jnp.array([[1.0, 1.0, 0.0, 2.0],
                      [1.0, 1.0, 1.0, 1.0],
                      [0.0, 0.0, 0.0, 0.0]])
  flux_norm, norm = losses.normalise_spectrum(flux, weight)
  assert flux_norm.dtype == jnp.float32 and norm.dtype == jnp.float32
  np.testing.assert_allclose(norm, [4.0, losses.NORM_FLOOR, losses.NORM_FLOOR], rtol=1e-6)
  np.testing.assert_allclose(flux_norm[0], [0.5, 1.0, 0.0, 1.5], rtol=1e-6)
  np.testing.assert_allclose(flux_norm[1], [-1000.0, -3000.0, 1000.0, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(flux_norm[2], 0.0)


def test_normalise_denormalise_round_trip():
  rng = np.random.default_rng(0)
  flux = jnp.asarray(rng.uniform(0.5, 20.0, (3, 4000)), jnp.float32)
  weight = jnp.asarray(rng.uniform(0, 1, (3, 4000)) > 0.1, jnp.float32) * 3.0
  flux_norm, norm = losses.normalise_spectrum(flux, weight)
  back = losses.denormalise(flux_norm, jnp.log10(norm))
  valid = weight > 0
  np.testing.assert_allclose(jnp.where(valid, back, 0), jnp.where(valid, flux, 0), rtol=1e-5)
  # The mean of the normalised flux over valid pixels is 1 by construction.
  np.testing.assert_allclose(jnp.sum(flux_norm, -1) / jnp.sum(weight > 0, -1), 1.0, rtol=1e-5)


def test_spectrum_loss_hand_numbers():
  pred = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
  true = jnp.array([[0.5, 1.0, 0.0, 1.5], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  weight = jnp.array([[1.0, 1.0, 0.0, 2.0], [1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  got = losses.spectrum_loss(pred, true, weight)
  # (1 * 0.25 + 1 * 0 + 2 * 0.25) / 4 ; (1 * 1 + 0.5 * 4) / 1.5 ; no weight -> 0.
  np.testing.assert_allclose(got, [0.75 / 4, 3.0 / 1.5, 0.0], rtol=1e-6)
  # Only relative weights within a galaxy matter (ivar vs ivar * norm^2 is irrelevant).
  np.testing.assert_allclose(losses.spectrum_loss(pred, true, weight * 37.0), got, rtol=1e-6)
  # A NaN true value at a zero-weight pixel does not leak in.
  np.testing.assert_allclose(losses.spectrum_loss(pred, true.at[0, 2].set(NAN), weight), got)


def test_redshift_loss_hand_numbers():
  centers = jnp.array([0.1, 0.3, 0.5])
  logits = jnp.log(jnp.array([[0.25, 0.5, 0.25], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6]]))
  z = jnp.array([0.31, 0.95, NAN])
  has_z = jnp.array([True, True, False])
  got = losses.redshift_loss(logits, z, has_z, centers)
  # z = 0.31 -> bin 1; z = 0.95 beyond the range -> last bin; has_z False -> 0 despite NaN z.
  np.testing.assert_allclose(got, [np.log(2.0), np.log(4.0), 0.0], rtol=1e-6)
  assert np.asarray(losses.z_bin_index(jnp.array([0.0, 0.199, 0.201, -1.0]), centers)).tolist() \
      == [0, 0, 1, 0]


def test_redshift_loss_gaussian_target():
  centers = jnp.array([0.1, 0.3, 0.5])
  sigma = 0.2
  target = np.exp(-0.5 * ((np.array([0.1, 0.3, 0.5]) - 0.3) / sigma) ** 2)
  target /= target.sum()
  logits = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
  got = losses.redshift_loss(logits, jnp.array([0.3]), jnp.array([True]), centers, sigma=sigma)
  np.testing.assert_allclose(got, [-np.sum(target * np.log([0.2, 0.5, 0.3]))], rtol=1e-5)
  # Predicting the target itself reaches the minimum, the target's entropy.
  best = losses.redshift_loss(jnp.log(jnp.asarray(target))[None], jnp.array([0.3]),
                              jnp.array([True]), centers, sigma=sigma)
  np.testing.assert_allclose(best, [-np.sum(target * np.log(target))], rtol=1e-5)
  assert float(best[0]) < float(got[0])


def _hand_batch():
  """3 galaxies: #0 full weight with z, #1 zero weight with z, #2 weighted without z; 3 z-bins."""
  batch = dict(
      flux=jnp.array([[2.0, 4.0, 6.0, 4.0], [1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 5.0, 3.0]]),
      weight=jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]]),
      z=jnp.array([0.25, 0.45, NAN]),
      has_z=jnp.array([True, True, False]))
  outputs = dict(
      spectrum=jnp.ones((3, 4)),
      log_norm=jnp.array([0.0, 5.0, 1.0]),
      z_logits=jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])))
  return outputs, batch


def test_loss_terms_and_total_loss_hand_numbers():
  outputs, batch = _hand_batch()
  centers = jnp.array([0.1, 0.3, 0.5])
  terms = losses.loss_terms(outputs, batch, z_centers=centers)
  # Galaxy 0: norm 4, flux_norm [0.5, 1, 1.5, 1], MSE (0.25 + 0 + 0.25 + 0) / 4 = 0.125, log10(4)^2.
  # Galaxy 2: valid pixels 0-1, norm 2, flux_norm [0.5, 1.5], MSE 0.25, (1 - log10 2)^2.
  # Redshift: galaxy 0 (z=0.25 -> bin 1, p=0.25) and 1 (z=0.45 -> bin 2, p=0.25); 2 has no z.
  expected = dict(spectrum=(0.125 + 0.25, 2),
                  norm=(np.log10(4.0) ** 2 + (1 - np.log10(2.0)) ** 2, 2),
                  redshift=(2 * np.log(4.0), 2))
  assert set(terms) == set(expected)
  for name, (s, c) in expected.items():
    np.testing.assert_allclose(terms[name][0], s, rtol=1e-5, err_msg=name)
    assert float(terms[name][1]) == c and terms[name][1].dtype == jnp.float32
  loss, parts = losses.total_loss(outputs, batch, z_weight=0.5, norm_weight=2.0, z_centers=centers)
  means = {k: s / c for k, (s, c) in expected.items()}
  np.testing.assert_allclose([parts[k] for k in means], list(means.values()), rtol=1e-5)
  expected_loss = means["spectrum"] + 2.0 * means["norm"] + 0.5 * means["redshift"]
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  # The zero-weight galaxy's predictions do not matter and it does not dilute the means.
  changed = dict(outputs, spectrum=outputs["spectrum"].at[1].set(100.0),
                 log_norm=outputs["log_norm"].at[1].set(-9.0))
  np.testing.assert_allclose(
      losses.total_loss(changed, batch, z_weight=0.5, norm_weight=2.0, z_centers=centers)[0], loss)


def test_absolute_norm_loss_hand_numbers():
  outputs, batch = _hand_batch()
  centers = jnp.array([0.1, 0.3, 0.5])
  terms = losses.loss_terms(outputs, batch, z_centers=centers, norm_loss="absolute")
  # |0 - log10 4| + |1 - log10 2| over galaxies 0 and 2; the other parts are unchanged.
  np.testing.assert_allclose(terms["norm"][0], np.log10(4.0) + 1 - np.log10(2.0), rtol=1e-6)
  squared = losses.loss_terms(outputs, batch, z_centers=centers)
  np.testing.assert_allclose(terms["spectrum"][0], squared["spectrum"][0])
  # Over a constant prediction its minimiser is the median of skewed log ratios, not the mean.
  target = jnp.array([0.0, 0.0, 0.0, -1.0])                    # log10(norm) of 4 galaxies.
  skewed = dict(flux=jnp.tile(10.0 ** target[:, None], (1, 4)), weight=jnp.ones((4, 4)),
                z=jnp.zeros(4), has_z=jnp.ones(4, bool))
  grid = np.linspace(-1.0, 0.5, 151)
  def best(loss):
    cost = [float(losses.loss_terms(
        dict(spectrum=jnp.ones((4, 4)), log_norm=jnp.full(4, c), z_logits=jnp.zeros((4, 3))),
        skewed, z_centers=centers, norm_loss=loss)["norm"][0]) for c in grid]
    return grid[int(np.argmin(cost))]
  assert abs(best("absolute") - 0.0) < 0.011 and abs(best("squared") + 0.25) < 0.011
  with pytest.raises(ValueError, match="norm_loss"):
    losses.loss_terms(outputs, batch, z_centers=centers, norm_loss="huber")


def test_binned_norm_loss_is_the_cross_entropy_at_the_true_correction():
  from astra_jax.models import astra as astra_lib
  outputs, batch = _hand_batch()
  centers = jnp.array([0.1, 0.3, 0.5])
  amplitude = astra_lib.amplitude_bin_centers(20)                  # 0.1 dex bins, -1.6 .. 0.4.
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 20)), jnp.float32)
  anchor = jnp.array([0.2, 0.0, 1.5])
  binned = dict(outputs, log_norm_logits=logits, log_norm_anchor=anchor)
  terms = losses.loss_terms(binned, batch, z_centers=centers, norm_loss="binned")
  # Galaxy 0: log10(4) - 0.2 = 0.402 -> nearest centre 0.35 (bin 19); galaxy 2:
  # log10(2) - 1.5 = -1.199 -> -1.15 (bin 4); galaxy 1 has no spectrum.
  log_p = np.asarray(jax.nn.log_softmax(logits))
  assert np.argmin(np.abs(amplitude - (np.log10(4.0) - 0.2))) == 19
  assert np.argmin(np.abs(amplitude - (np.log10(2.0) - 1.5))) == 4
  np.testing.assert_allclose(terms["norm"][0], -log_p[0, 19] - log_p[2, 4], rtol=1e-5)
  assert float(terms["norm"][1]) == 2
  # Smoothed labels: the loss is least for a PDF that is the smoothed label itself.
  label = losses.smoothed_labels(jnp.array([np.log10(4.0) - 0.2]), amplitude, 0.1)
  def norm_term(first_logits):
    out = dict(binned, log_norm_logits=logits.at[0].set(first_logits))
    return float(losses.loss_terms(out, batch, z_centers=centers, norm_loss="binned",
                                   norm_sigma=0.1)["norm"][0])
  best = jnp.log(label[0] + 1e-12)
  assert norm_term(best) < norm_term(best + 0.5 * logits[0])
  # Its gradient reaches the logits only, never the anchor.
  grad = jax.grad(lambda a: losses.loss_terms(dict(binned, log_norm_anchor=a), batch,
                                              z_centers=centers, norm_loss="binned")["norm"][0])
  assert float(jnp.max(jnp.abs(grad(anchor)))) == 0.0
  with pytest.raises(ValueError, match="amplitude_bins"):
    losses.loss_terms(outputs, batch, z_centers=centers, norm_loss="binned")


def test_total_loss_default_centers_and_empty_parts():
  outputs, batch = _hand_batch()
  outputs = dict(outputs, z_logits=jnp.zeros((3, 180)))
  batch = dict(batch, has_z=jnp.zeros(3, bool))
  loss, parts = losses.total_loss(outputs, batch, z_weight=1.0, norm_weight=1.0)
  assert float(parts["redshift"]) == 0.0 and bool(jnp.isfinite(loss))
  with_z = dict(batch, has_z=jnp.array([True, False, False]))
  _, parts = losses.total_loss(outputs, with_z, z_weight=1.0, norm_weight=1.0)
  np.testing.assert_allclose(parts["redshift"], np.log(180.0), rtol=1e-6)  # uniform PDF


def _toy_problem(num=8, pixels=6, bins=5, seed=0):
  """A linear 'model' with shared params and a batch with uneven counting examples."""
  rng = np.random.default_rng(seed)
  feats = jnp.asarray(rng.normal(size=(num, 3)), jnp.float32)
  weight = rng.uniform(0.5, 2.0, (num, pixels)) * (rng.uniform(size=(num, pixels)) > 0.3)
  weight[[1, 2, 3]] = 0.0  # three galaxies without spectrum, all on the first two shards of 4
  batch = dict(feats=feats, flux=jnp.asarray(rng.uniform(1, 5, (num, pixels)), jnp.float32),
               weight=jnp.asarray(weight, jnp.float32),
               z=jnp.asarray(rng.uniform(0, 0.6, num), jnp.float32),
               has_z=jnp.asarray([True, False, False, False, True, True, False, True]))
  params = dict(spec=jnp.asarray(rng.normal(size=(3, pixels)), jnp.float32),
                norm=jnp.asarray(rng.normal(size=(3,)), jnp.float32),
                z=jnp.asarray(rng.normal(size=(3, bins)), jnp.float32))

  def loss_fn(params, batch, axis_name=None, reduction="pmean"):
    x = batch["feats"]
    outputs = dict(spectrum=x @ params["spec"], log_norm=x @ params["norm"],
                   z_logits=x @ params["z"])
    return losses.total_loss(outputs, batch, z_weight=0.7, norm_weight=0.3,
                             z_centers=z_bin_centers(bins), axis_name=axis_name,
                             reduction=reduction)

  return params, batch, loss_fn


@pytest.mark.parametrize("check_vma", [False, True])
def test_sharded_loss_and_grads_match_single_device(check_vma):
  """total_loss(axis_name=...) over 4 devices == 1 device on the whole batch, in both conventions:
  per-device grads + pmean (check_vma=False, like pmap) and JAX-summed grads (check_vma=True)."""
  assert jax.device_count() >= 4
  params, batch, loss_fn = _toy_problem()
  (loss1, parts1), grads1 = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  mesh = jax.make_mesh((4,), ("d",))
  reduction = "psum" if check_vma else "pmean"
  reduce = functools.partial(jax.lax.psum if check_vma else jax.lax.pmean, axis_name="d")

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d")), out_specs=P(),
                     check_vma=check_vma)
  def sharded(params, batch):
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, axis_name="d", reduction=reduction),
                                 has_aux=True)
    (loss, parts), grads = grad_fn(params, batch)
    # With check_vma the grads of replicated params are already summed over "d" (and invariant).
    return reduce(loss), parts, grads if check_vma else reduce(grads)

  batch = jax.device_put(batch, NamedSharding(mesh, P("d")))
  loss4, parts4, grads4 = jax.jit(sharded)(params, batch)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  for k in parts1:
    np.testing.assert_allclose(parts4[k], parts1[k], rtol=1e-5, err_msg=k)
  for g4, g1 in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-6)


def test_naive_pmean_of_device_means_differs():
  """Why the (sum, count) design: with uneven counts a pmean of per-device means is wrong."""
  params, batch, loss_fn = _toy_problem()
  mesh = jax.make_mesh((4,), ("d",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("d")), out_specs=P(),
                     check_vma=False)
  def naive(params, batch):
    return jax.lax.pmean(loss_fn(params, batch)[0], "d")

  naive_loss = jax.jit(naive)(params, jax.device_put(batch, NamedSharding(mesh, P("d"))))
  assert abs(float(naive_loss) - float(loss_fn(params, batch)[0])) > 1e-3
  with pytest.raises(ValueError, match="reduction"):
    loss_fn(params, batch, axis_name="d", reduction="mean")


def test_psummed_terms_match_single_device():
  """The other route: psum the (sum, count) terms, then combine_terms."""
  params, batch, _ = _toy_problem(seed=1)
  x = batch["feats"]
  outputs = dict(spectrum=x @ params["spec"], log_norm=x @ params["norm"], z_logits=x @ params["z"])
  terms1 = losses.loss_terms(outputs, batch, z_centers=z_bin_centers(5))
  loss1, _ = losses.combine_terms(terms1, z_weight=0.7, norm_weight=0.3)
  mesh = jax.make_mesh((4,), ("d",))

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P(),
                     check_vma=False)
  def sharded(outputs, batch):
    terms = jax.lax.psum(losses.loss_terms(outputs, batch, z_centers=z_bin_centers(5)), "d")
    return losses.combine_terms(terms, z_weight=0.7, norm_weight=0.3)[0]

  outputs, batch = jax.device_put((outputs, batch), NamedSharding(mesh, P("d")))
  np.testing.assert_allclose(jax.jit(sharded)(outputs, batch), loss1, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overfit_tiny_batch(dtype):
  """20 Adam steps on one fixed tiny batch must reduce the total loss substantially (both dtypes)."""
  model = Astra(patch_size=8, dim=32, num_layers=1, num_heads=4, decoder_hidden=64, num_pixels=64,
                num_z_bins=12, cnn_features=(4,), dropout=0.0, dtype=jnp.dtype(dtype))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 5, 16, 16)), jnp.float32)
  wave = np.linspace(0, 1, 64)
  flux = np.stack([a * (1 + 0.5 * np.sin(6 * wave + a)) for a in (1.0, 2.0, 4.0, 8.0)])
  batch = dict(flux=jnp.asarray(flux, jnp.float32), weight=jnp.ones((4, 64), jnp.float32),
               z=jnp.array([0.05, 0.2, 0.35, 0.5]), has_z=jnp.array([True, True, True, False]))
  # An "rbg" key: threefry initialisers take seconds to compile on a small CPU.
  params = jax.jit(lambda k: model.init(k, images, train=False))(jax.random.key(0, impl="rbg"))
  params = params["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  centers = model.z_centers()

  def loss_fn(params):
    outputs = model.apply({"params": params}, images, train=True)
    return losses.total_loss(outputs, batch, z_weight=1.0, norm_weight=1.0, z_centers=centers)[0]

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  history = []
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
    history.append(float(loss))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert np.all(np.isfinite(history))
  assert history[-1] < 0.3 * history[0], history


@pytest.mark.parametrize("z", [0.0, 0.1234, 0.3, 0.599])
def test_smoothed_labels_sum_to_one_and_peak_at_the_true_bin(z):
  centers = z_bin_centers(180, 0.6)
  target = np.asarray(losses.smoothed_labels(jnp.array([z]), centers, 0.01))
  np.testing.assert_allclose(target.sum(), 1.0, rtol=1e-6)
  assert int(np.argmax(target)) == int(losses.z_bin_index(jnp.array([z]), centers)[0])
  # Width: bins more than 3 sigma (0.03) from z hold almost nothing.
  assert target[0, np.abs(centers - z) > 0.03].sum() < 0.01
