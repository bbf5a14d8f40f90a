r"""Analyse a trained run: predictions table and figures for one split of its dataset.

  python -m experiments.analyze --workdir=runs/baseline [--split=test] [--num=16] \
      [--out_dir=runs/baseline/analysis] [--best] [--step=N] [--data_dir=DIR]

Writes, into out_dir (default WORKDIR/analysis): predictions.fits (one row per galaxy: ids,
redshifts and their PDF, predicted and true spectra; see `astra_jax.analysis.write_fits`),
spectra.png, redshift.png, loss.png and attention.png.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from astra_jax import analysis
from astra_jax import plots

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints).",
                               required=True)
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split to predict.")
_NUM = flags.DEFINE_integer("num", 16, "Galaxies shown in spectra.png (attention.png: up to 6).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output folder; default WORKDIR/analysis.")
_BEST = flags.DEFINE_bool("best", False, "Use the best (lowest validation loss) checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest (or best).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared dataset; default config.json's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")

MAX_ATTENTION_PANELS = 6


def analyze(workdir: str, *, split: str = "test", num: int = 16, out_dir: str | None = None,
            best: bool = False, step: int | None = None, data_dir: str | None = None,
            batch_size: int = 64) -> dict[str, str]:
  """Writes the predictions table and the four figures; returns {name: path}."""
  out_dir = out_dir or os.path.join(workdir, "analysis")
  config, model, params = analysis.restore(workdir, step=step, best=best)
  pred = analysis.predict_split(model, params, data_dir or config.data_dir, split,
                                batch_size=batch_size, keep_images=min(num, MAX_ATTENTION_PANELS),
                                return_attention=True)
  header = {"SPLIT": (split, "dataset split"), "BEST": (best, "best-validation checkpoint")}
  paths = {"predictions": analysis.write_fits(os.path.join(out_dir, "predictions.fits"), pred,
                                              model, header)}
  paths["spectra"] = plots.spectra(
      os.path.join(out_dir, "spectra.png"), analysis.wavelength(), pred["flux_true"],
      pred["weight"], pred["flux"], pred["z_true"], pred["z_median"], pred["specobj_id"], num=num)
  # The PDF median: the point estimate every results table scores (evaluate's module docstring).
  paths["redshift"] = plots.redshift(
      os.path.join(out_dir, "redshift.png"), pred["z_true"], pred["z_median"], model.z_max,
      pred["z_lo"], pred["z_hi"], label="z_median")
  paths["loss"] = plots.loss_curves(os.path.join(out_dir, "loss.png"),
                                    analysis.read_metrics(workdir))
  paths["attention"] = plots.attention(
      os.path.join(out_dir, "attention.png"), pred["image"], pred["attention"],
      config.bands.split(","), pred["specobj_id"], num=len(pred["image"]))
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and tfds log every file at INFO.
    logging.set_verbosity(logging.WARNING)
  paths = analyze(_WORKDIR.value, split=_SPLIT.value, num=_NUM.value, out_dir=_OUT_DIR.value,
                  best=_BEST.value, step=_STEP.value, data_dir=_DATA_DIR.value,
                  batch_size=_BATCH_SIZE.value)
  for name, path in paths.items():
    print(f"{name:<12s} {path}")


if __name__ == "__main__":
  app.run(main)
