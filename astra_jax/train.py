"""Data-parallel training of ASTRA: one jitted, donated step over every device of every host.

The step is written as per-device code inside `jax.shard_map` over a 1-D `'data'` mesh: the
batch is split along it, the train state is replicated, and gradients are averaged with an explicit
`lax.pmean` (pmap-style, hence `check_vma=False`: with the default `check_vma=True`, `jax.grad`
with respect to replicated params already sums over `'data'`). Each device scales its loss sums by
the global example counts (`losses.total_loss(axis_name=...)`), so the pmean of the device losses
is exactly the loss of the global batch and N devices give the same update as 1 device.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

from absl import logging
from etils import epath
import flax.struct
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from astra_jax import augment
from astra_jax import checkpoint
from astra_jax import distributed
from astra_jax import evaluate
from astra_jax import losses
from astra_jax import paths
from astra_jax import photometry
from astra_jax import sharding
from astra_jax.data import MODEL_KEYS
from astra_jax.data import datasets
from astra_jax.models import astra as astra_model
from astra_jax.sharding import DATA_AXIS, create_mesh, replicated, to_global


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a pytree of arrays (Orbax saves it as is)."""
  step: jax.Array        # int32 scalar: number of updates applied so far.
  params: Any
  opt_state: Any


# ---------------------------------------------------------------- construction


def make_model(config: ml_collections.ConfigDict) -> astra_model.Astra:
  """The Flax module described by `config.model` with compute dtype `config.dtype`."""
  return astra_model.Astra.from_config(config.model, dtype=jnp.dtype(config.dtype))


def measure_photometry_statistics(config: ml_collections.ConfigDict, dataset_dir: str) -> None:
  """Sets `config.model.photometry_mean` and `photometry_scale` (23 floats each, mag) to
  `photometry.feature_statistics` of the training split's aperture fluxes, where the model embeds
  photometry and they are empty (a config that names them keeps its own).

  Deterministic for a dataset, so a resumed run measures what it was trained with; process 0
  reads the split and every process gets its figures.
  """
  from astra_jax import baselines  # pylint: disable=g-import-not-at-top (TensorFlow)
  model = config.model
  if not (model.get("photometry_token") or model.get("photometry_to_heads")):
    return
  if len(model.get("photometry_mean", ())) or len(model.get("photometry_scale", ())):
    return
  stats = np.zeros((2, photometry.NUM_FEATURES), np.float32)
  if jax.process_index() == 0:
    fluxes = baselines.load_split(dataset_dir, "train", keys=(photometry.KEY,))[photometry.KEY]
    stats = np.stack(photometry.feature_statistics(photometry.features(fluxes)))
  stats = np.asarray(multihost_utils.broadcast_one_to_all(stats), np.float64)
  with config.unlocked():
    model.photometry_mean = tuple(round(float(v), 6) for v in stats[0])
    model.photometry_scale = tuple(round(float(v), 6) for v in stats[1])


def make_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_learning_rate_factor` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.end_learning_rate_factor)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; decay only on matrices/kernels (not biases, norms, tokens).

  Adam's first moment is kept in `config.adam_mu_dtype` (float32 in configs written before the
  field existed); the update itself is computed in float32 either way.
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip_norm),
      optax.adamw(make_schedule(config), weight_decay=config.weight_decay, mask=decay_mask,
                  mu_dtype=jnp.dtype(adam_mu_dtype(config))))


def adam_mu_dtype(config) -> str:
  """`config.adam_mu_dtype`, or "float32" for configs written before the field existed."""
  return config.get("adam_mu_dtype", "float32")


def image_shape(config) -> tuple[int, int, int]:
  """(bands, H, W) of the model input."""
  return (len(config.bands.split(",")), config.image_size, config.image_size)


def aperture_fluxes_shape(config) -> tuple[int, int]:
  """(bands, apertures) of the model's `aperture_fluxes` input (`photometry.aperture_fluxes`)."""
  return (len(config.bands.split(",")), len(photometry.DIAMETERS_ARCSEC))


def z_label_sigma(config) -> float:
  """`config.z_label_sigma`, or 0 (one-hot labels) for configs written before the field existed."""
  return float(config.get("z_label_sigma", 0.0))


def norm_loss(config) -> str:
  """`config.norm_loss` (losses.NORM_LOSSES), or "squared" for configs written before it existed."""
  return str(config.get("norm_loss", "squared"))


def norm_label_sigma(config) -> float:
  """`config.norm_label_sigma` (dex), or 0 (one-hot labels) for configs written before it existed."""
  return float(config.get("norm_label_sigma", 0.0))


def loss_options(config, model) -> dict[str, Any]:
  """The keyword arguments of `losses.loss_terms` (and `total_loss`) besides outputs and batch."""
  return dict(z_centers=model.z_centers(), z_sigma=z_label_sigma(config),
              norm_loss=norm_loss(config), norm_sigma=norm_label_sigma(config))


def init_state(config, model, tx, mesh: Mesh) -> TrainState:
  """Initialises the train state directly replicated over `mesh` (no host round trip)."""
  def init(rng):
    dummy = jnp.zeros((1, *image_shape(config)), jnp.float32)
    fluxes = jnp.ones((1, *aperture_fluxes_shape(config)), jnp.float32)
    fiber = jnp.full((1,), 3.0, jnp.float32)
    params = model.init({"params": rng}, dummy, fluxes, fiber, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  rng = jax.random.key(config.seed)
  return jax.jit(init, out_shardings=replicated(mesh))(rng)


def abstract_state(config, model, tx, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and shardings of the train state, for restoring without initialising."""
  shapes = jax.eval_shape(lambda: init_state(config, model, tx, mesh))
  sharding = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


# ---------------------------------------------------------------- steps


def make_train_step(config, model, tx, mesh: Mesh):
  """Returns `train_step(state, batch, rng) -> (state, metrics)`, jitted with the state donated.

  `batch` is a dict of global arrays sharded along `'data'` (`image`, `aperture_fluxes`, `flux`,
  `weight`, `z`, `has_z`); `rng` a replicated key. With `config.augment` each image is flipped/rotated at random
  (`augment.random_dihedral`, drawn from `rng` and the step, the same whatever the device count).
  Metrics are replicated scalars: `loss`, its parts, `grad_norm`, `learning_rate` and `finite`
  (0 when the update was skipped for a non-finite loss or gradient: the parameters and Adam's
  moments stay as they were, and only `step` advances, past the batch that was consumed).
  """
  schedule = make_schedule(config)
  options = loss_options(config, model)
  num_devices = mesh.shape[DATA_AXIS]

  def per_device(state: TrainState, batch, rng):
    device = lax.axis_index(DATA_AXIS)
    dropout_rng, augment_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    dropout_rng = jax.random.fold_in(dropout_rng, device)
    images = batch["image"]
    if config.augment:
      images = augment.random_dihedral(augment_rng, images, device, num_devices)

    def loss_fn(params):
      # Centred circular apertures: the fluxes need no flip or rotation with the image.
      outputs = model.apply({"params": params}, images, batch["aperture_fluxes"],
                            batch.get("fiber_diameter"), train=True, rngs={"dropout": dropout_rng})
      # This device's share: num_devices * local sum / global count, so that the pmean of the
      # device losses (and of their gradients) is the loss of the whole global batch.
      return losses.total_loss(outputs, batch, z_weight=config.z_loss_weight,
                               norm_weight=config.norm_loss_weight, axis_name=DATA_AXIS,
                               **options)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # The mean over 'data' is the identity on a one-device mesh; it is kept there too, so that
    # every mesh runs the same program.
    grads = lax.pmean(grads, DATA_AXIS)
    loss = lax.pmean(loss, DATA_AXIS)
    grad_norm = optax.tree.norm(grads)

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        opt_state=opt_state)

    # A non-finite loss or gradient never reaches the parameters, decided here on the device
    # (no host round trip per step): the old parameters and moments are kept and only the step
    # counter advances, so that it keeps counting the batches read (the data position of a
    # resume). The host counts the skipped steps at its log steps. A cond rather than a select
    # of new against old: the select read and wrote every parameter and Adam moment once more
    # (~2.5 % of a seed-size CPU step); the cond updates the donated buffers in place.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = lax.cond(finite, update, lambda state: state.replace(step=state.step + 1), state)
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   finite=finite.astype(jnp.float32), **{f"loss_{k}": v for k, v in terms.items()})
    return new, metrics

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                       out_specs=(P(), P()), check_vma=False)
  return jax.jit(step, donate_argnums=(0,))


#: Parameter subtrees that every loss part trains: the patch CNN, the photometry embedding and the
#: encoder (the heads, `decoder` and `redshift`, serve some parts only).
SHARED_PARAMS = ("embed", "photometry", "encoder")


def make_loss_grad_norms(config, model, mesh: Mesh):
  """Returns `loss_grad_norms(params, batch) -> {"grad_norm_" + part: norm}`, jitted.

  For each part of the loss (spectrum, norm_loss_weight x norm, z_loss_weight x redshift: the
  terms as the training loss weighs them), the global L2 norm of its gradient with respect to
  the SHARED_PARAMS, on the global `batch` (sharded along 'data' as the train step's), without
  dropout or augmentation. It shows which part drives the shared layers; training logs it every
  `log_every_steps` when `config.log_loss_grad_norms` (one forward and three backward passes).
  """
  options = loss_options(config, model)
  weights = dict(spectrum=1.0, norm=float(config.norm_loss_weight),
                 redshift=float(config.z_loss_weight))
  names = tuple(weights)

  def per_device(params, batch):
    shared = {k: v for k, v in params.items() if k in SHARED_PARAMS}

    def parts(shared):
      outputs = model.apply({"params": {**params, **shared}}, batch["image"],
                            batch["aperture_fluxes"], batch.get("fiber_diameter"), train=False)
      # This device's share of each global part mean, as `losses.total_loss` takes it.
      shares = losses.device_shares(losses.loss_terms(outputs, batch, **options), DATA_AXIS)
      return jnp.stack([weights[k] * shares[k] for k in names])

    jacobian = lax.pmean(jax.jacrev(parts)(shared), DATA_AXIS)   # Leaves (3, *param shape).
    squares = sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(len(names), -1), axis=1)
                  for g in jax.tree.leaves(jacobian))
    return {f"grad_norm_{k}": jnp.sqrt(squares[i]) for i, k in enumerate(names)}

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=P(), check_vma=False))


def make_eval_step(config, model, mesh: Mesh):
  """Returns `eval_step(params, batch) -> (sums, outputs)`.

  `sums` maps each loss term to replicated global (sum, count); `outputs` are the model outputs,
  sharded like the batch. Padding examples carry weight 0 and has_z False, so they count nowhere.
  """
  options = loss_options(config, model)

  def per_device(params, batch):
    outputs = model.apply({"params": params}, batch["image"], batch["aperture_fluxes"],
                          batch.get("fiber_diameter"), train=False)
    # The redshift term against the same (smoothed) labels as training, so that validation
    # losses pick the best checkpoint by the objective being minimised.
    terms = losses.loss_terms(outputs, batch, **options)
    sums = {k: (lax.psum(s, DATA_AXIS), lax.psum(c, DATA_AXIS)) for k, (s, c) in terms.items()}
    return sums, outputs

  step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                       out_specs=(P(), P(DATA_AXIS)), check_vma=False)
  return jax.jit(step)


# ---------------------------------------------------------------- evaluation


def evaluate_split(eval_step, params, batches: Iterator[dict], mesh, config) -> dict[str, float]:
  """The loss and its parts over a whole split (padding excluded), as Python floats."""
  totals: dict[str, tuple[float, float]] = {}
  for batch in batches:
    sums, _ = eval_step(params, to_global({k: batch[k] for k in MODEL_KEYS}, mesh))
    for name, (s, c) in jax.device_get(sums).items():
      total, count = totals.get(name, (0.0, 0.0))
      totals[name] = (total + float(s), count + float(c))
  loss, parts = losses.combine_terms(totals, z_weight=config.z_loss_weight,
                                     norm_weight=config.norm_loss_weight)
  return {"loss": float(loss), **{k: float(v) for k, v in parts.items()}}


# ---------------------------------------------------------------- config checks


def validate_config(config):
  """Raises ValueError naming the field and its allowed values."""
  def check(ok, field, allowed):
    if not ok:
      raise ValueError(f"config.{field}={config_get(config, field)!r} is invalid: {allowed}")
  check(config.dtype in ("float32", "bfloat16"), "dtype", "one of 'float32', 'bfloat16'")
  check(adam_mu_dtype(config) in ("float32", "bfloat16"), "adam_mu_dtype",
        "one of 'float32', 'bfloat16'")
  check(config.rng_impl in ("threefry2x32", "rbg", "unsafe_rbg"), "rng_impl",
        "one of 'threefry2x32', 'rbg', 'unsafe_rbg'")
  sharding.check_global_batch(config.batch_size)
  check(config.num_train_steps >= 0, "num_train_steps", "an integer >= 0")
  check(config.learning_rate > 0, "learning_rate", "a float > 0")
  check(0 <= config.warmup_steps, "warmup_steps", "an integer >= 0")
  check(config.image_size > 0 and 288 % config.image_size == 0, "image_size",
        "a divisor of 288 (e.g. 288, 144, 96, 72, 48, 32)")
  check(config.image_size % config.model.patch_size == 0, "model.patch_size",
        f"a divisor of image_size={config.image_size}")
  check(config.model.dim % config.model.num_heads == 0, "model.num_heads",
        f"a divisor of model.dim={config.model.dim}")
  check(z_label_sigma(config) >= 0, "z_label_sigma", "a float >= 0 (0: one-hot labels)")
  check(norm_loss(config) in losses.NORM_LOSSES, "norm_loss", f"one of {losses.NORM_LOSSES}")
  binned = bool(config.model.get("amplitude_bins", 0))
  check((norm_loss(config) == "binned") == binned, "norm_loss",
        "'binned' exactly when model.amplitude_bins > 0 (a PDF head needs its cross-entropy)")
  check(norm_label_sigma(config) >= 0, "norm_label_sigma",
        "a float >= 0, dex (0: one-hot labels)")
  check(config.eval_every_steps > 0, "eval_every_steps", "an integer > 0")
  check(config.checkpoint_every_steps > 0, "checkpoint_every_steps", "an integer > 0")
  check(config.log_every_steps > 0, "log_every_steps", "an integer > 0")
  bands = config.bands.split(",")
  check(len(bands) == len(set(bands)) and all(len(b) == 1 for b in bands), "bands",
        "distinct band letters separated by commas, e.g. 'g,r,i,z,y'")


def config_get(config, dotted: str):
  """`config`'s field at a dotted path such as "model.dim"."""
  for part in dotted.split("."):
    config = config[part]
  return config


# ---------------------------------------------------------------- the loop


class MetricWriter:
  """metrics.jsonl plus TensorBoard event files in `workdir` (a local path or a URL such as
  gs://bucket/run); silent on every process but 0."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      _register_tensorboard_scheme(workdir)
      self._jsonl = epath.Path(workdir, "metrics.jsonl")
      self._tb = tensorboardX.SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict[str, float]):
    if not self.active:
      return
    # Opened per line: epath gives a gs:// file only as a context manager, and what is
    # written is on disk (or in the bucket) at once.
    with self._jsonl.open("a") as f:
      f.write(json.dumps({"step": int(step), "split": split,
                          **{k: float(v) for k, v in metrics.items()}}) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    self._tb.flush()

  def close(self):
    if self.active:
      self._tb.close()


class _GFileEventFiles:
  """tensorboardX's writer factory (its extension point for URL schemes) over TensorFlow's
  gfile, which epath uses for gs:// too."""

  def open(self, path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path, "wb")

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_scheme(workdir: str):
  """Event files under a URL go through TensorFlow's gfile: tensorboardX's own gs:// writer
  needs google-cloud-storage, and it knows no other scheme."""
  if paths.is_url(workdir):
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    record_writer.register_writer_factory(workdir.split("://")[0], _GFileEventFiles())


def write_config(config, workdir: str):
  """`workdir/config.json` (process 0 only): what `analysis.restore` rebuilds the model from."""
  if jax.process_index() == 0:
    epath.Path(workdir, "config.json").write_text(
        config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ASTRA on `config`'s data, resuming from `workdir`; returns the test-split results.

  `workdir` may be a local folder or a URL (gs://bucket/run). With several processes, every
  process runs this with the same arguments; it stops on a preemption notice (SIGTERM) to any
  of them at a step they all agree on, saves that step and raises `distributed.Preempted` (a
  SystemExit with status 0; no results.json is written); the same command then resumes from it.
  """
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  validate_config(config)
  workdir = paths.absolute(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  dataset_dir = datasets.ensure_dataset(config, workdir)
  datasets.check_dataset(config, dataset_dir)
  with config.unlocked():
    config.data_dir = dataset_dir
  measure_photometry_statistics(config, dataset_dir)

  mesh = create_mesh()
  model, tx = make_model(config), make_optimizer(config)
  latest, best = checkpoint.checkpoint_managers(workdir, config)
  state = checkpoint.restore_or_init(latest, abstract_state(config, model, tx, mesh),
                                     lambda: init_state(config, model, tx, mesh))
  # Only now: a config whose model does not fit the checkpoints fails above and leaves the
  # config.json they were saved with, which notebooks restore them by.
  write_config(config, workdir)
  start = int(jax.device_get(state.step))
  train_step = make_train_step(config, model, tx, mesh)
  eval_step = make_eval_step(config, model, mesh)
  loss_grad_norms = (make_loss_grad_norms(config, model, mesh)
                     if config.get("log_loss_grad_norms", False) else None)
  # Made by a jitted function so that it is replicated over every host's devices.
  rng = jax.jit(lambda: jax.random.key(config.seed, impl=config.rng_impl),
                out_shardings=replicated(mesh))()
  writer = MetricWriter(workdir)
  splits = set(pipeline.load_builder(dataset_dir).info.splits)
  for split in ("validation", "test"):
    if split not in splits:
      logging.warning("%s has no %r split (too few galaxies); it is not evaluated", dataset_dir,
                      split)
  eval_batches = lambda split: pipeline.as_numpy(pipeline.eval_dataset(
      dataset_dir, split, global_batch=config.batch_size, extra_keys=()), dataset_dir, split)
  builder = pipeline.load_builder(dataset_dir)
  logging.info("Process %d of %d reads %d of the %d 'train' examples per epoch",
               jax.process_index(), jax.process_count(),
               pipeline.host_sizes(builder, "train", jax.process_count())[jax.process_index()],
               builder.info.splits["train"].num_examples)
  # Two batches on their way to the devices while a step runs.
  train_batches = sharding.prefetch_to_device(pipeline.as_numpy(pipeline.train_dataset(
      dataset_dir, global_batch=config.batch_size, seed=config.seed, start_step=start,
      shuffle_buffer=config.shuffle_buffer), dataset_dir, "train"), mesh, size=2)

  bar = tqdm(total=config.num_train_steps, initial=start, desc="train", unit="step",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  bar.postfix_values = {}
  log = _TrainLog(writer, bar, config, start)
  preempted = None  # The step every process saved on a preemption notice.
  with distributed.Preemption() as preemption:
    try:
      for step in range(start, config.num_train_steps):
        batch = next(train_batches)
        done = step + 1
        # Before the step: it donates the parameters.
        grad_norms = (loss_grad_norms(state.params, batch) if loss_grad_norms is not None
                      and log.is_log_step(done) else {})
        state, metrics = train_step(state, batch, rng)
        metrics = {**metrics, **grad_norms}
        bar.update(1)
        # The metrics stay on the device until a log step reads them all at once.
        log.add(done, metrics)
        if ("validation" in splits and
            (done % config.eval_every_steps == 0 or done == config.num_train_steps)):
          val = evaluate_split(eval_step, state.params, eval_batches("validation"), mesh, config)
          writer.write(done, "validation", val)
          best.save(done, args=ocp.args.StandardSave(state.params),
                    metrics={"val_loss": val["loss"]})
        if done % config.checkpoint_every_steps == 0 or done == config.num_train_steps:
          latest.save(done, args=ocp.args.StandardSave(state))
        # Every process asks at every step; all get True at the same step.
        if preemption.reached(done):
          logging.warning("Preemption notice: every process stops at step %d, checkpointing it",
                          done)
          if latest.latest_step() != done:
            latest.save(done, args=ocp.args.StandardSave(state), force=True)
          preempted = done
          break
      log.flush()
    finally:
      bar.close()
      latest.wait_until_finished()
      best.wait_until_finished()
  if preempted is not None:
    writer.close()
    latest.close()
    best.close()
    stop = distributed.Preempted(preempted)
    logging.warning("%s", stop)
    raise stop

  results = {"scalars": {}, "predictions": {}, "table": ""}
  if "test" in splits:
    results = evaluate.evaluate_model(model, state.params, eval_step, eval_batches("test"), mesh,
                                      config)
    writer.write(config.num_train_steps, "test", results["scalars"])
    if jax.process_index() == 0:
      compared = evaluate.compare_with_baselines(dataset_dir, results["scalars"])
      results["baselines"] = compared
      results["table"] = evaluate.write_results(workdir, compared)
  writer.close()
  latest.close()
  best.close()
  return results


class _TrainLog:
  """The train metrics of every step, read from the devices only at log steps.

  Non-finite steps (their update skipped on the device) are counted there: the logged line
  carries `nonfinite_steps` (how many since the previous log line), a warning names them, and
  training stops with FloatingPointError once `config.max_consecutive_nonfinite_steps` (default
  10) steps in a row were non-finite: the run is then stuck, not unlucky.
  """

  def __init__(self, writer: MetricWriter, bar, config, start: int):
    self.writer, self.bar, self.config = writer, bar, config
    self.max_consecutive = int(config.get("max_consecutive_nonfinite_steps", 10))
    self.pending: list[tuple[int, Any]] = []
    self.consecutive: list[int] = []      # The current run of non-finite steps.
    self.start, self.t0 = start, time.perf_counter()

  def is_log_step(self, step: int) -> bool:
    """Whether `add(step, ...)` writes a line: every log_every_steps, and the last step."""
    return step % self.config.log_every_steps == 0 or step == self.config.num_train_steps

  def add(self, step: int, metrics):
    self.pending.append((step, metrics))
    if self.is_log_step(step):
      self.flush()

  def flush(self):
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    values = [{k: float(v) for k, v in m.items()} for m in jax.device_get(
        [m for _, m in self.pending])]
    self.pending = []
    skipped = []
    for step, v in zip(steps, values):
      if v["finite"]:
        self.consecutive = []
      else:
        skipped.append(step)
        self.consecutive.append(step)
    if skipped:
      logging.warning("Non-finite loss or gradient at step(s) %s: their updates were skipped",
                      ", ".join(map(str, skipped)))
    last = values[-1]
    self.writer.write(steps[-1], "train", {**last, "nonfinite_steps": float(len(skipped))})
    if len(self.consecutive) >= self.max_consecutive:
      raise FloatingPointError(
          f"non-finite loss or gradient at {len(self.consecutive)} consecutive steps "
          f"{self.consecutive[0]}..{self.consecutive[-1]} (last loss={last['loss']}, "
          f"grad_norm={last['grad_norm']}); their updates were not applied and the checkpoints "
          "hold the parameters from before them")
    rate = (steps[-1] - self.start) * self.config.batch_size / (time.perf_counter() - self.t0)
    self.bar.postfix_values.update(loss=f"{last['loss']:.4f}", samples_per_s=f"{rate:.1f}")
    self.bar.set_postfix(self.bar.postfix_values, refresh=False)
