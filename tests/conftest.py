"""Test setup: 4 fake CPU devices (before jax is imported anywhere), TensorFlow kept off GPUs."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Compilation dominates these tiny runs: the tests, and the training processes they launch, share
# one persistent compilation cache (the same executables, so results are unchanged).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="astra-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """The `tiny` config's mock survey (24 galaxies: 17 train, 2 validation, 5 test), 32x32 px."""
  from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
  from astra_jax.data import prepare  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny_dataset")
  mock.generate_survey(str(root / "raw"), 24, seed=3, num_workers=1)
  return prepare.prepare(str(root / "raw"), str(root / "tfds"), image_size=32)["dataset_dir"]


@pytest.fixture
def ram(monkeypatch):
  """A fresh ram:// folder, known to epath exactly as gs:// is (same class, TensorFlow's gfile
  backend): offline, so what passes here is what epath and tf.data do with a gs:// path, minus
  the network."""
  # pylint: disable=g-import-not-at-top,protected-access
  from etils.epath import backend
  from etils.epath import gpath
  from etils.epath import register
  import numpy as np
  import tensorflow as tf
  monkeypatch.setattr(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "ram", backend.tf_backend)
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
  root = f"ram://astra-test-{np.random.default_rng().integers(1 << 30)}"
  yield root
  if tf.io.gfile.exists(root):
    tf.io.gfile.rmtree(root)


@pytest.fixture
def ram_copy(ram):
  """`copy(folder, name)`: a local folder copied to `ram/name`, file by file; returns that URL."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  def copy(folder, name):
    folder, url = os.fspath(folder), f"{ram}/{name}"
    for parent, _, files in tf.io.gfile.walk(folder):
      target = url + parent[len(folder):]
      tf.io.gfile.makedirs(target)
      for file in files:
        tf.io.gfile.copy(os.path.join(parent, file), f"{target}/{file}")
    return url
  return copy


def pytest_collection_modifyitems(items):
  """The slow end-to-end tests first, so that under `-n 2` their subprocesses do not run alone
  at the end. The suite keeps both cores busy either way (16-17 CPU-minutes in 8 min 46 s), so
  which worker takes them matters little: spread over both workers it took 8 min 50 s."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # Stable: order kept.


def host_params(abstract, seed):
  """Parameters in the model's shapes drawn on the host (no init compilation: ~20 s on 2 CPUs).

  Kernels ~ N(0, 1/fan_in), LayerNorm scales 1, other vectors ~ N(0, 0.02^2): outputs of the
  size a freshly initialised model gives.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) >= 2 else 0.02
    return (std * rng.normal(size=leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory):
  """`write_tiny_run` on the tiny dataset, once per test process: (workdir, config, params)."""
  return write_tiny_run(tiny_dataset, str(tmp_path_factory.mktemp("tiny_run")))


def write_tiny_run(dataset_dir, workdir):
  """(workdir, config, params at step 2) of a `tiny` run on `dataset_dir`, as training leaves
  it: config.json, metrics.jsonl, the Orbax checkpoints (TrainState at steps 1 and 2, params at
  step 2 in best/) and results.json, each written by the writer training uses.

  Nothing is trained: the states are drawn on the host (compiling the init and train steps takes
  most of a minute on 2 CPUs), and results.json holds the baselines scored on the test split
  beside placeholder ASTRA scalars. What reads a run (`analysis`, `predict`, the notebook) is
  what is tested with it.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from astra_jax import checkpoint
  from astra_jax import evaluate
  from astra_jax import sharding
  from astra_jax import train
  from experiments.configs import baseline
  # pylint: enable=g-import-not-at-top
  config = baseline.get_config("tiny")
  config.data_dir = dataset_dir
  train.validate_config(config)
  train.measure_photometry_statistics(config, dataset_dir)  # As training does.
  train.write_config(config, workdir)
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  abstract = train.abstract_state(config, model, tx, mesh)
  latest, best = checkpoint.checkpoint_managers(workdir, config)
  writer = train.MetricWriter(workdir)
  for step in (1, 2):
    state = train.TrainState(
        step=np.int32(step), params=host_params(abstract.params, step),
        opt_state=jax.tree.map(lambda s: np.full(s.shape, 0.1 * step, s.dtype), abstract.opt_state))
    state = jax.device_put(state, jax.tree.map(lambda s: s.sharding, abstract))
    writer.write(step, "train", dict(loss=3.0 / step, loss_spectrum=1.5 / step,
                                     loss_norm=0.5 / step, loss_redshift=4.0 / step))
    latest.save(step, args=ocp.args.StandardSave(state))
  writer.write(2, "validation", dict(loss=2.0, spectrum=1.2, norm=0.1, redshift=3.5))
  best.save(2, args=ocp.args.StandardSave(state.params), metrics={"val_loss": 2.0})
  writer.close()
  for manager in (latest, best):
    manager.wait_until_finished()
    manager.close()
  astra = dict(spectrum_r2=0.0, z_median_sigma_mad=0.1, z_median_outlier_fraction=0.4,
               z_median_n=5.0)
  evaluate.write_results(workdir, evaluate.compare_with_baselines(dataset_dir, astra))
  return workdir, config, jax.device_get(state.params)
