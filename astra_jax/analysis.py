"""A trained ASTRA run in a notebook: restore it from its workdir, predict, read its metrics.

Nothing here needs the training data: `restore` rebuilds the model from the workdir's
`config.json` and reads the parameters from its Orbax checkpoints; `predict` runs on any images
(N, bands, H, W) float16 or float32, asinh-stretched as the prepared dataset stores them.
`predict_split` is the one function that reads a prepared dataset.

Units: flux in 1e-17 erg/s/cm^2/Angstrom on `astra_jax.grid` (4000 pixels, vacuum observed-frame
Angstrom); redshift bins tile [0, z_max] uniformly, and each PDF is uniform within a bin.
Single-process: parameters and images live on this process's local devices. A workdir may be a
URL (gs://bucket/run) as well as a local folder: its files are read through `etils.epath`, its
checkpoints by Orbax.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from astra_jax import checkpoint
from astra_jax import grid
from astra_jax import losses
from astra_jax import paths
from astra_jax import sharding
from astra_jax import train
from astra_jax.data import fits_io
from astra_jax.models import astra as astra_model

#: Quantiles of the CDF that bound the central 68 % interval of a redshift PDF.
INTERVAL_QUANTILES = (0.16, 0.84)


# ---------------------------------------------------------------- grids


def wavelength() -> np.ndarray:
  """Vacuum observed-frame wavelength (4000,) float64 in Angstrom of every spectrum."""
  return grid.wavelength()


def z_edges(model: astra_model.Astra) -> np.ndarray:
  """Edges (num_z_bins + 1,) float64 of the redshift bins that `z_pdf` refers to."""
  return np.linspace(0.0, model.z_max, model.num_z_bins + 1)


# ---------------------------------------------------------------- restoring a run


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's `config.json` (as training wrote it) as a ConfigDict."""
  path = epath.Path(workdir, "config.json")
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no config.json; is this a training workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def local_mesh() -> Mesh:
  """A 1-D `'data'` mesh over this process's devices."""
  return sharding.create_mesh(jax.local_devices())


def _pick_step(manager: ocp.CheckpointManager, workdir: str, step: int | None, best: bool) -> int:
  steps = manager.all_steps()
  kind = "best" if best else "latest"
  if not steps:
    raise FileNotFoundError(f"{workdir}: no {kind} checkpoint in {manager.directory}")
  if step is None:
    step = manager.best_step() if best else manager.latest_step()
  if step not in steps:
    raise FileNotFoundError(f"{workdir}: no {kind} checkpoint at step {step}; "
                            f"{manager.directory} holds steps {sorted(steps)}")
  return int(step)


def has_run(workdir: str) -> bool:
  """Whether `workdir` holds a run that `restore` can read: config.json and a latest checkpoint.

  Nothing is created; Orbax's temporary folders of an unfinished save do not count.
  """
  directory = paths.join(paths.absolute(workdir), "checkpoints")
  if not (paths.exists(paths.join(workdir, "config.json")) and paths.is_dir(directory)):
    return False
  manager = checkpoint.read_only_manager(directory)
  try:
    return bool(manager.all_steps())
  finally:
    manager.close()


def restore(workdir: str, step: int | None = None, best: bool = False
            ) -> tuple[ml_collections.ConfigDict, astra_model.Astra, Any]:
  """(config, model, params) of a training run, params replicated over the local devices.

  Reads `workdir/checkpoints/<step>` (the latest step unless `step` is given) or, with
  `best=True`, `workdir/best/<step>` (the lowest validation loss unless `step` is given). Only
  shapes are computed (jax.eval_shape): no data and no initialisation are needed, and any device
  count works whatever the run trained on. Raises FileNotFoundError naming `workdir` when there is
  no such checkpoint, `checkpoint.CheckpointMismatchError` when the model of `config.json` does
  not fit it, and `checkpoint.CheckpointDamagedError` when Orbax cannot read it.
  """
  config = load_config(workdir)
  model = train.make_model(config)
  mesh = local_mesh()
  subdir = "best" if best else "checkpoints"
  manager = checkpoint.read_only_manager(paths.join(paths.absolute(workdir), subdir), best)
  try:
    step = _pick_step(manager, workdir, step, best)
    target = train.abstract_state(config, model, train.make_optimizer(config), mesh)
    if best:  # Training saves only the params there.
      return config, model, checkpoint.restore(manager, step, target.params)
    # The optimiser state is read into host memory (a numpy target; no device memory), then
    # dropped: StandardRestore restores whole trees only.
    host = lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape)
    target = target.replace(step=host(target.step), opt_state=jax.tree.map(host, target.opt_state))
    state = checkpoint.restore(manager, step, target)
    return config, model, state.params
  finally:
    manager.close()


# ---------------------------------------------------------------- predictions


def z_interval(pdf: np.ndarray, edges: np.ndarray,
               quantiles: tuple[float, float] = INTERVAL_QUANTILES
               ) -> tuple[np.ndarray, np.ndarray]:
  """(z_lo, z_hi) (N,) float64: the `quantiles` of histogram PDFs (N, B) on bin `edges` (B+1,).

  The CDF is linear within a bin (uniform density there), as in `evaluate.pit`; the default is the
  central 68 % interval. PDFs need not sum exactly to 1 (they are renormalised).
  """
  pdf = np.clip(np.asarray(pdf, np.float64), 0.0, None)
  edges = np.asarray(edges, np.float64)
  cdf = np.cumsum(pdf, axis=1)
  cdf /= cdf[:, -1:]
  out = []
  for q in quantiles:
    # The first bin whose upper CDF reaches q holds the quantile; its density is > 0 there.
    k = np.minimum(np.sum(cdf < q, axis=1), pdf.shape[1] - 1)
    below = np.where(k > 0, np.take_along_axis(cdf, np.maximum(k - 1, 0)[:, None], 1)[:, 0], 0.0)
    mass = np.take_along_axis(cdf, k[:, None], 1)[:, 0] - below
    frac = np.clip((q - below) / np.where(mass > 0, mass, 1.0), 0.0, 1.0)
    out.append(edges[k] + frac * (edges[k + 1] - edges[k]))
  return out[0], out[1]


@functools.lru_cache(maxsize=16)
def _predict_fn(model: astra_model.Astra, return_attention: bool):
  """Jitted (params, images (B, bands, H, W), aperture_fluxes (B, bands, 5), fiber_diameter (B,))
  -> dict of per-galaxy outputs, B-sharded."""
  centers = jnp.asarray(model.z_centers())

  def fn(params, images, aperture_fluxes, fiber_diameter):
    out = model.apply({"params": params}, images, aperture_fluxes, fiber_diameter, train=False,
                      return_attention=return_attention)
    stats = astra_model.z_pdf_stats(out["z_logits"], centers)
    pred = dict(flux=losses.denormalise(out["spectrum"], out["log_norm"]),
                spectrum=out["spectrum"], log_norm=out["log_norm"], z_pdf=stats["pdf"],
                z_mean=stats["mean"], z_mode=stats["mode"], z_median=stats["median"])
    if "log_norm_logits" in out:
      pred.update(log_norm_pdf=jax.nn.softmax(out["log_norm_logits"], axis=-1),
                  log_norm_anchor=out["log_norm_anchor"])
    if return_attention:
      pred["attention"] = jnp.mean(out["attention"], axis=1)
    return pred
  return jax.jit(fn)


def fiber_diameters(model: astra_model.Astra, fiber_diameter, n: int) -> np.ndarray:
  """(n,) float32 arcsec from one fiber diameter or n of them; each must be a fiber the surveys
  used (`fits_io.FIBER_DIAMETERS_ARCSEC`: the model learnt no other). None: the SDSS 3 arcsec
  fiber for a model without `fiber_input` (unused), an error for one with it."""
  if fiber_diameter is None:
    if model.fiber_input:
      raise ValueError("this model (fiber_input) predicts the light in a given fiber: pass "
                       f"fiber_diameter, one of {fits_io.FIBER_DIAMETERS_ARCSEC} arcsec (BOSS, "
                       "SDSS)")
    fiber_diameter = fits_io.SDSS_FIBER_ARCSEC
  out = np.broadcast_to(np.asarray(fiber_diameter, np.float32), (n,)).copy()
  unknown = sorted(set(out.tolist()) - set(fits_io.FIBER_DIAMETERS_ARCSEC))
  if unknown:
    raise ValueError(f"fiber_diameter {unknown} arcsec: the model learnt only the fibers "
                     f"{fits_io.FIBER_DIAMETERS_ARCSEC} (BOSS, SDSS)")
  return out


def predict(model: astra_model.Astra, params, images: np.ndarray,
            aperture_fluxes: np.ndarray | None = None, batch_size: int = 64,
            return_attention: bool = False, fiber_diameter=None) -> dict[str, np.ndarray]:
  """The model's predictions for images (N, bands, H, W), as numpy.

  Images are asinh-stretched: float16 as prepared datasets and `predict.load_galaxy` give them,
  or float32; other dtypes are converted to float32. `aperture_fluxes` (N, bands, 5) float32
  nanomaggies, `photometry.aperture_fluxes` of the same cutouts (as datasets store them and
  `predict.load_galaxy` measures them), are needed by a model that `uses_photometry`.
  `fiber_diameter` (N,) or one number, arcsec: the fiber whose light the spectrum is predicted
  in (SDSS 3, BOSS 2; `fits_io.FIBER_DIAMETERS_ARCSEC`), needed by a model with `fiber_input`.

  Returns `flux` (N, 4000) in 1e-17 erg/s/cm^2/Angstrom, `spectrum` (N, 4000) normalised,
  `log_norm` (N,) log10(norm / 1e-17 erg/s/cm^2/Angstrom), `z_pdf` (N, num_z_bins) on
  `z_edges(model)`, `z_mean`, `z_mode`, `z_median` (N,; the median is the point estimate),
  `z_lo`, `z_hi` (N,) the central 68 % interval; for a binned amplitude (`amplitude_bins`)
  `log_norm_pdf` (N, amplitude_bins), the PDF of log_norm over `log_norm_anchor` (N,) +
  `model.amplitude_centers()` (dex); and
  with `return_attention` `attention` (N, H/p, W/p): the summary token's last-block attention over
  the patch grid, averaged over heads. Batches of `batch_size` (rounded up to a multiple of the
  local device count) are split over the local devices; the last one is zero-padded and the
  padding dropped. All float32 except z_lo, z_hi (float64).
  """
  images = np.asarray(images)
  if images.dtype not in (np.float16, np.float32):
    images = images.astype(np.float32)
  n = len(images)
  if aperture_fluxes is None:
    if model.uses_photometry:
      raise ValueError("this model needs aperture_fluxes (N, bands, 5) nanomaggies of the same "
                       "cutouts: photometry.aperture_fluxes(images, headers) on the FITS files")
    aperture_fluxes = np.ones((n, images.shape[1], 5), np.float32)  # Unused by the model.
  aperture_fluxes = np.asarray(aperture_fluxes, np.float32)
  if aperture_fluxes.shape[0] != n:
    raise ValueError(f"{n} images but {aperture_fluxes.shape[0]} rows of aperture_fluxes")
  fiber_diameter = fiber_diameters(model, fiber_diameter, n)
  mesh = local_mesh()
  ndev = mesh.size
  params = jax.device_put(params, sharding.replicated(mesh))
  batch = min(-(-batch_size // ndev), -(-max(n, 1) // ndev)) * ndev
  fn = _predict_fn(model, return_attention)
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, n, batch):
    rows = slice(start, start + batch)
    chunk, fluxes, fiber = images[rows], aperture_fluxes[rows], fiber_diameter[rows]
    real = len(chunk)
    # One shape for every full batch (one compilation); padding galaxies are zeros, dropped below.
    pad = lambda x: np.concatenate([x, np.zeros((batch - real, *x.shape[1:]), x.dtype)])
    out = fn(params, *jax.device_put((pad(chunk), pad(fluxes), pad(fiber)),
                                     sharding.batch_sharding(mesh)))
    for k, v in jax.device_get(out).items():
      parts.setdefault(k, []).append(np.asarray(v)[:real])
  if not parts:
    raise ValueError("predict needs at least one image")
  pred = {k: np.concatenate(v) for k, v in parts.items()}
  pred["z_lo"], pred["z_hi"] = z_interval(pred["z_pdf"], z_edges(model))
  return pred


def predict_split(model, params, dataset_dir: str, split: str, *, batch_size: int = 64,
                  keep_images: int = 0, return_attention: bool = False) -> dict[str, np.ndarray]:
  """Truth and predictions for every galaxy of a prepared dataset's split, in file order.

  Truth: `specobj_id` (N,) str, `ra`, `dec` (N,) float64 degrees, `flux_true` (N, 4000) in
  1e-17 erg/s/cm^2/Angstrom, `weight` (N, 4000) (inverse variance, or 1/0), `z_true` (N,) float32
  (NaN where the galaxy has no redshift), `has_z` (N,) bool, `fiber_diameter` (N,) float32
  arcsec (the spectrum's fiber, which the prediction is for); plus everything `predict` returns,
  and `image` (keep_images, bands, H, W) of the first `keep_images` galaxies. The dataset is read
  batch by batch, so the split's images never sit in memory all at once.
  """
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  batches = pipeline.as_numpy(pipeline.eval_dataset(
      dataset_dir, split, global_batch=batch_size, process_index=0, process_count=1,
      extra_keys=("specobj_id", "ra", "dec")))
  return _predict_batches(model, params, batches, batch_size=batch_size, keep_images=keep_images,
                          return_attention=return_attention)


def _predict_batches(model, params, batches: Iterable[dict], *, batch_size: int,
                     keep_images: int, return_attention: bool) -> dict[str, np.ndarray]:
  parts: dict[str, list[np.ndarray]] = {}
  kept = 0
  for batch in batches:
    mask = batch["mask"].astype(bool)
    if not mask.any():
      continue
    images = batch["image"][mask]
    pred = predict(model, params, images, batch["aperture_fluxes"][mask],
                   fiber_diameter=batch["fiber_diameter"][mask], batch_size=batch_size,
                   return_attention=return_attention)
    truth = dict(specobj_id=np.array([s.decode() for s in batch["specobj_id"][mask]]),
                 ra=batch["ra"][mask].astype(np.float64), dec=batch["dec"][mask].astype(np.float64),
                 flux_true=batch["flux"][mask], weight=batch["weight"][mask],
                 z_true=np.where(batch["has_z"][mask], batch["z"][mask], np.nan).astype(np.float32),
                 has_z=batch["has_z"][mask].astype(bool),
                 fiber_diameter=batch["fiber_diameter"][mask].astype(np.float32))
    take = min(keep_images - kept, len(images))
    if take > 0:
      truth["image"], kept = images[:take], kept + take
    for k, v in {**truth, **pred}.items():
      parts.setdefault(k, []).append(v)
  if not parts:
    raise ValueError("the split holds no galaxy")
  out = {k: np.concatenate(v) for k, v in parts.items()}
  if "image" not in out:
    out["image"] = np.zeros((0,), np.float32)
  return out


# ---------------------------------------------------------------- training curves


def read_metrics(workdir: str) -> dict[str, dict[str, np.ndarray]]:
  """`metrics.jsonl` as {split: {"step": (T,) int64, metric: (T,) float64}}, sorted by step.

  A step logged twice (a run resumed from an earlier checkpoint) keeps its last record. The
  validation/test parts are named `spectrum`, `norm`, `redshift`; the train parts carry a `loss_`
  prefix: both are returned as `loss_<part>`.
  """
  path = epath.Path(workdir, "metrics.jsonl")
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl")
  records: dict[str, dict[int, dict[str, float]]] = {}
  with path.open() as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        records.setdefault(r.pop("split"), {})[int(r.pop("step"))] = r
  out = {}
  for split, by_step in records.items():
    steps = sorted(by_step)
    names = sorted({k for r in by_step.values() for k in r})
    columns = {"step": np.asarray(steps, np.int64)}
    for name in names:
      key = f"loss_{name}" if name in ("spectrum", "norm", "redshift") else name
      columns[key] = np.asarray([by_step[s].get(name, np.nan) for s in steps], np.float64)
    out[split] = columns
  return out


def read_results(workdir: str) -> tuple[str, dict[str, dict[str, float]]]:
  """(split, {predictor: {metric: value}}) of `results.json`, which training writes beside the
  checkpoints: ASTRA and the baselines on the test split (`evaluate.write_results`).

  `evaluate.results_markdown(results, split)` gives the table of the README. Raises
  FileNotFoundError when the run has no results.json (it had no test split, or did not finish).
  """
  path = epath.Path(workdir, "results.json")
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no results.json (written when training ends with a "
                            "test split)")
  stored = json.loads(path.read_text())
  return stored["split"], stored["results"]


# ---------------------------------------------------------------- galaxies without spectra


def imaged_only_mock(out_dir: str, num_galaxies: int, seed: int) -> str:
  """A mock survey of `num_galaxies` new galaxies that keeps only their images; returns out_dir.

  `mock.generate_survey` writes ASTROPIXEL folders (288 x 288 cutouts in the five bands); each
  galaxy's spectrum/ folder and data.csv are then removed, so `out_dir` holds
  `Galaxy_{id}/images/{id}_{band}.fits` and `truth.csv` (the mock's true z per specobj_id, which
  `predict.predict_folder` compares its redshifts to). `seed` picks galaxies other than those of
  the training survey (whose seed is the config's `mock_seed`).
  """
  import shutil  # pylint: disable=g-import-not-at-top
  from astra_jax.data import mock  # pylint: disable=g-import-not-at-top
  mock.generate_survey(out_dir, num_galaxies, seed=seed, num_workers=1)
  for name in os.listdir(out_dir):
    if name.startswith("Galaxy_"):
      shutil.rmtree(os.path.join(out_dir, name, "spectrum"), ignore_errors=True)
  os.remove(os.path.join(out_dir, "data.csv"))
  return out_dir


# ---------------------------------------------------------------- FITS


FLUX_UNIT = "1e-17 erg/s/cm^2/Angstrom"

#: Column name, source key of `predict_split`'s output, FITS format code, unit, comment (a FITS
#: card leaves 47 characters for it).
_COLUMNS = (
    ("specobj_id", "specobj_id", None, None, "SDSS spectroscopic object id"),
    ("ra", "ra", "D", "deg", "ICRS right ascension"),
    ("dec", "dec", "D", "deg", "ICRS declination"),
    ("z_true", "z_true", "E", None, "spectroscopic redshift (NaN: none)"),
    ("z_mean", "z_mean", "E", None, "mean of the predicted redshift PDF"),
    ("z_mode", "z_mode", "E", None, "centre of the most probable redshift bin"),
    ("z_lo", "z_lo", "E", None, "16th percentile of the redshift PDF"),
    ("z_hi", "z_hi", "E", None, "84th percentile of the redshift PDF"),
    ("z_pdf", "z_pdf", "E", None, "redshift PDF per bin (edges in HDU Z_EDGES)"),
    ("flux_pred", "flux", "E", FLUX_UNIT, "predicted flux on the wavelength grid"),
    ("flux_true", "flux_true", "E", FLUX_UNIT, "observed flux on the wavelength grid"),
    ("weight", "weight", "E", None, "ivar [(1e-17 erg/s/cm^2/A)^-2] or 1/0; 0: bad"),
)


def write_fits(path: str, pred: dict[str, np.ndarray], model: astra_model.Astra,
               header: dict[str, Any] | None = None) -> str:
  """Writes `predict_split`'s output as a FITS file; returns `path`.

  HDU 1 PREDICTIONS: a binary table with the columns of `_COLUMNS` (vector columns (4000,) on the
  grid given by LOGLAM0, DLOGLAM, NPIX; `z_pdf` (num_z_bins,)); `header` cards are added to it.
  HDU 2 Z_EDGES: the (num_z_bins + 1,) float64 redshift bin edges.
  """
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  columns = []
  for name, key, fmt, unit, _ in _COLUMNS:
    value = np.asarray(pred[key])
    if fmt is None:  # Fixed-width strings, as long as the longest id.
      value = value.astype(str)
      fmt = f"{max(1, max((len(s) for s in value), default=1))}A"
    elif value.ndim == 2:
      fmt = f"{value.shape[1]}{fmt}"
    columns.append(fits.Column(name=name, format=fmt, unit=unit, array=value))
  table = fits.BinTableHDU.from_columns(columns, name="PREDICTIONS")
  for i, (_, _, _, _, comment) in enumerate(_COLUMNS, start=1):
    table.header.comments[f"TTYPE{i}"] = comment
  table.header["LOGLAM0"] = (grid.LOGLAM0, "log10(vacuum obs-frame wavelength/A), pixel 0")
  table.header["DLOGLAM"] = (grid.DLOGLAM, "log10(wavelength/A) step per pixel")
  table.header["NPIX"] = (grid.NUM_PIXELS, "pixels of flux_pred, flux_true, weight")
  table.header["WAVEUNIT"] = ("Angstrom", "wavelengths are vacuum, observed frame")
  table.header["ZMAX"] = (float(model.z_max), "redshift bins tile [0, ZMAX] uniformly")
  table.header["NZBINS"] = (int(model.num_z_bins), "number of redshift bins")
  for key, value in (header or {}).items():
    table.header[key] = value
  edges = fits.ImageHDU(z_edges(model), name="Z_EDGES")
  edges.header["COMMENT"] = "Edges of the redshift bins of the z_pdf column (num_z_bins + 1)."
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fits.HDUList([fits.PrimaryHDU(), table, edges]).writeto(path, overwrite=True)
  return path
