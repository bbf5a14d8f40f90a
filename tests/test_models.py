"""Tests of the ASTRA Flax modules (tiny shapes, CPU).

Everything is jitted and initialised from "rbg" keys: on a small CPU, eager op-by-op dispatch and
threefry-based initialisers dominate the runtime (compile time), not the arithmetic.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from astra_jax import grid
from astra_jax import losses
from astra_jax import photometry
from astra_jax.models import astra as astra_lib
from astra_jax.models import (Astra, MultiHeadAttention, PatchCNN, TransformerBlock,
                              TransformerEncoder, patch_grid, sincos_2d, z_bin_centers, z_pdf_stats)

BANDS = 5
# One layer keeps compile times down; TransformerEncoder is tested with two layers below.
TINY = dict(patch_size=8, dim=32, num_layers=1, num_heads=4, decoder_hidden=64, num_pixels=4000,
            num_z_bins=20, cnn_features=(8, 16))


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def _images(batch=2, size=32, seed=0):
  images = np.random.default_rng(seed).normal(size=(batch, BANDS, size, size))
  return jnp.asarray(images, jnp.float32)


def _init(module, *args, **kwargs):
  return jax.jit(lambda key, *a: module.init(key, *a, **kwargs))(_key(), *args)["params"]


def _apply(module, **kwargs):
  """Jitted `module.apply({"params": p}, *args, **kwargs)`; an rng arg feeds "dropout"."""
  def apply(params, *args, rng=None):
    rngs = {} if rng is None else {"dropout": rng}
    return module.apply({"params": params}, *args, rngs=rngs, **kwargs)
  return jax.jit(apply)


@pytest.fixture(scope="module")
def tiny():
  """Tiny float32 model, its params, images (2, 5, 32, 32) and jitted apply functions (each compiled
  once per module): "eval" (train=False, attention map and sown intermediates), "train", and
  "eval_bf16" (the same params in a bfloat16-compute model)."""
  model = Astra(**TINY)
  images = _images()
  fns = dict(
      eval=_apply(model, train=False, return_attention=True, mutable=["intermediates"]),
      train=_apply(model, train=True),
      eval_bf16=_apply(Astra(**TINY, dtype=jnp.bfloat16), train=False, return_attention=True,
                       mutable=["intermediates"]))
  return model, _init(model, images, train=False), images, fns


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_astra_output_shapes_and_dtypes(tiny, dtype):
  _, params, images, fns = tiny
  model = Astra(**TINY, dtype=dtype)
  # Parameters are float32 (and the same tree) whatever the compute dtype.
  init_params = jax.eval_shape(lambda x: model.init(_key(), x, train=False), images)["params"]
  assert {x.dtype for x in jax.tree.leaves(init_params)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.map(lambda x: x.shape, init_params) == jax.tree.map(lambda x: x.shape, params)
  out, _ = fns["eval" if dtype == jnp.float32 else "eval_bf16"](params, images)
  assert set(out) == {"spectrum", "log_norm", "z_logits", "attention"}
  assert out["spectrum"].shape == (2, 4000) and out["spectrum"].dtype == jnp.float32
  assert out["log_norm"].shape == (2,) and out["log_norm"].dtype == jnp.float32
  assert out["z_logits"].shape == (2, 20) and out["z_logits"].dtype == jnp.float32
  assert out["attention"].shape == (2, 4, 4, 4) and out["attention"].dtype == jnp.float32
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  assert "attention" not in jax.eval_shape(_apply(model, train=False), params, images)


def test_patch_grid_and_token_count_at_full_size():
  assert patch_grid((288, 288), 16) == (18, 18)
  assert patch_grid((32, 48), 8) == (4, 6)
  with pytest.raises(ValueError, match="divisible"):
    patch_grid((30, 32), 8)
  model = Astra(patch_size=16, dim=32, num_layers=1, num_heads=4, decoder_hidden=16)
  images = jax.ShapeDtypeStruct((2, BANDS, 288, 288), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(_key(), x, train=False), images)

  def apply(variables, x):
    return model.apply(variables, x, train=False, return_attention=True, mutable=["intermediates"])

  out, state = jax.eval_shape(apply, variables, images)
  assert out["attention"].shape == (2, 4, 18, 18)
  # 18 * 18 = 324 patch tokens + 1 summary token.
  (weights,) = state["intermediates"]["encoder"]["block_0"]["attention_weights"]
  assert weights.shape == (2, 4, 325, 325)


def test_summary_attention_is_a_distribution_over_the_grid(tiny):
  _, params, images, fns = tiny
  out, state = fns["eval"](params, images)
  last_block = f"block_{TINY['num_layers'] - 1}"
  (last,) = state["intermediates"]["encoder"][last_block]["attention_weights"]
  np.testing.assert_allclose(np.sum(last, axis=-1), 1.0, rtol=1e-5)
  # The map is the last query row (the appended summary token) without its self-attention column.
  np.testing.assert_allclose(out["attention"].reshape(2, 4, 16), last[:, :, -1, :16], rtol=1e-6)
  assert bool(jnp.all(out["attention"] >= 0)) and bool(jnp.all(out["attention"].sum((2, 3)) < 1))


def test_sincos_2d():
  pe = sincos_2d(3, 4, 16)
  assert pe.shape == (12, 16) and pe.dtype == np.float32
  # Token 0 is row 0, col 0: all sin channels 0, all cos channels 1.
  np.testing.assert_allclose(pe[0], np.repeat([0.0, 1.0, 0.0, 1.0], 4), atol=1e-7)
  # Row-major: token 5 = (row 1, col 1); first channel = sin(col * 1), channel 8 = sin(row * 1).
  np.testing.assert_allclose([pe[5, 0], pe[5, 8], pe[2, 0], pe[2, 8]],
                             [np.sin(1), np.sin(1), np.sin(2), 0.0], atol=1e-6)
  assert len({row.tobytes() for row in pe}) == 12
  with pytest.raises(ValueError, match="multiple of 4"):
    sincos_2d(2, 2, 10)


def _zero_leaves(params, names):
  flat = traverse_util.flatten_dict(params)
  flat = {k: (jnp.zeros_like(v) if any(n in k for n in names) else v) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat)


def test_transformer_block_residual_path():
  block = TransformerBlock(num_heads=4, dropout=0.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 32)), jnp.float32)
  params = _init(block, x, train=False)
  apply = _apply(block, train=False, return_weights=True)
  y, weights = apply(params, x)
  assert weights.shape == (2, 4, 7, 7)
  assert _apply(block, train=False)(params, x)[1] is None  # Weights only when asked for.
  assert float(jnp.max(jnp.abs(y - x))) > 1e-2  # the branches do something
  # Zeroing the attention output and MLP output projections leaves exactly the residual path.
  identity = _zero_leaves(params, ["out", "mlp_out"])
  y0, _ = apply(identity, x)
  np.testing.assert_array_equal(y0, x)
  # With only the MLP zeroed, the block is x + MHA(LN(x)) with its own attention submodule.
  no_mlp = _zero_leaves(params, ["mlp_out"])
  y1, _ = apply(no_mlp, x)

  @jax.jit
  def attention_branch(params, x):
    h = nn.LayerNorm().apply({"params": params["ln_attn"]}, x)
    return MultiHeadAttention(4).apply({"params": params["attn"]}, h)[0]

  attn = attention_branch(params, x)
  np.testing.assert_allclose(y1, x + attn, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("embedding", ["conv2d", "conv1d", "linear"])
def test_patch_cnn_deterministic_local_and_differentiable(embedding):
  cnn = PatchCNN(patch_size=8, dim=16, patch_embedding=embedding, features=(4, 8))
  images = _images()
  bumped = images.at[0, :, 8:16, 16:24].add(1.0)
  loss = lambda p, x: jnp.sum(cnn.apply({"params": p}, x) ** 2)

  @jax.jit  # one compilation for everything below
  def run(key):
    params = cnn.init(key, images)["params"]
    apply = lambda x: cnn.apply({"params": params}, x)
    grads = jax.grad(loss, argnums=(0, 1))(params, images)
    return apply(images), apply(images), apply(bumped), grads

  tokens, again, bumped_tokens, (grads_p, grads_x) = run(_key())
  assert tokens.shape == (2, 16, 16)
  # Same params and input -> bit-identical output (the seed re-drew its CNN per sample).
  np.testing.assert_array_equal(tokens, again)
  # Patching is a reshape: changing patch (row 1, col 2) of image 0 changes token 1 * 4 + 2 only.
  changed = np.any(np.asarray(bumped_tokens != tokens), axis=-1)
  expected = np.zeros((2, 16), bool)
  expected[0, 6] = True
  np.testing.assert_array_equal(changed, expected)
  # Gradients exist and are non-zero for every parameter and for the input.
  for g in jax.tree.leaves(grads_p) + [grads_x]:
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("embedding", ["conv2d", "conv1d", "linear"])
def test_astra_patch_embedding_variants(embedding):
  # Shapes only (abstract evaluation); PatchCNN is run for real in the test above.
  model = Astra(**{**TINY, "patch_size": 16, "patch_embedding": embedding})
  out, params = jax.eval_shape(lambda x: model.init_with_output(_key(), x, train=False), _images())
  assert out["spectrum"].shape == (2, 4000) and out["spectrum"].dtype == jnp.float32
  proj = params["params"]["embed"]["proj"]["kernel"]
  in_features = {"conv2d": 16 * 16 * 16, "conv1d": 16 * 16 * 16, "linear": 16 * 16 * BANDS}
  assert proj.shape == (in_features[embedding], 32)
  assert ("conv_0" in params["params"]["embed"]) == (embedding != "linear")


def test_invalid_patch_embedding_raises():
  with pytest.raises(ValueError, match="patch_embedding.*conv2d"):
    Astra(**{**TINY, "patch_embedding": "conv3d"})
  with pytest.raises(ValueError, match="patch_embedding"):
    PatchCNN(patch_embedding="vit")


def test_dropout_only_in_training(tiny):
  _, params, images, fns = tiny
  apply = lambda train, seed: (fns["train"](params, images, rng=_key(seed))["spectrum"] if train
                               else fns["eval"](params, images, rng=_key(seed))[0]["spectrum"])
  # Eval needs no rng and ignores one.
  np.testing.assert_array_equal(fns["eval"](params, images)[0]["spectrum"], apply(False, 1))
  np.testing.assert_array_equal(apply(False, 1), apply(False, 2))
  np.testing.assert_array_equal(apply(True, 1), apply(True, 1))
  assert float(jnp.max(jnp.abs(apply(True, 1) - apply(True, 2)))) > 1e-4
  assert float(jnp.max(jnp.abs(apply(True, 1) - apply(False, 1)))) > 1e-4


def test_bf16_forward_matches_fp32(tiny):
  _, params, images, fns = tiny
  (out32, _), (out16, _) = fns["eval"](params, images), fns["eval_bf16"](params, images)
  # Stated tolerance: bf16 has an 8-bit mantissa (rel. rounding 2^-9 ~ 0.2% per op); after a few
  # layers the outputs agree to within 5% of their scale.
  for key in ("spectrum", "log_norm", "z_logits"):
    scale = float(jnp.max(jnp.abs(out32[key])))
    err = float(jnp.max(jnp.abs(out16[key] - out32[key])))
    assert err <= 0.05 * scale, (key, err, scale)
    assert err > 0  # really computed in bf16
  pdf32 = z_pdf_stats(out32["z_logits"], z_bin_centers(20))["pdf"]
  pdf16 = z_pdf_stats(out16["z_logits"], z_bin_centers(20))["pdf"]
  np.testing.assert_allclose(pdf16, pdf32, atol=0.01)


def test_bf16_gradients_are_float32(tiny):
  # Abstract evaluation only (bf16 backward passes are slow to compile on CPU); a real bf16 backward
  # pass runs in tests/test_losses.py::test_overfit_tiny_batch[bfloat16].
  _, params, images, _ = tiny
  model = Astra(**TINY, dtype=jnp.bfloat16)
  loss = lambda p: jnp.mean(model.apply({"params": p}, images, train=True,
                                        rngs={"dropout": _key()})["spectrum"] ** 2)
  grads = jax.eval_shape(jax.grad(loss), params)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_summary_only_last_block_gives_the_same_outputs(tiny):
  # Without collected intermediates the last block computes the summary token alone; with them
  # every token. Same outputs in evaluation, and in training without dropout (with dropout the
  # last block draws masks for the summary row alone: the same distribution, other draws).
  _, params, images, fns = tiny
  out, _ = fns["eval"](params, images)
  short = _apply(Astra(**TINY), train=False, return_attention=True)(params, images)
  for key in out:
    np.testing.assert_allclose(short[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)
  model = Astra(**{**TINY, "dropout": 0.0})
  out, _ = _apply(model, train=True, mutable=["intermediates"])(params, images)
  short = _apply(model, train=True)(params, images)
  for key in out:
    np.testing.assert_allclose(short[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("last_query_only", [False, True])
def test_dot_product_attention_matches_explicit_weights(dtype, last_query_only):
  # The fast path (jax.nn.dot_product_attention) and the path that returns the attention weights
  # (softmax of q.k / sqrt(head_dim) in float32) compute the same attention.
  attention = MultiHeadAttention(num_heads=4, dtype=dtype)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 32)), jnp.float32)
  params = _init(attention, x)
  run = lambda weights: _apply(attention, last_query_only=last_query_only,
                               return_weights=weights)(params, x)
  (fast, none), (explicit, weights) = run(False), run(True)
  assert none is None and weights.dtype == jnp.float32
  assert fast.shape == explicit.shape == (2, 1 if last_query_only else 9, 32)
  assert fast.dtype == explicit.dtype == dtype
  assert weights.shape == (2, 4, 1 if last_query_only else 9, 9)
  np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-5)
  # bf16: the two paths may round the probabilities or accumulate in another order (cuDNN).
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(explicit, np.float32),
                             rtol=tol, atol=tol)


def test_fast_path_matches_explicit_weights_path(tiny):
  # Astra without attention requested (dot_product_attention, summary-only last block) against
  # the analysis path (every block's weights computed explicitly and sown): the same outputs.
  _, params, images, fns = tiny
  for dtype, explicit_fn in ((jnp.float32, fns["eval"]), (jnp.bfloat16, fns["eval_bf16"])):
    fast = _apply(Astra(**TINY, dtype=dtype), train=False)(params, images)
    explicit, _ = explicit_fn(params, images)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for key in fast:
      scale = float(jnp.max(jnp.abs(explicit[key])))
      np.testing.assert_allclose(fast[key], explicit[key], rtol=tol, atol=tol * scale,
                                 err_msg=f"{key} {dtype}")


def test_z_bin_centers():
  centers = z_bin_centers(180, 0.6)
  assert centers.shape == (180,) and centers.dtype == np.float32
  np.testing.assert_allclose(centers[[0, 1, -1]], [0.6 / 360, 0.6 / 360 * 3, 0.6 - 0.6 / 360],
                             rtol=1e-6)
  np.testing.assert_allclose(Astra(**TINY, z_max=0.3).z_centers(), z_bin_centers(20, 0.3))


def test_z_pdf_stats_hand_case():
  centers = jnp.array([0.1, 0.3, 0.5])
  logits = jnp.log(jnp.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])) + 7.0  # shift-invariant
  stats = z_pdf_stats(logits, centers)
  np.testing.assert_allclose(stats["pdf"], [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], rtol=1e-5)
  np.testing.assert_allclose(stats["pdf"].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["mean"], [0.02 + 0.15 + 0.15, 0.06 + 0.03 + 0.15], rtol=1e-5)
  np.testing.assert_allclose(stats["mode"], [0.3, 0.1], rtol=1e-6)
  std0 = np.sqrt(0.2 * 0.22**2 + 0.5 * 0.02**2 + 0.3 * 0.18**2)
  np.testing.assert_allclose(stats["std"][0], std0, rtol=1e-5)


def test_encoder_returns_sequence_and_summary():
  encoder = TransformerEncoder(num_layers=2, num_heads=2, dropout=0.0)
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 8)), jnp.float32)
  (seq, summary, attention), _ = jax.jit(
      lambda key, x: encoder.init_with_output(key, x, (2, 3), train=False,
                                              return_attention=True))(_key(), tokens)
  assert seq.shape == (3, 7, 8) and summary.shape == (3, 8) and attention.shape == (3, 2, 2, 3)
  np.testing.assert_array_equal(summary, seq[:, -1])
  with pytest.raises(ValueError, match="grid_shape"):
    jax.eval_shape(lambda x: encoder.init(_key(), x, (2, 2), train=False), tokens)


def test_from_config():
  config = ml_collections.ConfigDict(dict(TINY, cnn_features=[8, 16]))
  model = Astra.from_config(config, "bfloat16")
  assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
  assert model.cnn_features == (8, 16) and model.dim == 32
  assert Astra.from_config({"dim": 64}).dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown.*num_layer"):
    Astra.from_config({"num_layer": 3})


# ---------------------------------------------------------------- photometry token, PDF median


def _aperture_fluxes(batch=2, seed=0):
  """(batch, 5, 5) positive nanomaggies growing with the aperture, as photometry gives them."""
  rng = np.random.default_rng(seed)
  growth = np.array([0.3, 0.6, 0.85, 0.95, 1.0])
  total = rng.uniform(2.0, 50.0, size=(batch, BANDS, 1))
  return jnp.asarray(total * growth[None, None, :], jnp.float32)


def test_photometry_token_shapes_and_needs_fluxes():
  model = Astra(**TINY, photometry_token=True, amplitude="aperture_spectrum")
  images, fluxes = _images(), _aperture_fluxes()
  params = _init(model, images, fluxes, train=False)
  assert params["photometry"]["hidden"]["kernel"].shape == (photometry.NUM_FEATURES, TINY["dim"])
  out, state = _apply(model, train=False, return_attention=True, mutable=["intermediates"])(
      params, images, fluxes)
  assert out["spectrum"].shape == (2, 4000) and out["log_norm"].shape == (2,)
  assert out["z_logits"].shape == (2, 20) and out["attention"].shape == (2, 4, 4, 4)
  # 16 patch tokens + the photometry token + the summary token.
  (weights,) = state["intermediates"]["encoder"]["block_0"]["attention_weights"]
  assert weights.shape == (2, 4, 18, 18)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  # The fluxes change the outputs; a model that uses them refuses to run without them.
  other, _ = _apply(model, train=False, return_attention=True, mutable=["intermediates"])(
      params, images, fluxes * 3.0)
  assert float(jnp.max(jnp.abs(other["z_logits"] - out["z_logits"]))) > 1e-6
  with pytest.raises(ValueError, match="aperture_fluxes"):
    model.apply({"params": params}, images, train=False)
  # A model without the options ignores them (same params with or without fluxes).
  plain = Astra(**TINY)
  plain_params = _init(plain, images, train=False)
  np.testing.assert_array_equal(plain.apply({"params": plain_params}, images, train=False)["z_logits"],
                                plain.apply({"params": plain_params}, images, fluxes, train=False)["z_logits"])


def test_photometry_to_heads_reaches_the_heads_without_the_encoder():
  model = Astra(**TINY, photometry_to_heads=True)
  images, fluxes = _images(), _aperture_fluxes()
  params = _init(model, images, fluxes, train=False)
  # The heads read [summary token, photometry embedding]: 2 dim features.
  assert params["redshift"]["hidden"]["kernel"].shape[0] == 2 * TINY["dim"]
  assert params["decoder"]["hidden"]["kernel"].shape[0] == 2 * TINY["dim"]
  out = model.apply({"params": params}, images, fluxes, train=False)
  # No photometry token: the encoder never sees the fluxes, so only the skip can carry them.
  other = model.apply({"params": params}, images, fluxes * 3.0, train=False)
  assert float(jnp.max(jnp.abs(other["z_logits"] - out["z_logits"]))) > 1e-6
  assert float(jnp.max(jnp.abs(other["spectrum"] - out["spectrum"]))) > 1e-6
  with pytest.raises(ValueError, match="aperture_fluxes"):
    model.apply({"params": params}, images, train=False)


def test_aperture_amplitude_is_relative_to_the_r_band_3_arcsec_flux():
  model = Astra(**TINY, amplitude="aperture")
  images, fluxes = _images(), _aperture_fluxes()
  params = _init(model, images, fluxes, train=False)
  # With the head's output layer zeroed, log_norm is the aperture's own estimate.
  params = _zero_leaves(params, ["log_norm"])
  out = model.apply({"params": params}, images, fluxes, train=False)
  r3 = np.asarray(fluxes)[:, 1, 1]
  np.testing.assert_allclose(out["log_norm"], np.log10(astra_lib.NMGY_TO_FLAM_R * r3), rtol=1e-5)
  np.testing.assert_allclose(astra_lib.aperture_log_norm(-fluxes),
                             np.log10(astra_lib.NMGY_TO_FLAM_R * 0.1), rtol=1e-6)


def test_aperture_spectrum_amplitude_gives_the_spectrum_the_aperture_r_flux():
  model = Astra(**TINY, amplitude="aperture_spectrum")
  images, fluxes = _images(), _aperture_fluxes()
  params = _zero_leaves(_init(model, images, fluxes, train=False), ["log_norm"])
  # A known normalised spectrum: the decoder's output layer emits its bias alone.
  wave = np.asarray(grid.wavelength())
  shape = (wave / 6000.0) ** -1.5                  # Blue in f_lambda: not a flat f_nu.
  params["decoder"]["spectrum"]["kernel"] = jnp.zeros_like(params["decoder"]["spectrum"]["kernel"])
  params["decoder"]["spectrum"]["bias"] = jnp.asarray(shape, jnp.float32)
  out = model.apply({"params": params}, images, fluxes, train=False)
  flux = np.asarray(losses.denormalise(out["spectrum"], out["log_norm"]), np.float64)
  # Through speclite's PS1 r curve the predicted spectrum has the r aperture's flux (nanomaggies).
  import astropy.units as u
  import speclite.filters
  r = speclite.filters.load_filters("panstarrs-r").get_ab_maggies(
      flux * 1e-17 * u.erg / (u.s * u.cm**2 * u.AA), wave * u.AA)["panstarrs-r"]
  np.testing.assert_allclose(np.asarray(r) * 1e9, np.asarray(fluxes)[:, 1, 1], rtol=2e-3)
  # That anchor differs from the flat-f_nu one for this colour, and has no gradient into the
  # spectrum (the normalisation loss must not bend the shape).
  assert np.all(np.abs(out["log_norm"] - astra_lib.aperture_log_norm(fluxes)) > 0.01)
  grad = jax.grad(lambda s: jnp.sum(astra_lib.spectrum_log_norm(fluxes, s)))(out["spectrum"])
  assert float(jnp.max(jnp.abs(grad))) == 0.0
  # A spectrum with no r flux is floored: finite log_norm.
  zero = astra_lib.spectrum_log_norm(fluxes, jnp.zeros_like(out["spectrum"]))
  assert bool(jnp.all(jnp.isfinite(zero)))
  with pytest.raises(ValueError, match="amplitude"):
    Astra(**TINY, amplitude="flat")


def test_binned_amplitude_reads_the_pdf_estimate_on_top_of_its_anchor():
  images, fluxes = _images(), _aperture_fluxes()
  model = Astra(**TINY, amplitude="aperture_spectrum", amplitude_bins=40,
                amplitude_estimate="mode")
  params = _init(model, images, fluxes, train=False)
  centers = model.amplitude_centers()
  assert centers.shape == (40,) and np.allclose(np.diff(centers), 0.05)
  assert np.isclose(centers[0] - 0.025, astra_lib.AMPLITUDE_RANGE_DEX[0])
  # Logits that are the bias alone, peaked at bin 30 for every galaxy; a second, lower peak at 5.
  bias = np.full(40, -5.0, np.float32)
  bias[30], bias[5] = 3.0, 2.5
  assert "log_norm" not in params["decoder"]      # The amplitude has its own head.
  head = params["amplitude"]["logits"]
  params["amplitude"]["logits"] = dict(kernel=jnp.zeros_like(head["kernel"]),
                                       bias=jnp.asarray(bias))
  out = model.apply({"params": params}, images, fluxes, train=False)
  assert out["log_norm_logits"].shape == (2, 40)
  np.testing.assert_allclose(out["log_norm_anchor"],
                             astra_lib.spectrum_log_norm(fluxes, out["spectrum"]), rtol=1e-6)
  np.testing.assert_allclose(out["log_norm"] - out["log_norm_anchor"], centers[30], atol=1e-6)
  # The mean lands between the two peaks; the mode, and here the median (the likelier peak
  # holds 62 % of the mass), on the likelier one.
  def estimate(name):
    out = model.clone(amplitude_estimate=name).apply({"params": params}, images, fluxes,
                                                     train=False)
    return np.asarray(out["log_norm"] - out["log_norm_anchor"])
  gap = estimate("mean")
  assert np.all((gap > centers[5] + 0.1) & (gap < centers[30] - 0.1))
  assert np.all(np.abs(estimate("median") - centers[30]) <= 0.025)
  with pytest.raises(ValueError, match="aperture anchor"):
    Astra(**TINY, amplitude_bins=40)
  with pytest.raises(ValueError, match="amplitude_estimate"):
    Astra(**TINY, amplitude="aperture", amplitude_bins=40, amplitude_estimate="max")


def test_fiber_input_moves_the_amplitude_alone():
  images, fluxes = _images(), _aperture_fluxes()
  model = Astra(**TINY, photometry_to_heads=True, amplitude="aperture_spectrum",
                amplitude_bins=40, fiber_input=True)
  sdss, boss = jnp.full((2,), 3.0), jnp.full((2,), 2.0)
  params = _init(model, images, fluxes, sdss, train=False)
  assert params["fiber"]["kernel"].shape == (1, 2 * TINY["dim"])
  out = model.apply({"params": params}, images, fluxes, sdss, train=False)
  other = model.apply({"params": params}, images, fluxes, boss, train=False)
  # The amplitude's PDF reads the fiber; the redshift and the spectrum's shape do not.
  assert float(jnp.max(jnp.abs(other["log_norm_logits"] - out["log_norm_logits"]))) > 1e-4
  for key in ("z_logits", "spectrum", "log_norm_anchor"):
    np.testing.assert_array_equal(other[key], out[key])
  # Its input is the summary plus (diameter - 2.5 arcsec) times a learnt vector: none at 2.5.
  no_fiber = dict(params, fiber=dict(kernel=jnp.zeros_like(params["fiber"]["kernel"])))
  middle = model.apply({"params": params}, images, fluxes, jnp.full((2,), 2.5), train=False)
  np.testing.assert_allclose(
      middle["log_norm_logits"],
      model.apply({"params": no_fiber}, images, fluxes, sdss, train=False)["log_norm_logits"],
      atol=1e-6)
  with pytest.raises(ValueError, match="fiber_diameter"):
    model.apply({"params": params}, images, fluxes, train=False)
  with pytest.raises(ValueError, match="amplitude_bins"):
    Astra(**TINY, amplitude="aperture", fiber_input=True)


def test_photometry_embed_reads_the_baselines_standardised_features():
  fluxes = np.array(_aperture_fluxes(batch=3, seed=4))
  fluxes[2, 4, 4] = np.nan                                 # NaN counts as a floored flux.
  expected = photometry.features(np.nan_to_num(fluxes))
  np.testing.assert_allclose(photometry.features(jnp.asarray(fluxes), xp=jnp), expected,
                             atol=1e-4)
  # Standardised by (mean, scale): galaxy 0's features at the mean enter as zeros, so its
  # embedding is out(gelu(hidden's bias)); the others' are not.
  mean, scale = tuple(expected[0].tolist()), tuple((0.5 + np.arange(23) / 23).tolist())
  embed = astra_lib.PhotometryEmbed(8, mean, scale)
  params = embed.init(jax.random.PRNGKey(0), jnp.asarray(fluxes))["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)         # Non-zero biases.
  out = embed.apply({"params": params}, jnp.asarray(fluxes))
  h = jax.nn.gelu(params["hidden"]["bias"], approximate=False)
  at_mean = h @ params["out"]["kernel"] + params["out"]["bias"]
  np.testing.assert_allclose(out[0], at_mean, rtol=1e-5, atol=1e-6)
  x = (expected[1] - np.array(mean)) / np.array(scale)
  h = jax.nn.gelu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"], approximate=False)
  np.testing.assert_allclose(out[1], h @ params["out"]["kernel"] + params["out"]["bias"],
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="23 values each"):
    astra_lib.PhotometryEmbed(8, mean[:5], scale[:5]).init(jax.random.PRNGKey(0),
                                                           jnp.asarray(fluxes))


def test_pdf_median_matches_the_baselines_rule():
  from astra_jax import baselines
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 20)) * 3
  centers = z_bin_centers(20, 0.6)
  stats = z_pdf_stats(jnp.asarray(logits), centers)
  want = baselines.pdf_median(np.asarray(stats["pdf"], np.float64), np.linspace(0, 0.6, 21))
  np.testing.assert_allclose(stats["median"], want, atol=1e-5)
  # A spike in one bin: its centre.
  spike = np.full((1, 20), -50.0)
  spike[0, 7] = 50.0
  np.testing.assert_allclose(z_pdf_stats(jnp.asarray(spike), centers)["median"], centers[7],
                             atol=1e-6)
