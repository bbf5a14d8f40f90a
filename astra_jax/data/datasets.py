"""The prepared dataset a training config asks for: found, or prepared (and mocked) once."""

from __future__ import annotations

import json
import os

from absl import logging


def ensure_dataset(config, workdir: str) -> str:
  """The prepared dataset directory for `config`, preparing (and mocking) it when needed.

  `config.data_dir` may be a dataset directory (as prepare printed it) or a tfds data_dir holding
  the `astropixel` config that matches `bands`, `image_size` and `stretch_beta`. With neither
  `data_dir` nor `raw_dir` set, the default mock survey (`num_galaxies`, `mock_seed`) is generated
  and prepared once, cached beside the workdir.
  """
  from astra_jax.data import prepare  # pylint: disable=g-import-not-at-top (TensorFlow)
  if config.data_dir and os.path.exists(os.path.join(config.data_dir, "dataset_info.json")):
    return config.data_dir
  bands = tuple(config.bands.split(","))
  kwargs = dict(bands=bands, image_size=config.image_size, stretch_beta=config.stretch_beta,
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
  """Raises ValueError when the dataset's stored preprocessing (bands, image_size,
  stretch_beta) is not the one `config` asks for."""
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  meta = pipeline.load_builder(dataset_dir).info.metadata or {}
  want = dict(bands=config.bands.split(","), image_size=config.image_size,
              stretch_beta=config.stretch_beta)
  for key, value in want.items():
    if key in meta and meta[key] != value:
      raise ValueError(f"{dataset_dir}: prepared with {key}={meta[key]!r} but config.{key} is "
                       f"{value!r}")
