"""The prepared dataset a training config asks for: found, or prepared (and mocked) once."""

from __future__ import annotations

import json
import os

from absl import logging


def ensure_dataset(config, workdir: str) -> str:
  """The prepared dataset directory for `config`, preparing (and mocking) it when needed.

  `config.data_dir` may be a dataset directory (as prepare printed it) or a tfds data_dir holding
  the `astropixel` config that matches `bands`, `image_size` and `softening_sigmas`. With neither
  `data_dir` nor `raw_dir` set, the default mock survey (`num_galaxies`, `mock_seed`) is generated
  and prepared once, cached beside the workdir.
  """
  from astra_jax.data import prepare  # pylint: disable=g-import-not-at-top (TensorFlow)
  if config.data_dir and os.path.exists(os.path.join(config.data_dir, "dataset_info.json")):
    return config.data_dir
  bands = tuple(config.bands.split(","))
  kwargs = dict(bands=bands, image_size=config.image_size,
                softening_sigmas=config.softening_sigmas,
                num_workers=min(os.cpu_count() or 1, 8))
  raw_dir, data_dir = config.raw_dir, config.data_dir
  if not raw_dir:
    cache = config.mock_cache_dir or os.path.join(
        os.path.dirname(os.path.abspath(workdir)), "_mock_cache")
    raw_dir = os.path.join(cache, f"mock-n{config.num_galaxies}-seed{config.mock_seed}")
    data_dir = data_dir or os.path.join(cache, "tfds")
    if not os.path.exists(os.path.join(raw_dir, "data.csv")):
      from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
      logging.info("Generating the default mock survey (%d galaxies) in %s",
                   config.num_galaxies, raw_dir)
      mock.generate_survey(raw_dir, config.num_galaxies, config.mock_seed, progress=True)
  elif not data_dir:
    data_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), "_tfds")
  summary = prepare.prepare(raw_dir, data_dir, **kwargs)
  logging.info("Dataset %s: %s", summary["dataset_dir"], json.dumps(summary))
  return summary["dataset_dir"]


def check_dataset(config, dataset_dir: str):
  """Raises ValueError when the dataset's stored preprocessing is not the one `config` asks for:
  a dataset prepared before `astropixel.CALIBRATED_VERSION` (images not calibrated: each band
  divided by its cutout's own sky sigma, zero points ignored), with the command that prepares
  it again; or other bands, image_size or softening."""
  # pylint: disable=g-import-not-at-top (TensorFlow)
  from astra_jax.data import astropixel
  from astra_jax.data import pipeline
  from astra_jax.data import preprocess
  import tensorflow_datasets as tfds
  info = pipeline.load_builder(dataset_dir).info
  meta = info.metadata or {}
  if (tfds.core.Version(str(info.version)) < tfds.core.Version(astropixel.CALIBRATED_VERSION)
      or "softening_nmgy" not in meta):
    raw_dir = config.raw_dir or "RAW_DIR"
    # prepare's dataset_dir is DATA_DIR/astropixel/CONFIG/VERSION.
    parts = os.path.normpath(os.path.abspath(dataset_dir)).split(os.sep)
    data_dir = os.sep.join(parts[:-3]) if parts[-3:-2] == ["astropixel"] else "DATA_DIR"
    raise ValueError(
        f"{dataset_dir}: astropixel {info.version} holds uncalibrated images (each band divided "
        f"by its cutout's own sky sigma, zero points ignored); training needs version "
        f">= {astropixel.CALIBRATED_VERSION} (nanomaggies, a fixed softening per band). Prepare "
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
