"""The data-parallel train step, checkpoints and a whole tiny training run."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from astra_jax import baselines
from astra_jax import checkpoint
from astra_jax import grid
from astra_jax import losses
from astra_jax import photometry
from astra_jax import sharding
from astra_jax import train
from experiments.configs import baseline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  config = baseline.get_config("tiny")
  config.model.dropout = 0.0  # Dropout masks are drawn per device; 1 vs N devices must match.
  for k, v in overrides.items():
    config[k] = v
  # The photometry standardisation a training run measures, here on fake_batch's fluxes (the
  # raw features include ~20 mag magnitudes, which scale the float32 noise of the 1-vs-N
  # comparisons up).
  fluxes = fake_batch(config)["aperture_fluxes"]
  mean, std = photometry.feature_statistics(photometry.features(fluxes))
  config.model.photometry_mean, config.model.photometry_scale = tuple(mean), tuple(std)
  return config


def fake_batch(config, seed=0):
  """A global batch in which devices hold different numbers of counting examples."""
  rng = np.random.default_rng(seed)
  b = config.batch_size
  weight = np.ones((b, grid.NUM_PIXELS), np.float32)
  weight[1] = 0.0                      # A galaxy with no valid pixel counts in no spectrum term.
  weight[:, :300] = 0.0
  has_z = np.array([True, True, True, False, False, True, False, False])[:b]
  return {
      "image": rng.normal(size=(b, *train.image_shape(config))).astype(np.float32),
      "aperture_fluxes": rng.uniform(1.0, 30.0, size=(b, *train.aperture_fluxes_shape(config))
                                     ).astype(np.float32),
      "fiber_diameter": np.where(np.arange(b) % 3 == 0, 2.0, 3.0).astype(np.float32),
      "flux": (5 + rng.normal(size=(b, grid.NUM_PIXELS))).astype(np.float32),
      "weight": weight,
      "z": rng.uniform(0.02, 0.4, size=b).astype(np.float32),
      "has_z": has_z,
  }


def run_steps(config, devices, batches, tx=None):
  mesh = sharding.create_mesh(devices)
  model = train.make_model(config)
  tx = tx or train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, tx, mesh)
  rng = jax.random.key(config.seed)
  metrics = []
  for batch in batches:
    state, m = step(state, sharding.to_global(batch, mesh), rng)
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics, step


def test_four_devices_equal_one_device():
  assert jax.device_count() == 4, "conftest should fake 4 CPU devices"
  config = tiny_config()
  batches = [fake_batch(config, 0), fake_batch(config, 1)]
  # Plain SGD makes the parameters a linear read-out of the averaged gradients. (Adam's first
  # steps are ~lr * sign(g), which turns float32 summation-order noise in gradients that cancel
  # to ~0 into differences of order lr; the step itself does not depend on the optimizer.)
  sgd = optax.sgd(0.5)
  state1, metrics1, _ = run_steps(config, jax.devices()[:1], batches, tx=sgd)
  state4, metrics4, _ = run_steps(config, jax.devices(), batches, tx=sgd)
  assert int(state1.step) == int(state4.step) == 2
  # Tolerance: float32 sums in another order: ~1e-6 relative on the metrics, ~5e-7 absolute on
  # parameters that the two steps move by up to ~1e-1.
  for m1, m4 in zip(metrics1, metrics4):
    for k in ("loss", "loss_spectrum", "loss_norm", "loss_redshift", "grad_norm"):
      np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6),
               state1.params, state4.params)

  # And the update really moved the parameters (the comparison above is not vacuous).
  init = train.init_state(config, train.make_model(config), train.make_optimizer(config),
                          sharding.create_mesh(jax.devices()[:1]))
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       init.params, state4.params)
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_loss_grad_norms_are_each_parts_gradient_on_the_shared_layers():
  config = tiny_config(norm_loss_weight=0.0, z_loss_weight=2.0)
  model = train.make_model(config)
  batch = fake_batch(config)
  params = jax.device_get(train.init_state(config, model, train.make_optimizer(config),
                                           sharding.create_mesh(jax.devices()[:1])).params)

  def part(shared, name):  # The part as training weighs it, on the whole batch, one device.
    outputs = model.apply({"params": {**params, **shared}}, batch["image"],
                          batch["aperture_fluxes"], batch["fiber_diameter"], train=False)
    _, parts = losses.combine_terms(
        losses.loss_terms(outputs, batch, **train.loss_options(config, model)), z_weight=2.0,
        norm_weight=0.0)
    return {"spectrum": 1.0, "redshift": 2.0}[name] * parts[name]

  shared = {k: params[k] for k in train.SHARED_PARAMS if k in params}
  assert set(shared) == {"embed", "photometry", "encoder"}
  want = {name: float(optax.tree.norm(jax.grad(part)(shared, name)))
          for name in ("spectrum", "redshift")}
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.create_mesh(devices)
    got = jax.device_get(train.make_loss_grad_norms(config, model, mesh)(
        params, sharding.to_global(batch, mesh)))
    assert got["grad_norm_norm"] == 0.0          # Weight 0: no gradient.
    for name, value in want.items():
      assert value > 1e-3
      np.testing.assert_allclose(got[f"grad_norm_{name}"], value, rtol=1e-4, err_msg=name)


def test_step_compiles_once_and_loss_falls():
  config = tiny_config(learning_rate=3e-3, warmup_steps=1, num_train_steps=30)
  batch = fake_batch(config)
  _, metrics, step = run_steps(config, jax.devices(), [batch] * 12)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
  assert all(m["finite"] == 1.0 for m in metrics)


def test_non_finite_batch_does_not_touch_the_parameters():
  config = tiny_config()
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  before = jax.device_get(state)
  batch = fake_batch(config)
  batch["image"][2, 0, 0, 0] = np.nan
  state, metrics = train.make_train_step(config, model, tx, mesh)(
      state, sharding.to_global(batch, mesh), jax.random.key(0))
  assert float(metrics["finite"]) == 0.0
  # Skipped on the device: parameters and Adam's moments unchanged; the step counts the batch.
  assert int(state.step) == 1
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
  jax.tree.map(np.testing.assert_array_equal, before.opt_state, after.opt_state)


class _Writer:
  def __init__(self):
    self.lines = []

  def write(self, step, split, metrics):
    self.lines.append((step, split, metrics))


class _Bar:
  postfix_values = {}

  def set_postfix(self, *args, **kwargs):
    pass


def test_nonfinite_steps_are_counted_at_log_steps_and_a_stuck_run_stops():
  config = tiny_config(log_every_steps=2, num_train_steps=100)
  config.max_consecutive_nonfinite_steps = 4
  writer = _Writer()
  log = train._TrainLog(writer, _Bar(), config, start=0)  # pylint: disable=protected-access
  metric = lambda ok: {"loss": jnp.float32(1.0 if ok else np.nan), "grad_norm": jnp.float32(1.0),
                       "finite": jnp.float32(ok)}
  for step, ok in enumerate([1, 0, 1, 1, 0, 0, 0], start=1):
    log.add(step, metric(ok))
  # One line per log step, with the number of non-finite steps since the previous line.
  assert [(s, m["nonfinite_steps"]) for s, _, m in writer.lines] == [(2, 1.0), (4, 0.0), (6, 2.0)]
  with pytest.raises(FloatingPointError, match=r"4 consecutive steps 5\.\.8"):
    log.add(8, metric(0))
  assert writer.lines[-1][0] == 8 and writer.lines[-1][2]["nonfinite_steps"] == 2.0


def test_invalid_config_names_field_and_allowed_values():
  config = tiny_config()
  config.dtype = "float16"
  with pytest.raises(ValueError, match=r"config\.dtype='float16'.*'float32', 'bfloat16'"):
    train.validate_config(config)
  for batch_size, suggestion in ((6, "e.g. 4 or 8"), (2, "e.g. 4 or 8"), (10, "e.g. 8 or 12")):
    config = tiny_config(batch_size=batch_size)
    with pytest.raises(ValueError, match=rf"config\.batch_size={batch_size} is invalid.*multiple "
                       rf"of the device count 4 \(1 process\(es\) x 4 local device\(s\)\), with at "
                       rf"least 1 example per device; {suggestion}"):
      train.validate_config(config)
  for batch_size in (4, 12):  # Any per-device batch >= 1.
    train.validate_config(tiny_config(batch_size=batch_size))
  config = tiny_config(norm_loss="absolute")     # The tiny config's binned amplitude head ...
  with pytest.raises(ValueError, match=r"config\.norm_loss='absolute'.*amplitude_bins"):
    train.validate_config(config)
  config.model.amplitude_bins = 0                 # ... is a regression again: consistent.
  train.validate_config(config)


def restore_or_init(latest, config, mesh):
  """`checkpoint.restore_or_init` as training calls it, for `config`'s model and optimiser."""
  model, tx = train.make_model(config), train.make_optimizer(config)
  return checkpoint.restore_or_init(latest, train.abstract_state(config, model, tx, mesh),
                                    lambda: train.init_state(config, model, tx, mesh))


def test_checkpoint_restores_identically_in_a_fresh_process(tmp_path):
  config = tiny_config()
  state, _, _ = run_steps(config, jax.devices(), [fake_batch(config)])
  latest, _ = checkpoint.checkpoint_managers(str(tmp_path), config)
  latest.save(1, args=ocp.args.StandardSave(state))
  latest.wait_until_finished()
  np.savez(tmp_path / "expected.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from astra_jax import checkpoint, sharding, train
      from experiments.configs import baseline
      config = baseline.get_config("tiny")
      config.model.dropout = 0.0
      mesh = sharding.create_mesh()
      model, tx = train.make_model(config), train.make_optimizer(config)
      latest, _ = checkpoint.checkpoint_managers({str(tmp_path)!r}, config)
      state = checkpoint.restore_or_init(latest, train.abstract_state(config, model, tx, mesh),
                                         lambda: train.init_state(config, model, tx, mesh))
      np.savez({str(tmp_path / 'restored.npz')!r}, *[np.asarray(x) for x in jax.tree.leaves(state)])
  """)
  env = dict(os.environ, PYTHONPATH=REPO)
  subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=env, timeout=300)
  expected, restored = np.load(tmp_path / "expected.npz"), np.load(tmp_path / "restored.npz")
  assert len(expected.files) == len(restored.files) > 10
  for name in expected.files:
    np.testing.assert_array_equal(restored[name], expected[name])
    assert restored[name].dtype == expected[name].dtype


def test_checkpoints_of_the_earlier_uncompressed_format_still_restore(tmp_path):
  # Until this change, training wrote every array as its own uncompressed zarr folder (no OCDBT,
  # no zstd); Orbax reads the format from each checkpoint, so such runs resume bit for bit.
  config = tiny_config()
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  state = state.replace(params=jax.tree.map(lambda p: p + 0.5, state.params))
  earlier = ocp.CheckpointManager(
      str(tmp_path / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True),
      item_handlers=ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False))
  earlier.save(3, args=ocp.args.PyTreeSave(state))
  earlier.wait_until_finished()
  assert (tmp_path / "checkpoints" / "3" / "default" / "params.decoder.spectrum.kernel"
          / ".zarray").exists()
  latest, _ = checkpoint.checkpoint_managers(str(tmp_path), config)
  restored = restore_or_init(latest, config, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_checkpoint_of_another_model_is_refused_naming_the_arrays(tmp_path):
  config = tiny_config()
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  latest, _ = checkpoint.checkpoint_managers(str(tmp_path), config)
  latest.save(1, args=ocp.args.StandardSave(state))
  latest.wait_until_finished()

  wider = tiny_config()
  wider.model.dim = 48
  deeper = tiny_config()
  deeper.model.num_layers = 2
  for other, expected in [
      (wider, "params.embed.proj.bias: stored (32,), expected (48,)"),
      (deeper, "params.encoder.block_1.attn.out.bias: missing from the checkpoint")]:
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not fit") as error:
      restore_or_init(latest, other, mesh)
    assert expected in error.value.differences
    message = str(error.value)
    assert message.startswith(str(tmp_path / "checkpoints" / "1"))
    assert error.value.differences[0] in message
    assert f"{len(error.value.differences)} difference(s)" in message
    assert os.path.join(str(tmp_path), "config.json") in message

  # The differences as listed: none for the state saved, arrays it lacks, arrays it has more.
  target = train.abstract_state(config, model, tx, mesh)
  deeper_target = train.abstract_state(deeper, train.make_model(deeper),
                                       train.make_optimizer(deeper), mesh)
  stored = latest.metadata(1).item_metadata
  assert checkpoint.checkpoint_differences(stored, target) == []
  assert any(d.endswith("not expected")
             for d in checkpoint.checkpoint_differences(stored, target.replace(
                 params={k: v for k, v in target.params.items() if k != "redshift"})))
  assert all(d.endswith("missing from the checkpoint")
             for d in checkpoint.checkpoint_differences(stored, deeper_target))

  # Only names and shapes must agree: Orbax casts a moment saved in float32 to bfloat16.
  narrower = tiny_config(adam_mu_dtype="bfloat16")
  restored = restore_or_init(latest, narrower, mesh)
  assert {str(x.dtype) for x in jax.tree.leaves(restored.opt_state)} == {
      "bfloat16", "float32", "int32"}


def test_damaged_checkpoint_is_refused_naming_the_step_to_resume_from(tmp_path):
  config = tiny_config()
  mesh = sharding.create_mesh()
  state = train.init_state(config, train.make_model(config), train.make_optimizer(config), mesh)
  latest, _ = checkpoint.checkpoint_managers(str(tmp_path), config)
  for step in (1, 2):
    latest.save(step, args=ocp.args.StandardSave(state))
  latest.wait_until_finished()
  checkpoints = tmp_path / "checkpoints"
  folder = checkpoints / "2"

  def refused():
    latest, _ = checkpoint.checkpoint_managers(str(tmp_path), config)
    with pytest.raises(checkpoint.CheckpointDamagedError) as error:
      restore_or_init(latest, config, mesh)
    message = str(error.value)
    assert message.startswith(f"{folder}: the checkpoint is damaged")
    assert f"Move {folder} out of {checkpoints} to resume from step 1" in message
    return error.value

  # A copy cut short: the largest file of the step is array data (in Orbax's OCDBT files).
  data = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  original = data.read_bytes()
  data.write_bytes(original[:100])
  (problem,) = refused().problems
  assert re.search(r'Error reading "params\.[\w.]+/', problem), problem  # TensorStore's words.
  data.write_bytes(original)
  # Metadata that does not parse.
  (metadata,) = folder.rglob("_METADATA")
  text = metadata.read_text()
  metadata.write_text("{not json")
  (problem,) = refused().problems
  assert problem.startswith("unreadable metadata: "), problem
  metadata.write_text(text)
  latest, _ = checkpoint.checkpoint_managers(str(tmp_path), config)
  restored = restore_or_init(latest, config, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


@pytest.mark.slow
def test_train_and_evaluate_end_to_end_and_resume(tmp_path):
  config = baseline.get_config("tiny")
  config.mock_cache_dir = str(tmp_path / "cache")
  config.log_loss_grad_norms = True
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  scalars = results["scalars"]
  for key in ("spectrum_r2", "spectrum_mse", "z_median_sigma_mad", "z_median_outlier_fraction",
              "z_median_bias", "z_mean_sigma_mad", "z_crps"):
    assert key in scalars and np.isfinite(scalars[key]), key
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| ASTRA | mean spectrum | colour kNN |" in table and "sigma_MAD" in table
  compared = json.load(open(os.path.join(workdir, "results.json")))["results"]
  assert set(compared) == {"ASTRA", "mean spectrum", "colour kNN", "photo trees", "photo MLP"}
  assert compared["ASTRA"] == pytest.approx(scalars, nan_ok=True)
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["dim"] == config.model.dim and saved["data_dir"]
  # The photometry embedding's standardisation: the training split's feature statistics,
  # kept in config.json for restoring and predicting.
  fluxes = baselines.load_split(saved["data_dir"], "train")[photometry.KEY]
  mean, std = photometry.feature_statistics(photometry.features(fluxes))
  np.testing.assert_allclose(saved["model"]["photometry_mean"], mean, atol=2e-6)
  np.testing.assert_allclose(saved["model"]["photometry_scale"], std, atol=2e-6)
  assert len(mean) == photometry.NUM_FEATURES and np.all(std > 1e-3)
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4]
  assert all(l["grad_norm_spectrum"] > 0 and l["grad_norm_redshift"] > 0
             for l in lines if l["split"] == "train")
  assert {l["split"] for l in lines} == {"train", "validation", "test"}
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  # The same command with more steps resumes at step 4 instead of starting over.
  config.num_train_steps = 6
  train.train_and_evaluate(config, workdir)
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines if l["split"] == "train"] == [1, 2, 3, 4, 5, 6]

  # Another model cannot resume it, and the config.json its checkpoints were saved with stays.
  saved = open(os.path.join(workdir, "config.json")).read()
  config.model.dim = 48
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"To resume .*config\.json"):
    train.train_and_evaluate(config, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == saved
  assert json.loads(saved)["model"]["dim"] == 32 and json.loads(saved)["num_train_steps"] == 6


def test_train_step_computes_the_bf16_model_as_written():
  # The step's loss is that of the op-by-op model. Not bit for bit: the step is compiled with
  # XLA's defaults, which let fused values stay float32 where the model rounds them to bf16
  # (measured 1.3e-4 relative on this batch; bf16 keeps 8 bits, 2^-8 = 3.9e-3).
  config = tiny_config(dtype="bfloat16", augment=False)
  mesh = sharding.create_mesh(jax.devices()[:1])
  model, tx = train.make_model(config), train.make_optimizer(config)
  state = train.init_state(config, model, tx, mesh)
  batch = fake_batch(config)
  params = jax.device_get(state.params)  # The step donates the state.
  _, metrics = train.make_train_step(config, model, tx, mesh)(
      state, sharding.to_global(batch, mesh), jax.random.key(config.seed))
  with jax.disable_jit():
    outputs = model.apply({"params": params}, jnp.asarray(batch["image"]),
                          jnp.asarray(batch["aperture_fluxes"]),
                          jnp.asarray(batch["fiber_diameter"]), train=True)
    loss, _ = losses.total_loss(outputs, batch, z_weight=config.z_loss_weight,
                                norm_weight=config.norm_loss_weight,
                                **train.loss_options(config, model))
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=2e-3)


def test_prefetch_to_device_keeps_two_batches_ahead_in_order():
  mesh = sharding.create_mesh()
  pulled = []
  def host_batches():
    for i in range(5):
      pulled.append(i)
      yield {"x": np.full((4, 3), i, np.float32)}
  stream = sharding.prefetch_to_device(host_batches(), mesh, size=2)
  first = next(stream)
  # The first batch is out and the next two are on their way; no more was read.
  assert pulled == [0, 1, 2]
  assert first["x"].sharding == sharding.batch_sharding(mesh)
  rest = [int(b["x"][0, 0]) for b in stream]
  assert [int(first["x"][0, 0])] + rest == [0, 1, 2, 3, 4]
