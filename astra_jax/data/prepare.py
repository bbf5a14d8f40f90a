r"""Prepare an ASTROPIXEL-layout raw folder into `astropixel` tfds shards.

  python -m astra_jax.data.prepare --raw_dir RAW --data_dir OUT [--bands g,r,i,z,y] \
      [--image_size 288] [--softening_sigmas 2.5] [--num_workers 2]

Images are calibrated to nanomaggies by each band's zero point (MAGZERO, else EXPTIME) and
stretched as asinh(f / softening), softening = softening_sigmas x the PS1 median sky noise per
pixel of the band (`preprocess.stretch`).

With Apache Beam (`pip install 'astra-jax[beam]'`) the galaxies are read by a Beam pipeline; the
same examples and the same rejected.jsonl / manifest.jsonl come out:

  python -m astra_jax.data.prepare --raw_dir RAW --data_dir OUT --beam_runner DirectRunner \
      --beam_options "--direct_num_workers=2 --direct_running_mode=multi_processing"

Beam's DirectRunner first tries Prism, a binary it downloads from GitHub, and falls back to its
in-process FnApiRunner (the same options) when that fails; `--beam_runner FnApiRunner` skips Prism.
On a cluster runner (DataflowRunner, FlinkRunner, SparkRunner) the workers write the shards, so
--data_dir must be a path they share (gs://... on Dataflow), and --raw_dir one that the launching
machine and every worker can read: a shared folder or a bucket (gs://..., read through
etils.epath).

Ends with one JSON line:
  {"written": {"train": n, "validation": n, "test": n}, "rejected": n,
   "manifest": PATH, "dataset_dir": PATH}
`dataset_dir` is what `tfds.builder_from_directory` opens; `rejected.jsonl` (one JSON object a
line: specobj_id, path, reason) and `manifest.jsonl` (every raw galaxy: its split or "rejected")
sit in it. Rerunning on a prepared dataset reuses it and prints the same line.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from absl import app
from absl import flags
from etils import epath

from astra_jax import grid
from astra_jax import paths


def hide_gpus_from_tensorflow():
  """TensorFlow only reads data here; the accelerators belong to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised: then it was hidden before, or is CPU-only.
    pass


def prepare(raw_dir: str, data_dir: str, *, bands=grid.PS1_BANDS, image_size: int = 288,
            softening_sigmas: float = 2.5, min_valid_pixels: int = 500, num_workers: int = 1,
            beam_runner: str | None = None, beam_options: str = "",
            only_existing: bool = False) -> dict:
  """Builds (or reuses) the dataset; returns the summary that the CLI prints as JSON.

  `beam_runner` (e.g. "DirectRunner", "DataflowRunner") reads the galaxies with Apache Beam, with
  `beam_options` a command line of Beam pipeline options; `num_workers` is then unused (the
  runner's options set the parallelism). None: `num_workers` > 1 spawned processes read the
  galaxies while this one writes the examples; 1: this process reads and writes.
  `only_existing`: raise FileNotFoundError rather than prepare a dataset that is not there yet
  (what the other processes of a group do once process 0 has prepared it).
  """
  if beam_options and not beam_runner:
    raise ValueError("beam_options need a beam_runner")
  hide_gpus_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from astra_jax.data import astropixel  # pylint: disable=g-import-not-at-top

  pipeline_options = None
  if beam_runner:
    beam = astropixel.import_beam()
    pipeline_options = beam.options.pipeline_options.PipelineOptions(
        flags=shlex.split(beam_options))
  config = astropixel.make_config(bands, image_size, softening_sigmas, min_valid_pixels)
  # tfds refuses a custom config named like a registered one: pass registered ones by name.
  registered = {c.name for c in astropixel.Astropixel.BUILDER_CONFIGS}
  builder = astropixel.Astropixel(data_dir=paths.absolute(data_dir),
                                  config=config.name if config.name in registered else config,
                                  num_workers=num_workers)
  dataset_dir = os.fspath(builder.data_dir)
  if not builder.is_prepared():
    if only_existing:
      raise FileNotFoundError(f"{dataset_dir}: no prepared dataset")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=paths.absolute(raw_dir), try_download_gcs=False,
        beam_runner=beam_runner, beam_options=pipeline_options))
    _write_accounts(builder, dataset_dir)
  return summary(dataset_dir)


def _write_accounts(builder, dataset_dir: str):
  """rejected.jsonl and manifest.jsonl: where every raw galaxy went.

  The manifest lists each split's galaxies (sorted by specobj_id), then the rejected ones.
  """
  with epath.Path(dataset_dir, "rejected.jsonl").open("w") as f:
    for r in builder.rejections:
      f.write(json.dumps(r) + "\n")
  with epath.Path(dataset_dir, "manifest.jsonl").open("w") as f:
    for split in builder.info.splits:
      for specobj_id in builder.stored_ids(split):
        f.write(json.dumps({"specobj_id": specobj_id, "split": split}) + "\n")
    for r in builder.rejections:
      f.write(json.dumps({"specobj_id": r["specobj_id"], "split": "rejected",
                          "reason": r["reason"]}) + "\n")


def summary(dataset_dir: str) -> dict:
  """The counts of a prepared dataset, read back from its manifest."""
  manifest = paths.join(dataset_dir, "manifest.jsonl")
  if not epath.Path(manifest).exists():
    raise FileNotFoundError(f"{manifest}: missing; the preparation of {dataset_dir} did not finish")
  written = {"train": 0, "validation": 0, "test": 0}
  rejected = 0
  with epath.Path(manifest).open() as f:
    for line in f:
      split = json.loads(line)["split"]
      if split == "rejected":
        rejected += 1
      else:
        written[split] += 1
  return {"written": written, "rejected": rejected,
          "manifest": manifest, "dataset_dir": dataset_dir}


def main(argv):
  del argv
  f = flags.FLAGS
  result = prepare(f.raw_dir, f.data_dir, bands=tuple(f.bands.split(",")),
                   image_size=f.image_size, softening_sigmas=f.softening_sigmas,
                   min_valid_pixels=f.min_valid_pixels, num_workers=f.num_workers,
                   beam_runner=f.beam_runner, beam_options=f.beam_options)
  sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  flags.DEFINE_string("raw_dir", None, "ASTROPIXEL-layout folder (data.csv + Galaxy_* folders).")
  flags.DEFINE_string("data_dir", None, "tfds data_dir to write the shards into.")
  flags.DEFINE_string("bands", ",".join(grid.PS1_BANDS), "Band order of the image axis.")
  flags.DEFINE_integer("image_size", 288, "Stored image size; must divide 288 (mean-binned).")
  flags.DEFINE_float("softening_sigmas", 2.5,
                     "asinh softening in units of the PS1 median sky noise per pixel of each band "
                     "(nanomaggies: preprocess.ps1_sky_sigma_nmgy).")
  flags.DEFINE_integer("min_valid_pixels", 500, "Reject spectra with fewer valid grid pixels.")
  flags.DEFINE_integer("num_workers", min(os.cpu_count() or 1, 8),
                       "Processes reading galaxies (1: this one; without --beam_runner).")
  flags.DEFINE_string("beam_runner", None,
                      "Read the galaxies with Apache Beam on this runner: DirectRunner, "
                      "DataflowRunner, FlinkRunner, SparkRunner, ... Default: no Beam.")
  flags.DEFINE_string("beam_options", "",
                      "Beam pipeline options as one command line, e.g. \"--direct_num_workers=2 "
                      "--direct_running_mode=multi_processing\"; needs --beam_runner.")
  flags.mark_flags_as_required(["raw_dir", "data_dir"])
  app.run(main)
