"""The prepared dataset a training config asks for: found, or prepared (and mocked) once."""

from __future__ import annotations

import json
import os

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils

from astra_jax import paths


def ensure_dataset(config, workdir: str) -> str:
  """The prepared dataset directory for `config`, preparing (and mocking) it when needed.

  `config.data_dir` may be a dataset directory (as prepare printed it) or a tfds data_dir holding
  the `astropixel` config that matches `bands`, `image_size` and `softening_sigmas`. With neither
  `data_dir` nor `raw_dir` set, the default mock survey (`num_galaxies`, `mock_seed`) is generated
  and prepared once, cached beside the workdir. Paths may be URLs (gs://...), except the mock
  cache, which the mock generator writes with local file I/O.

  With several processes, process 0 generates and prepares while the others wait at a barrier
  (`multihost_utils.sync_global_devices`) and then open what it wrote: the folders must be on a
  filesystem every host sees (gs://, NFS). Run by every process.
  """
  if config.data_dir and epath.Path(config.data_dir, "dataset_info.json").exists():
    return config.data_dir
  if jax.process_count() == 1:
    return _prepare(config, workdir)
  if jax.process_index() == 0:
    try:
      dataset_dir = _prepare(config, workdir)
    finally:  # Also on failure: the others then fail opening it rather than hang here.
      multihost_utils.sync_global_devices("astra_jax dataset prepared")
    return dataset_dir
  multihost_utils.sync_global_devices("astra_jax dataset prepared")
  # Process 0 prepared it: this finds it prepared and only reads its summary.
  try:
    return _prepare(config, workdir, generate=False)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"process {jax.process_index()}: process 0 prepared the dataset but this process cannot "
        f"see it ({e}); data_dir, raw_dir and mock_cache_dir must be on a filesystem every host "
        "shares (gs://bucket/..., NFS)") from e


def _prepare(config, workdir: str, generate: bool = True) -> str:
  """`prepare.prepare` of `config`'s raw folder (the mock survey, generated if `generate` and
  missing) into its data_dir; returns the dataset directory."""
  from astra_jax.data import prepare  # pylint: disable=g-import-not-at-top (TensorFlow)
  bands = tuple(config.bands.split(","))
  kwargs = dict(bands=bands, image_size=config.image_size,
                softening_sigmas=config.softening_sigmas,
                num_workers=min(os.cpu_count() or 1, 8))
  raw_dir, data_dir = config.raw_dir, config.data_dir
  parent = os.fspath(epath.Path(paths.absolute(workdir)).parent)
  if not raw_dir:
    cache = config.mock_cache_dir or paths.join(parent, "_mock_cache")
    raw_dir = paths.join(cache, f"mock-n{config.num_galaxies}-seed{config.mock_seed}")
    data_dir = data_dir or paths.join(cache, "tfds")
    if not epath.Path(raw_dir, "data.csv").exists():
      if not generate:
        raise FileNotFoundError(f"{raw_dir}: no mock survey (data.csv missing)")
      from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
      logging.info("Generating the default mock survey (%d galaxies) in %s",
                   config.num_galaxies, raw_dir)
      mock.generate_survey(raw_dir, config.num_galaxies, config.mock_seed, progress=True)
  elif not data_dir:
    data_dir = paths.join(parent, "_tfds")
  summary = prepare.prepare(raw_dir, data_dir, only_existing=not generate, **kwargs)
  logging.info("Dataset %s: %s", summary["dataset_dir"], json.dumps(summary))
  return summary["dataset_dir"]


def check_dataset(config, dataset_dir: str):
  """Raises ValueError when the dataset's stored preprocessing is not the one `config` asks for:
  a dataset prepared before `astropixel.CALIBRATED_VERSION` (images not calibrated: each band
  divided by its cutout's own sky sigma, zero points ignored) or before
  `astropixel.FIBER_VERSION` (no fiber_diameter), with the command that prepares it again; or
  other bands, image_size or softening."""
  # pylint: disable=g-import-not-at-top (TensorFlow)
  from astra_jax.data import astropixel
  from astra_jax.data import pipeline
  from astra_jax.data import preprocess
  import tensorflow_datasets as tfds
  info = pipeline.load_builder(dataset_dir).info
  meta = info.metadata or {}
  version = tfds.core.Version(str(info.version))
  if version < tfds.core.Version(astropixel.CALIBRATED_VERSION) or "softening_nmgy" not in meta:
    why = (f"holds uncalibrated images (each band divided by its cutout's own sky sigma, zero "
           f"points ignored); training needs version >= {astropixel.CALIBRATED_VERSION} "
           f"(nanomaggies, a fixed softening per band)")
  elif version < tfds.core.Version(astropixel.FIBER_VERSION):
    why = (f"has no fiber_diameter (the spectrum's fiber, which the amplitude is the light "
           f"in); training needs version >= {astropixel.FIBER_VERSION}")
  else:
    why = None
  if why:
    raw_dir = config.raw_dir or "RAW_DIR"
    # prepare's dataset_dir is DATA_DIR/astropixel/CONFIG/VERSION.
    parts = paths.absolute(dataset_dir).rstrip("/").split("/")
    data_dir = "/".join(parts[:-3]) if parts[-3:-2] == ["astropixel"] else "DATA_DIR"
    raise ValueError(
        f"{dataset_dir}: astropixel {info.version} {why}. Prepare "
        f"it again from the raw folder: python -m astra_jax.data.prepare --raw_dir {raw_dir} "
        f"--data_dir {data_dir} --bands {config.bands} --image_size {config.image_size} "
        f"--softening_sigmas {config.softening_sigmas:g}, and point --config.data_dir at the "
        f"dataset_dir it prints (or leave data_dir empty to prepare the default mock survey).")
  bands = config.bands.split(",")
  want = dict(bands=bands, image_size=config.image_size,
              softening_sigmas=config.softening_sigmas,
              softening_nmgy=list(preprocess.ps1_softening_nmgy(bands, config.softening_sigmas)))
  for key, value in want.items():
    if key in meta and not _same(meta[key], value):
      raise ValueError(f"{dataset_dir}: prepared with {key}={meta[key]!r} but config asks for "
                       f"{value!r}")


def _same(stored, wanted) -> bool:
  """Metadata equality; numbers within 1e-9 relative (they went through JSON)."""
  if isinstance(wanted, (list, tuple)):
    return (isinstance(stored, (list, tuple)) and len(stored) == len(wanted)
            and all(_same(a, b) for a, b in zip(stored, wanted)))
  if isinstance(wanted, float):
    return isinstance(stored, (int, float)) and abs(stored - wanted) <= 1e-9 * abs(wanted)
  return stored == wanted
