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


def pytest_collection_modifyitems(items):
  """The slow end-to-end tests first, so that under `-n 2` their subprocesses do not run alone
  at the end. The suite keeps both cores busy either way (16-17 CPU-minutes in 8 min 46 s), so
  which worker takes them matters little: spread over both workers it took 8 min 50 s."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # Stable: order kept.
