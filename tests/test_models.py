"""Tests of the ASTRA Flax modules (tiny shapes, CPU).

Everything is jitted and initialised from "rbg" keys: on a small CPU, eager op-by-op dispatch and
threefry-based initialisers dominate the runtime (compile time), not the arithmetic.
"""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from astra_jax.models import (Astra, MultiHeadAttention, PatchCNN, TransformerBlock,
                              TransformerEncoder, patch_grid, sincos_2d, z_bin_centers, z_pdf_stats)
from astra_jax.models.astra import PatchConv, patch_conv
from astra_jax.models import common
from astra_jax.models.common import Dense
from astra_jax.models.transformer import QKVProjection, keep_mask, unstack

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
  apply = _apply(block, train=False)
  y, weights = apply(params, x)
  assert weights.shape == (2, 4, 7, 7)
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
    return apply(images), apply(images), apply(bumped), jax.grad(loss, argnums=(0, 1))(params, images)

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


@pytest.mark.parametrize("shape,kernel_size", [((3, 8, 8, 5), 3), ((3, 16, 4), 3),
                                               ((2, 6, 6, 3), 2), ((2, 7, 4), 5), ((2, 2, 3), 7)])
def test_patch_conv_is_nn_conv(shape, kernel_size):
  # A SAME convolution with nn.Conv's parameters, initialisers, values and gradients (its
  # backward pass is the im2col matmul's, its forward pass the native convolution).
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  conv = PatchConv(6, kernel_size)
  reference = nn.Conv(6, (kernel_size,) * (len(shape) - 2), padding="SAME")
  weights = jnp.asarray(np.random.default_rng(1).normal(size=shape[:-1] + (6,)), jnp.float32)

  @jax.jit
  def run(key, x):
    params, ref_params = conv.init(key, x), reference.init(key, x)
    grad = lambda f: jax.grad(lambda p, x: jnp.sum(weights * f(p, x) ** 2), argnums=(0, 1))(
        params, x)
    apply = [lambda p, x: conv.apply(p, x), lambda p, x: conv.apply(p, x, train=True),
             reference.apply]
    return params, ref_params, [f(params, x) for f in apply], [grad(f) for f in apply]

  params, ref_params, outs, grads = run(_key(), x)
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  assert float(jnp.max(jnp.abs(grads[0][1]))) > 0
  for out, grad in zip(outs[:2], grads[:2]):  # Inference and training ways, vs nn.Conv.
    np.testing.assert_allclose(out, outs[2], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grad,
                 grads[2])


@pytest.mark.parametrize("shape,kernel_size", [((2, 6, 6, 4), 3), ((3, 16, 8), 3), ((2, 9, 3), 2)])
@pytest.mark.parametrize("native", [True, False])
def test_bf16_patch_conv_gradients_are_bf16_products(shape, kernel_size, native):
  # bf16 operands: both gradients are the float32 sums of bf16 products with the cotangent
  # rounded to bf16, each rounded once to bf16, whichever way the forward pass ran.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(kernel_size,) * (len(shape) - 2) + (shape[-1], 5)) / 3,
                       jnp.bfloat16)
  out, vjp = jax.vjp(lambda x, k: patch_conv(x, k, native), x, kernel)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  d_x, d_kernel = jax.jit(vjp)(g)
  assert out.dtype == jnp.float32 and (d_x.dtype, d_kernel.dtype) == (jnp.bfloat16,) * 2
  # The reference: the float32 convolution of the same bf16 values, cotangent rounded to bf16
  # (float32 sums of exact products, ~1e-7 from the float64 ones).
  ref_out, ref_vjp = jax.vjp(lambda x, k: nn.Conv(5, kernel.shape[:-2], padding="SAME",
                                                  use_bias=False).apply({"params": {"kernel": k}}, x),
                             x.astype(jnp.float32), kernel.astype(jnp.float32))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  for got, expected in zip((d_x, d_kernel), ref_vjp(g.astype(jnp.bfloat16).astype(jnp.float32))):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2 ** -8,
                               atol=1e-3 * np.abs(expected).max())
  # Rounding the cotangent is what makes them bf16 products: the float32 cotangent's differs.
  exact = np.asarray(ref_vjp(g)[0], np.float64)
  assert np.abs(exact - np.asarray(ref_vjp(g.astype(jnp.bfloat16).astype(jnp.float32))[0])).max() > 0


def test_keep_mask_rate_and_independence():
  mask = lambda key: keep_mask(key, (1000, 1000), 0.9)
  masks = jax.jit(lambda k1, k2: (mask(k1), mask(k1), mask(k2)))
  m1, again, m2 = (np.asarray(m, np.float64) for m in masks(_key(1), _key(2)))
  np.testing.assert_array_equal(m1, again)  # A pure function of the key.
  # 1e6 Bernoulli(0.9) draws: std of the mean 3e-4, of a correlation 1e-3; 5 sigma.
  assert abs(m1.mean() - 0.9) < 1.5e-3 and abs(m2.mean() - 0.9) < 1.5e-3
  for a, b in [(m1, m2), (m1[:, :-1], m1[:, 1:]), (m1[:-1], m1[1:])]:
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5e-3
  # A window of the mask is the mask of those rows of the full tensor.
  full, rows = jax.jit(lambda k: (keep_mask(k, (3, 7, 5), 0.5),
                                  keep_mask(k, (3, 1, 5), 0.5, ((3, 7, 5), (0, 6, 0)))))(_key(3))
  np.testing.assert_array_equal(rows, full[:, 6:])


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
  # every token. Same outputs, in training (same dropout masks) and in evaluation.
  _, params, images, fns = tiny
  model = Astra(**TINY)
  full = _apply(model, train=True, mutable=["intermediates"])
  for seed in (1, 2):
    out, _ = full(params, images, rng=_key(seed))
    short = fns["train"](params, images, rng=_key(seed))
    for key in ("spectrum", "log_norm", "z_logits"):
      np.testing.assert_allclose(short[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)
  out, _ = fns["eval"](params, images)
  short = _apply(model, train=False, return_attention=True)(params, images)
  for key in out:
    np.testing.assert_allclose(short[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_qkv_projection_is_dense_general():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)), jnp.float32)
  qkv, reference = QKVProjection(num_heads=4, head_dim=4), nn.DenseGeneral((3, 4, 4))

  @jax.jit
  def run(key):
    params = qkv.init(key, x)
    q, k, v = qkv.apply(params, x)
    last = qkv.apply(params, x, last_query_only=True)
    return params, reference.init(key, x), (q, k, v), reference.apply(params, x), last

  params, ref_params, (q, k, v), expected, (q1, k1, v1) = run(_key())
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  for i, got in enumerate((q, k, v)):
    np.testing.assert_allclose(got, expected[:, :, i], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(q1, q[:, -1:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(k1, k, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v1, v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unstack_has_the_gradient_of_slicing(dtype):
  # unstack's backward pass stacks the cotangents where slicing pads and sums them: the same
  # values, bit for bit, also in bf16 and with a slice left unused (a zero cotangent).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), dtype)
  w = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)
  used = (0, 2)

  def loss(x, split):
    parts = split(x)
    return sum(jnp.sum(jnp.sin(parts[i].astype(jnp.float32)) * w[i]) for i in used)

  by_slicing = lambda x: [x[:, :, i] for i in range(3)]
  out, grad = jax.jit(jax.value_and_grad(lambda x: loss(x, lambda x: unstack(x, 2))))(x)
  expected_out, expected = jax.jit(jax.value_and_grad(lambda x: loss(x, by_slicing)))(x)
  assert grad.dtype == dtype and grad.shape == x.shape
  np.testing.assert_array_equal(out, expected_out)
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(expected, np.float32))
  assert np.all(np.asarray(grad[:, :, 1], np.float32) == 0)
  assert np.all(np.asarray(grad[:, :, 0], np.float32) != 0)


@pytest.mark.parametrize("in_axes,reference", [(1, nn.Dense(6)),
                                                (2, nn.DenseGeneral(6, axis=(-2, -1)))])
def test_dense_is_flax_dense(in_axes, reference):
  # Float32: nn.Dense's / nn.DenseGeneral's parameters, initial values, outputs and gradients.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4, 3)), jnp.float32)
  dense = Dense(6, in_axes=in_axes)

  @jax.jit
  def run(key):
    params, ref_params = dense.init(key, x), reference.init(key, x)
    shifted = jax.tree.map(lambda p: p + 0.5, ref_params)  # Non-zero biases.
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x)))
    return (params, ref_params, dense.apply(shifted, x), reference.apply(shifted, x),
            jax.grad(loss(dense.apply))(shifted), jax.grad(loss(reference.apply))(shifted))

  params, ref_params, out, expected, grads, ref_grads = run(_key())
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads,
               ref_grads)


def test_dense_bf16_rounds_once_after_the_bias():
  # bf16: operands rounded to bf16, product and bias summed in float32, then one rounding, so a
  # bias that a bf16 output could not carry beside the product still moves the result.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  params = {"params": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=16) * 1e-2 + 0.3, jnp.float32)}}
  out = Dense(16, dtype=jnp.bfloat16).apply(params, x)
  assert out.dtype == jnp.bfloat16
  as_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)
  product = as_bf16(x) @ as_bf16(params["params"]["kernel"])
  expected = as_bf16((product + np.asarray(params["params"]["bias"], np.float64)))
  twice = as_bf16(as_bf16(product) + as_bf16(params["params"]["bias"]))
  got = np.asarray(out, np.float64)
  # float32 accumulation order can move a result across a rounding boundary, rarely.
  assert np.mean(got == expected) > 0.99
  assert np.mean(got != twice) > 0.05  # Rounding before the bias would differ this often.


@pytest.mark.parametrize("subscripts,shape_a,shape_b", [
    ("mk,kn->mn", (12, 8), (8, 6)),                    # every Dense (cotangent the smaller)
    ("mk,kn->mn", (12, 4), (4, 8)),                    # every Dense (input the smaller)
    ("bqhd,bkhd->bhqk", (2, 5, 2, 4), (2, 5, 2, 4)),   # attention logits
    ("bhqk,bkhd->bqhd", (2, 2, 5, 5), (2, 5, 2, 4)),   # attention-weighted values
    ("grk,kn->grn", (3, 7, 6), (6, 4)),                # a 3-D operand
])
def test_bf16_einsum_gradients_are_bf16_products(subscripts, shape_a, shape_b):
  # The bf16 forward product accumulates in float32; the gradients are the float32 products of
  # the bf16 operands with the cotangent rounded to bf16, returned in bf16 (common._einsum_f32).
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.bfloat16) for s in (shape_a, shape_b))
  out, vjp = jax.vjp(lambda a, b: common._einsum_f32(subscripts, a, b), a, b)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  da, db = jax.jit(vjp)(g)
  f64 = lambda x: np.asarray(x, np.float64)
  ins, res = subscripts.split("->")
  sub_a, sub_b = ins.split(",")
  g16 = f64(g.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32 and (da.dtype, db.dtype) == (jnp.bfloat16,) * 2
  np.testing.assert_allclose(f64(out), np.einsum(subscripts, f64(a), f64(b)), rtol=1e-5,
                             atol=1e-5)
  # Each gradient is rounded once to bf16 (2^-9 relative) from its float32 sum.
  for got, spec, other in ((da, f"{res},{sub_b}->{sub_a}", b), (db, f"{res},{sub_a}->{sub_b}", a)):
    expected = np.einsum(spec, g16, f64(other))
    np.testing.assert_allclose(f64(got), expected, rtol=2 ** -8, atol=1e-3 * np.abs(expected).max())
  # Rounding the cotangent is what makes them bf16 products: the float32 cotangent's gradient
  # differs.
  exact = np.einsum(f"{res},{sub_b}->{sub_a}", f64(g), f64(b))
  assert np.abs(np.einsum(f"{res},{sub_b}->{sub_a}", g16, f64(b)) - exact).max() > 0


@pytest.mark.parametrize("shape_a,shape_b", [((12, 8), (8, 6)), ((3, 4, 5), (5, 7))])
def test_float32_dot_gradients_match_autodiff(shape_a, shape_b):
  # float32 Dense products take `_einsum_f32`'s gradient forms too: same values as autodiff's.
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (shape_a, shape_b))
  dims = (((a.ndim - 1,), (0,)), ((), ()))
  g = jnp.asarray(rng.normal(size=shape_a[:-1] + shape_b[1:]), jnp.float32)
  got = jax.jit(jax.vjp(lambda a, b: common.dot_f32(a, b, dims), a, b)[1])(g)
  expected = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), a, b)[1](g)
  for x, y in zip(got, expected):
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_bf16_backward_pass_multiplies_bf16_by_bf16(monkeypatch):
  # With bf16 matmul hardware every matmul of the backward pass multiplies two bf16 operands: a
  # float32 cotangent times a bf16 operand is widened to a float32 matmul by XLA:CPU (half the
  # bf16 rate on an AVX512-BF16 CPU: the seed-size bf16 step took the float32 step's time).
  monkeypatch.setattr(common, "native_bf16_matmul", lambda: True)
  model = Astra(**TINY, dtype=jnp.bfloat16)
  images = _images()
  params = jax.eval_shape(lambda: model.init(_key(), images, train=False))["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, images, train=True,
                                        rngs={"dropout": _key()})["spectrum"] ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  dots = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  mixed = [d for d in dots if len(set(d)) > 1]
  assert not mixed, mixed
  # Forward and backward: the transformer's and the patch CNN's matmuls (the heads run in float32).
  assert dots.count(("bfloat16", "bfloat16")) >= 3 * 6


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
      lambda key, x: encoder.init_with_output(key, x, (2, 3), train=False))(_key(), tokens)
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


def test_jitted_bf16_model_rounds_where_the_code_does():
  # With common.COMPILER_OPTIONS the jitted bf16 model is the one written, bit for bit the same as
  # an op-by-op run; XLA's default excess precision kept values in float32 across roundings the
  # code asks for (outputs up to 1e-2 apart in a model of this size, jax 0.10.2).
  model = Astra(**{**TINY, "patch_embedding": "conv1d"}, dtype=jnp.bfloat16)
  images = _images()
  params = _init(model, images, train=False)
  apply = lambda p, x: model.apply({"params": p}, x, train=False)
  jitted = jax.jit(apply, compiler_options=common.COMPILER_OPTIONS)(params, images)
  with jax.disable_jit():
    eager = apply(params, images)
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)
