r"""Predict spectra and redshift PDFs for a folder of cutouts (no spectra needed).

  python -m experiments.predict --workdir runs/baseline --images DIR --out predictions.fits \
      [--batch_size 64] [--num_workers N] [--resize {reject,bin}] [--truth CSV|none] \
      [--best] [--step N] [--fiber_diameter {3,2}]

DIR (a folder, or a URL: gs://bucket/cutouts) holds `Galaxy_{id}/images/{id}_{band}.fits`
(ASTROPIXEL) or flat `{id}_{band}.fits`; see `astra_jax.predict` for the table, the rejection file
(`predictions.rejected.jsonl` beside the output) and `--resize`. With a truth table (`--truth`, or
DIR/truth.csv or DIR/data.csv having a z column) the redshift sigma_MAD, outlier fraction and
bias are printed. flux_pred is the light in an SDSS 3 arcsec fiber, or a BOSS 2 arcsec one with
--fiber_diameter=2. The last line of stdout is the summary as one JSON object.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Only absl and astra_jax.predict at import: spawned reading workers import this module again.
from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from astra_jax import predict

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints).",
                               required=True)
_IMAGES = flags.DEFINE_string("images", None, "Folder of cutouts.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output FITS table.", required=True)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers", None, "Reading processes (0: read in this process); default min(8, CPUs).")
_RESIZE = flags.DEFINE_enum(
    "resize", "reject", predict.RESIZE_MODES,
    "Cutouts not 288x288: reject them (reason 'wrong image shape'), or bin: accept any square "
    "side that is a multiple of the model's image_size and mean-bin it.")
_TRUTH = flags.DEFINE_string(
    "truth", None, "CSV with specobj_id and z columns (truth.csv, data.csv); default DIR's "
    "truth.csv or data.csv when one has a z column; 'none': no comparison.")
_BEST = flags.DEFINE_bool("best", False, "Use the best (lowest validation loss) checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest (or best).")
_FIBER = flags.DEFINE_enum("fiber_diameter", "3", ["3", "2"],
                           "Arcsec: the fiber whose light the spectrum is (SDSS 3, BOSS 2).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every file at INFO.
    logging.set_verbosity(logging.WARNING)
  truth = {None: "auto", "none": None}.get(_TRUTH.value, _TRUTH.value)
  summary = predict.predict_folder(
      _WORKDIR.value, _IMAGES.value, _OUT.value, batch_size=_BATCH_SIZE.value,
      num_workers=_NUM_WORKERS.value, resize=_RESIZE.value, truth=truth, step=_STEP.value,
      best=_BEST.value, progress=True, fiber_diameter=float(_FIBER.value))
  if summary.get("z_num_truth"):
    print(f"redshift vs {summary['truth']} ({summary['z_num_truth']} galaxies): "
          f"sigma_MAD {summary['z_sigma_mad']:.4f}, outlier fraction "
          f"{summary['z_outlier_fraction']:.3f}, bias {summary['z_bias']:+.4f}")
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main)
