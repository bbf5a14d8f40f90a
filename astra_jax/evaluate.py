"""Metrics of predicted spectra and redshifts, and the evaluation of a model on a split.

Spectra (numpy, shapes (N, 4000)): weighted MSE and R^2 of the normalised spectrum over valid
pixels, and reduced chi^2 in physical units where `weight` is an inverse variance.
Redshifts (Pasquet et al. 2019; Hayat et al. 2021): dz = (z_pred - z_true) / (1 + z_true),
sigma_MAD = 1.4826 median|dz - median(dz)|, outlier fraction eta = mean(|dz| > 0.05),
bias = median(dz); for the PDF, the PIT values and the CRPS.

Point estimate: every predictor is scored on the median of its redshift PDF (`z_median`), by one
rule for all: ASTRA's and the photo MLP's PDF median, and for a predictor that gives a number
rather than a PDF (mean spectrum, colour kNN, photo trees) that number, the median of a PDF that
is a spike there. The median minimises the expected |dz|, which sigma_MAD and eta measure; the
headline sigma_MAD, eta and bias of the results table are the median's, and the PDF mean's and
mode's sigma_MAD are reported beside them.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
from jax.experimental import multihost_utils
import numpy as np

from astra_jax import grid
from astra_jax import losses
from astra_jax import sharding
from astra_jax.data import MODEL_KEYS
from astra_jax.models import astra as astra_model

OUTLIER_DZ = 0.05


# ---------------------------------------------------------------- redshift


def redshift_metrics(z_pred: np.ndarray, z_true: np.ndarray) -> dict[str, float]:
  """sigma_MAD, outlier fraction (|dz| > 0.05), bias (median dz) and count; inputs (N,)."""
  z_pred, z_true = np.asarray(z_pred, np.float64), np.asarray(z_true, np.float64)
  if z_pred.size == 0:
    return {"sigma_mad": float("nan"), "outlier_fraction": float("nan"), "bias": float("nan"),
            "n": 0}
  dz = (z_pred - z_true) / (1.0 + z_true)
  median = np.median(dz)
  return {"sigma_mad": float(1.4826 * np.median(np.abs(dz - median))),
          "outlier_fraction": float(np.mean(np.abs(dz) > OUTLIER_DZ)),
          "bias": float(median), "n": int(dz.size)}


def _pdf_cdf_at(pdf: np.ndarray, edges: np.ndarray, z: np.ndarray) -> np.ndarray:
  """CDF of histogram PDFs (N, B) with bin `edges` (B+1,) at z (N,), linear within a bin."""
  cdf = np.concatenate([np.zeros((pdf.shape[0], 1)), np.cumsum(pdf, axis=1)], axis=1)
  return np.array([np.interp(zi, edges, ci) for zi, ci in zip(z, cdf)])


def pit(pdf: np.ndarray, edges: np.ndarray, z_true: np.ndarray) -> np.ndarray:
  """Probability integral transform CDF(z_true) of each PDF; uniform if the PDFs are calibrated."""
  return _pdf_cdf_at(np.asarray(pdf, np.float64), np.asarray(edges, np.float64), z_true)


def crps(pdf: np.ndarray, edges: np.ndarray, z_true: np.ndarray) -> np.ndarray:
  """Continuous ranked probability score (N,) of histogram PDFs (N, B) on `edges` (B+1,).

  CRPS = integral (CDF(z) - H(z - z_true))^2 dz, exact for a CDF linear within each bin.
  """
  pdf, edges = np.asarray(pdf, np.float64), np.asarray(edges, np.float64)
  z_true = np.asarray(z_true, np.float64)
  out = np.empty(len(z_true))
  for n, (p, zt) in enumerate(zip(pdf, z_true)):
    knots = np.unique(np.clip(np.concatenate([edges, [zt]]), edges[0], edges[-1]))
    cdf = np.interp(knots, edges, np.concatenate([[0.0], np.cumsum(p)]))
    step = (knots >= zt).astype(np.float64)
    # On each interval the integrand is a quadratic in z; Simpson's rule is exact for it.
    f0, f1 = cdf[:-1] - step[:-1], cdf[1:] - step[:-1]
    mid = 0.5 * (f0 + f1)
    out[n] = np.sum(np.diff(knots) * (f0**2 + 4 * mid**2 + f1**2) / 6.0)
    out[n] += max(zt - edges[-1], 0.0) + max(edges[0] - zt, 0.0)  # Truth outside the bins.
  return out


# ---------------------------------------------------------------- spectrum


def spectrum_metrics(pred_norm: np.ndarray, flux_norm: np.ndarray, weight: np.ndarray
                     ) -> dict[str, float]:
  """Normalised-spectrum metrics over valid pixels (weight > 0); inputs (N, 4000).

  `mse`: mean over galaxies of sum(w r^2) / sum(w), as in the training loss.
  `r2`: 1 - sum over valid pixels of r^2 / sum of (true - that galaxy's mean)^2, pooled over
  galaxies; 1 is perfect, 0 is no better than each galaxy's flat mean.
  """
  valid = weight > 0
  keep = valid.any(axis=1)
  pred_norm, flux_norm, weight, valid = pred_norm[keep], flux_norm[keep], weight[keep], valid[keep]
  resid2 = (pred_norm - flux_norm) ** 2
  mse = np.sum(weight * resid2, axis=1) / np.sum(weight, axis=1)
  mean = np.sum(np.where(valid, flux_norm, 0), axis=1, keepdims=True) / valid.sum(1, keepdims=True)
  ss_res = np.sum(np.where(valid, resid2, 0))
  ss_tot = np.sum(np.where(valid, (flux_norm - mean) ** 2, 0))
  return {"mse": float(np.mean(mse)) if mse.size else float("nan"),
          "r2": float(1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")}


def reduced_chi2(pred_flux: np.ndarray, flux: np.ndarray, ivar: np.ndarray) -> float:
  """sum ivar (pred - flux)^2 / number of pixels with ivar > 0, fluxes in 1e-17 erg/s/cm^2/A."""
  valid = ivar > 0
  if not valid.any():
    return float("nan")
  return float(np.sum(np.where(valid, ivar * (pred_flux - flux) ** 2, 0)) / valid.sum())


def weight_is_ivar(weight: np.ndarray) -> bool:
  """True unless every valid weight is exactly 1 (ASTROPIXEL CSV spectra carry no ivar)."""
  valid = weight[weight > 0]
  return valid.size > 0 and not np.all(valid == 1.0)


#: speclite filters inside the grid's 3802-9546 Angstrom (PS1 y reaches 11000 Angstrom).
SYNTHETIC_BANDS = ("panstarrs-g", "panstarrs-r", "panstarrs-i", "panstarrs-z")


def synthetic_band_errors(pred_flux: np.ndarray, flux: np.ndarray, weight: np.ndarray,
                          bands=SYNTHETIC_BANDS) -> dict[str, float]:
  """Median |F_pred / F_true - 1| of synthetic broad-band fluxes, per speclite filter.

  Spectra (N, 4000) in 1e-17 erg/s/cm^2/A on the grid; a galaxy counts in a band only where its
  true spectrum is valid over the whole filter (weight > 0 wherever the response is > 0).
  """
  import astropy.units as u  # pylint: disable=g-import-not-at-top
  import speclite.filters  # pylint: disable=g-import-not-at-top
  wave = grid.wavelength()
  filters = speclite.filters.load_filters(*bands)
  unit = 1e-17 * u.erg / (u.s * u.cm**2 * u.AA)
  true = filters.get_ab_maggies(np.where(weight > 0, flux, 0.0) * unit, wave * u.AA)
  pred = filters.get_ab_maggies(pred_flux * unit, wave * u.AA)
  out = {}
  for f in filters:
    response = np.interp(wave, f.wavelength, f.response, left=0, right=0) > 0
    covered = np.all(weight[:, response] > 0, axis=1) & (np.asarray(true[f.name]) > 0)
    err = np.abs(np.asarray(pred[f.name])[covered] / np.asarray(true[f.name])[covered] - 1)
    out[f.name.split("-")[-1]] = float(np.median(err)) if err.size else float("nan")
  return out


# ---------------------------------------------------------------- a model on a split


#: Inputs that `collect_predictions` returns: per-galaxy rows of truth, not images.
_TRUTH_KEYS = ("flux", "weight", "z", "has_z", "aperture_fluxes")


def _gather(tree):
  """Global (sharded) arrays -> numpy on every host."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _gather_host_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows (axis 0) of host arrays, concatenated in process order (the global
  batch's order); byte strings (specobj_id) travel as fixed-width uint8 rows."""
  if jax.process_count() == 1:
    return rows
  width = {k: int(multihost_utils.process_allgather(np.int32(v.dtype.itemsize)).max())
           for k, v in rows.items() if v.dtype.kind == "S"}
  encoded = {k: (v.astype(f"S{width[k]}").view(np.uint8).reshape(len(v), width[k])
                 if k in width else v) for k, v in rows.items()}
  out = multihost_utils.process_allgather(encoded, tiled=True)
  return {k: (np.ascontiguousarray(v).view(f"S{width[k]}").reshape(-1) if k in width else v)
          for k, v in out.items()}


def collect_predictions(eval_step, params, batches: Iterable[dict], mesh, model
                        ) -> dict[str, np.ndarray]:
  """Runs `eval_step` over `batches`; returns truth and predictions of the real examples.

  Keys: flux, weight, z, has_z, aperture_fluxes (N, ...) truth and input; spectrum (N, 4000)
  normalised prediction, log_norm (N,), pred_flux (N, 4000) in 1e-17 erg/s/cm^2/A, z_pdf (N, B),
  z_mean, z_mode, z_median (N,); and specobj_id when the batches carry it. With several
  processes every process gets every galaxy's rows; the images stay where they were read.
  """
  centers = np.asarray(model.z_centers())
  parts: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    host_only = {k: batch[k] for k in batch if k not in MODEL_KEYS}
    device_batch = sharding.to_global({k: batch[k] for k in MODEL_KEYS}, mesh)
    _, outputs = eval_step(params, device_batch)
    got = _gather({**{k: device_batch[k] for k in _TRUTH_KEYS}, **outputs})
    for k, v in {**got, **_gather_host_rows(host_only)}.items():
      parts.setdefault(k, []).append(np.asarray(v))
  out = {k: np.concatenate(v) for k, v in parts.items()}
  keep = out.pop("mask").astype(bool) if "mask" in out else np.ones(len(out["z"]), bool)
  out = {k: v[keep] for k, v in out.items()}
  stats = jax.device_get(astra_model.z_pdf_stats(out["z_logits"], centers))
  out.update(z_pdf=stats["pdf"], z_mean=stats["mean"], z_mode=stats["mode"],
             z_median=stats["median"])
  out["pred_flux"] = np.asarray(losses.denormalise(out["spectrum"], out["log_norm"]))
  return out


def scalar_metrics(pred: dict[str, np.ndarray], z_edges: np.ndarray | None = None
                   ) -> dict[str, float]:
  """Every scalar figure of merit of one predictor on one split.

  `pred` holds the truth (flux, weight, z, has_z) and the prediction: spectrum (normalised),
  pred_flux (1e-17 erg/s/cm^2/A), z_mean, z_mode, z_median (the point estimate, see the module
  docstring), and optionally z_pdf on bins `z_edges`. Redshift figures are `z_{estimator}_*`.
  """
  flux_norm = np.asarray(losses.normalise_spectrum(pred["flux"], pred["weight"])[0])
  out = {f"spectrum_{k}": v for k, v in
         spectrum_metrics(pred["spectrum"], flux_norm, pred["weight"]).items()}
  if weight_is_ivar(pred["weight"]):
    out["spectrum_reduced_chi2"] = reduced_chi2(pred["pred_flux"], pred["flux"], pred["weight"])
  for band, err in synthetic_band_errors(pred["pred_flux"], pred["flux"], pred["weight"]).items():
    out[f"band_{band}_frac_error"] = err
  has_z = pred["has_z"].astype(bool)
  for estimator in ("median", "mean", "mode"):
    if f"z_{estimator}" not in pred:
      continue
    for k, v in redshift_metrics(pred[f"z_{estimator}"][has_z], pred["z"][has_z]).items():
      out[f"z_{estimator}_{k}"] = v
  if "z_pdf" in pred and z_edges is not None and has_z.any():
    out["z_crps"] = float(np.mean(crps(pred["z_pdf"][has_z], z_edges, pred["z"][has_z])))
    counts, _ = np.histogram(pit(pred["z_pdf"][has_z], z_edges, pred["z"][has_z]), bins=10,
                             range=(0, 1))
    # Calibrated PDFs give a flat PIT histogram: report its largest departure from flat.
    out["z_pit_max_deviation"] = float(np.max(np.abs(counts / counts.sum() - 0.1)))
  return out


def z_edges(model) -> np.ndarray:
  """Edges (num_z_bins + 1,) of the model's redshift bins, uniform on [0, z_max]."""
  return np.linspace(0.0, model.z_max, model.num_z_bins + 1)


def evaluate_model(model, params, eval_step, batches, mesh, config) -> dict[str, Any]:
  """Predictions and scalar metrics of `model` on the batches of one split."""
  del config
  pred = collect_predictions(eval_step, params, batches, mesh, model)
  return {"scalars": scalar_metrics(pred, z_edges(model)), "predictions": pred}


# ---------------------------------------------------------------- ASTRA beside the baselines

#: (metric key, label, which way is better) of the results table.
TABLE_ROWS = (
    ("spectrum_r2", "spectrum R^2 (normalised, valid pixels)", "higher"),
    ("spectrum_mse", "spectrum weighted MSE (normalised)", "lower"),
    ("spectrum_reduced_chi2", "spectrum reduced chi^2", "lower"),
    ("band_g_frac_error", "synthetic g flux: median abs. fractional error", "lower"),
    ("band_r_frac_error", "synthetic r flux: median abs. fractional error", "lower"),
    ("band_i_frac_error", "synthetic i flux: median abs. fractional error", "lower"),
    ("band_z_frac_error", "synthetic z flux: median abs. fractional error", "lower"),
    ("z_median_sigma_mad", "redshift sigma_MAD (PDF median)", "lower"),
    ("z_median_outlier_fraction", "redshift outlier fraction eta (abs dz > 0.05)", "lower"),
    ("z_median_bias", "redshift bias median(dz)", "closer to 0"),
    ("z_mean_sigma_mad", "redshift sigma_MAD (PDF mean)", "lower"),
    ("z_mode_sigma_mad", "redshift sigma_MAD (PDF mode)", "lower"),
    ("z_crps", "redshift CRPS", "lower"),
    ("z_pit_max_deviation", "PIT histogram: max abs. deviation from flat", "lower"),
)
PREDICTORS = ("ASTRA", "mean spectrum", "colour kNN", "photo trees", "photo MLP")
#: The baselines that need the dataset's multi-aperture `aperture_fluxes` (see `photometry`).
PHOTOMETRIC_PREDICTORS = ("photo trees", "photo MLP")


def baseline_scalars(model, train_data: dict[str, np.ndarray], data: dict[str, np.ndarray]
                     ) -> dict[str, float]:
  """`scalar_metrics` of a baseline fitted on `train_data` and scored on `data` (its `z_median`
  is its point estimate; a point estimate is its own median).

  A baseline with a redshift PDF (`z_pdf` in its prediction) exposes its bin edges as
  `model.z_edges`; it is then scored on CRPS and PIT too.
  """
  pred = model.fit(train_data).predict(data)
  return scalar_metrics(pred, getattr(model, "z_edges", None))


def compare_with_baselines(dataset_dir: str, astra_scalars: dict[str, float], split: str = "test",
                           train_split: str = "train") -> dict[str, dict[str, float]]:
  """Scores the baselines (fitted on `train_split`) on `split`: {predictor: scalars}.

  The photometric baselines (PHOTOMETRIC_PREDICTORS) need `aperture_fluxes` in the dataset;
  where it has none (prepared before they were stored) they are left out, with a warning.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from astra_jax import baselines  # pylint: disable=g-import-not-at-top
  from astra_jax import photometry  # pylint: disable=g-import-not-at-top
  train_data = baselines.load_split(dataset_dir, train_split)
  data = baselines.load_split(dataset_dir, split)
  models = {"mean spectrum": baselines.MeanSpectrum(), "colour kNN": baselines.ColourKNN()}
  if photometry.KEY in train_data and photometry.KEY in data:
    models.update({"photo trees": baselines.PhotoTrees(), "photo MLP": baselines.PhotoMLP()})
  else:
    logging.warning("The dataset in %s has no %r: the %s baselines are left out of the results "
                    "(prepare the dataset again to score them).", dataset_dir, photometry.KEY,
                    " and ".join(PHOTOMETRIC_PREDICTORS))
  results = {"ASTRA": astra_scalars}
  for name, model in models.items():
    results[name] = baseline_scalars(model, train_data, data)
  return results


def results_markdown(results: dict[str, dict[str, float]], split: str = "test") -> str:
  """The side-by-side table of `compare_with_baselines`, as Markdown: one column per predictor
  of PREDICTORS that `results` holds, in that order."""
  predictors = [p for p in PREDICTORS if p in results]
  n = int(results["ASTRA"].get("z_median_n", results["ASTRA"].get("z_mean_n", 0)))
  lines = [f"| {split} split ({n} galaxies) | better | " + " | ".join(predictors) + " |",
           "|---|---|" + "---:|" * len(predictors)]
  for key, label, better in TABLE_ROWS:
    values = [results[p].get(key) for p in predictors]
    if all(v is None for v in values):
      continue
    cells = ["–" if v is None or not np.isfinite(v) else f"{v:.4g}" for v in values]
    lines.append(f"| {label} | {better} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_results(workdir: str, results: dict[str, dict[str, float]], split: str = "test") -> str:
  """results.json and results.md in `workdir` (a local folder or a URL such as gs://bucket/run,
  through etils.epath); returns the Markdown table."""
  import json  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  table = results_markdown(results, split)
  epath.Path(workdir, "results.json").write_text(
      json.dumps({"split": split, "results": results}, indent=2, sort_keys=True))
  epath.Path(workdir, "results.md").write_text(
      f"# ASTRA and baselines on the {split} split\n\n{table}\n")
  return table


def format_results(results: dict[str, Any]) -> str:
  """The test-split metrics of ASTRA (`train.train_and_evaluate`'s results), then the table
  beside the baselines."""
  scalars = results["scalars"]
  if not scalars:
    return "No test split: nothing evaluated."
  lines = ["Test-split metrics of ASTRA:"]
  for k in sorted(scalars):
    lines.append(f"  {k:<32s} {scalars[k]:.5g}")
  if results.get("table"):
    lines += ["", results["table"]]
  return "\n".join(lines)
