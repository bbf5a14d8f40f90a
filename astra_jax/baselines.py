"""Baselines that ASTRA must beat, scored by the same metric code (`evaluate.scalar_metrics`).

(a) `MeanSpectrum`: the mean normalised training spectrum, scaled to each galaxy's r-band 3 arcsec
    aperture flux; the redshift is the median training redshift.
(b) `ColourKNN`: k nearest training neighbours in aperture colours (g-r, r-i, i-z, z-y) and
    r magnitude, all measured on the images; the neighbours' mean normalised spectrum, scaled
    like (a) by their median spectrum-to-aperture flux ratio, and their median redshift.
(c) `PhotoTrees`: gradient-boosted trees (absolute-error loss) on the multi-aperture photometric
    features of `photometry.features` for the redshift; the spectrum by the rule of (b) among the
    k nearest training neighbours in those standardised features.
(d) `PhotoMLP`: an MLP on the same features ending in ASTRA's own `RedshiftHead`, trained with
    ASTRA's smoothed cross-entropy over its redshift bins; the spectrum as in (c).
(c) and (d) need the dataset's `aperture_fluxes` (see `photometry`).
All see only what ASTRA sees at prediction time: the images (through their aperture photometry),
and for the amplitude the fiber the spectrum is taken in (`fiber_diameter`): each baseline's
spectrum-to-aperture ratio comes from training galaxies observed through the same fiber
(`FiberAmplitudes`), as ASTRA's amplitude head reads the fiber (`Astra.fiber_input`). Neither
uses the fiber for the redshift or the spectrum's shape.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from astra_jax import losses
from astra_jax import models
from astra_jax import photometry

R_BAND = 1  # Index of r in the g,r,i,z,y aperture fluxes.
_KEYS = ("flux", "weight", "aperture_flux", "fiber_diameter", "z", "has_z", "specobj_id")
#: Loaded where the dataset has them (datasets prepared before they were added do not).
_OPTIONAL_KEYS = (photometry.KEY,)


def load_split(dataset_dir: str, split: str, keys: Sequence[str] | None = None
               ) -> dict[str, np.ndarray]:
  """Every example of `split` except its images, as numpy arrays stacked along axis 0: `keys`,
  or all the baselines read (those of _OPTIONAL_KEYS the dataset has)."""
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = pipeline.load_builder(dataset_dir)
  if keys is None:
    keys = _KEYS + tuple(k for k in _OPTIONAL_KEYS if k in builder.info.features.keys())
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {k: ex[k] for k in keys}).batch(256)
  parts = list(tfds.as_numpy(ds))
  return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _normalised(data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(flux / norm, norm, valid) exactly as the training loss normalises."""
  flux_norm, norm = losses.normalise_spectrum(data["flux"], data["weight"])
  return np.asarray(flux_norm), np.asarray(norm), data["weight"] > 0


def _valid_mean(spectra: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
  """Mean over `axis` of the valid pixels only; 0 where no spectrum is valid."""
  count = valid.sum(axis)
  return np.where(valid, spectra, 0).sum(axis) / np.maximum(count, 1)


def _flux_ratio(norm: np.ndarray, aperture_r: np.ndarray) -> np.ndarray:
  """norm / aperture r flux (1e-17 erg/s/cm^2/A per nanomaggy); NaN without a usable aperture."""
  ok = np.isfinite(aperture_r) & (aperture_r > 0)
  return np.where(ok, norm / np.where(ok, aperture_r, 1.0), np.nan)


def _prediction(data, spectrum, log_norm, z) -> dict[str, np.ndarray]:
  """A predictor's output in the layout `evaluate.scalar_metrics` scores; a point estimate z
  is its own PDF mean, mode and median."""
  return {"flux": data["flux"], "weight": data["weight"], "z": data["z"], "has_z": data["has_z"],
          "spectrum": spectrum, "log_norm": log_norm, "z_mean": z, "z_mode": z, "z_median": z,
          "pred_flux": spectrum * 10.0 ** log_norm[:, None]}


class FiberAmplitudes:
  """The baselines' amplitude: log10 of the median spectrum-norm-to-r-aperture-flux ratio of the
  k nearest training galaxies taken through the same fiber (in a standardised feature space),
  times the galaxy's own r-band 3 arcsec aperture flux.

  A fiber of 2 arcsec (BOSS) holds ~0.24 dex less of a mock galaxy's light than one of 3
  (SDSS). Each fiber has its own neighbour index; a galaxy whose fiber no training galaxy had
  takes its neighbours among all of them. Without a usable ratio or aperture flux (NaN, <= 0),
  the neighbours' median norm. k=None: every training galaxy of the fiber, whatever the
  features (`MeanSpectrum`; `features` may then be None).
  """

  def __init__(self, features: np.ndarray | None, train: dict[str, np.ndarray],
               k: int | None = 10, threads: int | None = 1):
    from sklearn import neighbors  # pylint: disable=g-import-not-at-top
    self.threads = threads
    _, self.norm, _ = _normalised(train)
    self.ratio = _flux_ratio(self.norm, train["aperture_flux"][:, R_BAND])
    fiber = train["fiber_diameter"]
    self.groups = {}  # fiber (arcsec, or None: all) -> (training rows, their index or None)
    for key, rows in [(None, np.arange(len(fiber)))] + [
        (float(f), np.flatnonzero(fiber == f)) for f in np.unique(fiber)]:
      index = None if k is None else neighbors.NearestNeighbors(
          n_neighbors=min(k, len(rows))).fit(features[rows])
      self.groups[key] = rows, index

  def log_norm(self, features: np.ndarray | None, fiber_diameter: np.ndarray,
               aperture_r: np.ndarray) -> np.ndarray:
    """(N,) log10(norm / 1e-17 erg/s/cm^2/A) of galaxies with standardised `features` (N, F),
    spectra taken through `fiber_diameter` (N,) arcsec, r aperture flux (N,) nanomaggies."""
    fiber = np.asarray(fiber_diameter, np.float64)
    out = np.empty(len(fiber), np.float64)
    for f in np.unique(fiber):
      rows_out = np.flatnonzero(fiber == f)
      rows, index = self.groups.get(float(f), self.groups[None])
      if index is None:  # k=None: every galaxy's neighbours are all of the fiber's.
        idx = rows[None, :]
      else:
        with _openmp_threads(self.threads):
          idx = rows[index.kneighbors(features[rows_out], return_distance=False)]
      with np.errstate(all="ignore"):  # All-NaN ratios fall back to the neighbours' norm below.
        ratio = np.nanmedian(self.ratio[idx], axis=1)
      fallback = np.median(self.norm[idx], axis=1)
      own = aperture_r[rows_out]
      usable = (own > 0) & np.isfinite(ratio)
      out[rows_out] = np.where(usable, ratio * np.where(usable, own, 1.0), fallback)
    return np.log10(out)


class MeanSpectrum:
  """Baseline (a): one mean spectrum, scaled by the r-band aperture flux times the median
  norm-to-aperture ratio of the training galaxies taken through the same fiber."""

  def fit(self, train: dict[str, np.ndarray]) -> "MeanSpectrum":
    flux_norm, _, valid = _normalised(train)
    self.spectrum = _valid_mean(flux_norm, valid, axis=0)
    self.amplitudes = FiberAmplitudes(None, train, k=None)
    self.z = float(np.median(train["z"][train["has_z"].astype(bool)]))
    return self

  def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(data["z"])
    log_norm = self.amplitudes.log_norm(None, data["fiber_diameter"],
                                        data["aperture_flux"][:, R_BAND])
    return _prediction(data, np.tile(self.spectrum, (n, 1)), log_norm,
                       np.full(n, self.z, np.float32))


def colour_features(aperture_flux: np.ndarray) -> np.ndarray:
  """(N, 5) grizy nanomaggies -> (N, 5): g-r, r-i, i-z, z-y and r, in asinh magnitudes.

  Asinh magnitudes (Lupton et al. 1999, softening 0.01 nanomaggies ~ 27.5 mag) stay finite for the
  faint or negative aperture fluxes that noise produces.
  """
  b = 0.01
  mag = -2.5 / np.log(10) * (np.arcsinh(np.nan_to_num(aperture_flux) / (2 * b)) + np.log(b))
  mag = 22.5 + mag
  return np.concatenate([mag[:, :-1] - mag[:, 1:], mag[:, R_BAND:R_BAND + 1]], axis=1)


class ColourKNN:
  """Baseline (b): k nearest neighbours in standardised aperture colours and r magnitude."""

  def __init__(self, k: int = 10):
    self.k = k

  def fit(self, train: dict[str, np.ndarray]) -> "ColourKNN":
    features = colour_features(train["aperture_flux"])
    self.mean, self.std = features.mean(0), features.std(0) + 1e-6
    self.features = (features - self.mean) / self.std
    self.flux_norm, _, self.valid = _normalised(train)
    self.amplitudes = FiberAmplitudes(self.features, train, self.k)
    self.z = np.where(train["has_z"].astype(bool), train["z"], np.nan)
    return self

  def neighbours(self, data: dict[str, np.ndarray]) -> np.ndarray:
    """(N, k) indices of the training neighbours of each galaxy, nearest first."""
    features = (colour_features(data["aperture_flux"]) - self.mean) / self.std
    d2 = ((features[:, None, :] - self.features[None, :, :]) ** 2).sum(-1)
    k = min(self.k, len(self.features))
    idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(d2, idx, axis=1).argsort(axis=1)
    return np.take_along_axis(idx, order, axis=1)

  def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    idx = self.neighbours(data)
    spectrum = _valid_mean(self.flux_norm[idx], self.valid[idx], axis=1)
    features = (colour_features(data["aperture_flux"]) - self.mean) / self.std
    log_norm = self.amplitudes.log_norm(features, data["fiber_diameter"],
                                        data["aperture_flux"][:, R_BAND])
    z = np.nanmedian(self.z[idx], axis=1).astype(np.float32)
    return _prediction(data, spectrum, log_norm, z)


# ---------------------------------------------------------------- multi-aperture photometry


def photometric_features(data: dict[str, np.ndarray]) -> np.ndarray:
  """(N, F) `photometry.features` of `data`'s `aperture_fluxes` (N, 5, 5) nanomaggies.

  Raises KeyError, saying what is missing, for a dataset prepared without `aperture_fluxes`.
  """
  if photometry.KEY not in data:
    raise KeyError(
        f"no {photometry.KEY!r} in the data: the photometric baselines need (5, 5) float32 "
        f"nanomaggies per galaxy (grizy x {photometry.DIAMETERS_ARCSEC} arcsec apertures, "
        "photometry.aperture_fluxes); prepare the dataset again with a version that stores them")
  return photometry.features(data[photometry.KEY])


def _openmp_threads(threads: int | None):
  """A context limiting scikit-learn's OpenMP threads to `threads` (None: no limit)."""
  if threads is None:
    return contextlib.nullcontext()
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  return threadpoolctl.threadpool_limits(threads, user_api="openmp")


class _Standardiser:
  """Feature-wise (x - mean) / std with the training split's statistics; NaN -> 0 (the mean)."""

  def __init__(self, x: np.ndarray):
    self.mean, self.std = photometry.feature_statistics(x)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return np.nan_to_num((x - self.mean) / self.std).astype(np.float32)


class NeighbourSpectra:
  """Spectra by the rule of `ColourKNN`, in any standardised feature space.

  The mean normalised spectrum of the k nearest training galaxies (Euclidean), scaled by the
  `FiberAmplitudes` of the k nearest taken through the galaxy's fiber.
  """

  def __init__(self, features: np.ndarray, train: dict[str, np.ndarray], k: int = 10,
               threads: int | None = 1):
    from sklearn import neighbors  # pylint: disable=g-import-not-at-top
    self.k, self.threads = min(k, len(features)), threads
    self.index = neighbors.NearestNeighbors(n_neighbors=self.k).fit(features)
    self.flux_norm, _, self.valid = _normalised(train)
    self.amplitudes = FiberAmplitudes(features, train, k, threads)

  def neighbours(self, features: np.ndarray) -> np.ndarray:
    """(N, k) indices of the training neighbours of each galaxy, nearest first."""
    with _openmp_threads(self.threads):
      return self.index.kneighbors(features, return_distance=False)

  def predict(self, features: np.ndarray, data: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray]:
    """(spectrum (N, 4000) normalised, log_norm (N,)) of galaxies with standardised `features`
    (N, F) and `data`'s fiber_diameter and r aperture flux."""
    idx = self.neighbours(features)
    spectrum = _valid_mean(self.flux_norm[idx], self.valid[idx], axis=1)
    log_norm = self.amplitudes.log_norm(features, data["fiber_diameter"],
                                        data["aperture_flux"][:, R_BAND])
    return spectrum, log_norm


def _redshift_labels(train: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(z (N,) float32, has_z (N,) bool) of the training split."""
  return train["z"].astype(np.float32), train["has_z"].astype(bool)


class PhotoTrees:
  """Baseline (c): boosted trees on the multi-aperture features for z; kNN spectra.

  scikit-learn's HistGradientBoostingRegressor(loss="absolute_error") (its median-seeking loss
  suits the long tails of photometric redshift errors), without early stopping, so a fit uses
  no held-out part of the training split and is deterministic given `seed`.

  `threads` caps scikit-learn's OpenMP threads (None: all cores). One by default: these fits
  are small, and OpenMP's spinning threads slow down ~20x on cores that other processes share
  (500 galaxies, 200 iterations on a loaded 2-core machine: 17.9 s with 2 threads, 0.8 s with 1).
  """

  def __init__(self, k: int = 10, max_iter: int = 200, learning_rate: float = 0.1,
               max_leaf_nodes: int = 31, seed: int = 0, threads: int | None = 1):
    self.k, self.seed, self.threads = k, seed, threads
    self.tree_args = dict(max_iter=max_iter, learning_rate=learning_rate,
                          max_leaf_nodes=max_leaf_nodes)

  def fit(self, train: dict[str, np.ndarray]) -> "PhotoTrees":
    from sklearn import ensemble  # pylint: disable=g-import-not-at-top
    x = photometric_features(train)
    z, has_z = _redshift_labels(train)
    self.trees = ensemble.HistGradientBoostingRegressor(
        loss="absolute_error", early_stopping=False, random_state=self.seed, **self.tree_args)
    with _openmp_threads(self.threads):
      self.trees.fit(x[has_z], z[has_z])
    self.standardise = _Standardiser(x)
    self.spectra = NeighbourSpectra(self.standardise(x), train, self.k, self.threads)
    return self

  def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = photometric_features(data)
    with _openmp_threads(self.threads):
      z = self.trees.predict(x).astype(np.float32)
    spectrum, log_norm = self.spectra.predict(self.standardise(x), data)
    return _prediction(data, spectrum, log_norm, z)


class PhotoNet(nn.Module):
  """Features (B, F) -> redshift logits (B, num_bins): depth x Dense(width) + GELU, then ASTRA's
  `RedshiftHead` (the bins of `models.z_bin_centers(num_bins, z_max)`)."""
  width: int = 128
  depth: int = 3
  num_bins: int = models.DEFAULT_NUM_Z_BINS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = nn.gelu(nn.Dense(self.width, name=f"dense_{i}")(x), approximate=False)
    return models.RedshiftHead(num_bins=self.num_bins, name="redshift_head")(x)


def pdf_median(pdf: np.ndarray, edges: np.ndarray) -> np.ndarray:
  """Median (N,) of histogram PDFs (N, B) on bin `edges` (B+1,), linear within a bin."""
  cdf = np.concatenate([np.zeros((len(pdf), 1)), np.cumsum(pdf, axis=1)], axis=1)
  cdf /= cdf[:, -1:]
  # The first edge where the CDF reaches 1/2, and linear interpolation from the edge before.
  j = np.clip(np.argmax(cdf >= 0.5, axis=1), 1, len(edges) - 1)
  lo = np.take_along_axis(cdf, j[:, None] - 1, axis=1)[:, 0]
  hi = np.take_along_axis(cdf, j[:, None], axis=1)[:, 0]
  t = np.where(hi > lo, (0.5 - lo) / np.where(hi > lo, hi - lo, 1.0), 0.5)
  return (edges[j - 1] + t * (edges[j] - edges[j - 1])).astype(np.float32)


class PhotoMLP:
  """Baseline (d): an MLP on the multi-aperture features, with ASTRA's redshift head and loss.

  `PhotoNet` trained by AdamW (cosine-decayed learning rate) on minibatches for `epochs` epochs,
  minimising ASTRA's redshift cross-entropy (`losses.redshift_loss`) with Gaussian label
  smoothing of `z_sigma` in z. Features are standardised with the training split's statistics.
  Deterministic given `seed` (initialisation and the order of minibatches).

  Prediction: `z_median` is the PDF median, the point estimate; `z_mean` the PDF mean and
  `z_mode` the centre of its most probable bin (as for ASTRA); `z_pdf` (N, num_bins) the PDF
  on `z_edges`. Spectra as in `PhotoTrees`.
  """

  def __init__(self, k: int = 10, width: int = 128, depth: int = 3, epochs: int = 50,
               batch_size: int = 64, learning_rate: float = 2e-3, weight_decay: float = 1e-4,
               z_sigma: float = 0.01, num_bins: int = models.DEFAULT_NUM_Z_BINS,
               z_max: float = models.DEFAULT_Z_MAX, seed: int = 0):
    self.k, self.epochs, self.batch_size, self.seed = k, epochs, batch_size, seed
    self.learning_rate, self.weight_decay, self.z_sigma = learning_rate, weight_decay, z_sigma
    self.net = PhotoNet(width=width, depth=depth, num_bins=num_bins)
    self.centers = models.z_bin_centers(num_bins, z_max)
    self.z_edges = np.linspace(0.0, z_max, num_bins + 1)

  def fit(self, train: dict[str, np.ndarray]) -> "PhotoMLP":
    features = photometric_features(train)
    self.standardise = _Standardiser(features)
    features = self.standardise(features)
    self.spectra = NeighbourSpectra(features, train, self.k)
    z, has_z = _redshift_labels(train)
    x, z = features[has_z], z[has_z]
    batch = min(self.batch_size, len(x))
    steps = len(x) // batch
    tx = optax.adamw(optax.cosine_decay_schedule(self.learning_rate, self.epochs * steps),
                     weight_decay=self.weight_decay)
    params = self.net.init(jax.random.PRNGKey(self.seed), x[:1])
    # Each epoch a fresh permutation, cut into `steps` minibatches (the remainder sits out).
    rng = np.random.default_rng(self.seed)
    order = np.stack([rng.permutation(len(x))[:steps * batch].reshape(steps, batch)
                      for _ in range(self.epochs)]).reshape(-1, batch)
    run = jax.jit(functools.partial(_train, self.net, tx, self.z_sigma))
    params, loss = run(params, jnp.asarray(x), jnp.asarray(z), jnp.asarray(self.centers),
                       jnp.asarray(order, jnp.int32))
    self.params, self.final_loss = params, float(loss)
    return self

  def z_pdf(self, x: np.ndarray) -> np.ndarray:
    """(N, num_bins) redshift PDFs of standardised features (N, F)."""
    logits = jax.jit(self.net.apply)(self.params, x)
    return np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)

  def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = self.standardise(photometric_features(data))
    pdf = self.z_pdf(x)
    spectrum, log_norm = self.spectra.predict(x, data)
    out = _prediction(data, spectrum, log_norm, pdf_median(pdf, self.z_edges))
    out.update(z_pdf=pdf, z_mean=(pdf @ self.centers).astype(np.float32),
               z_mode=self.centers[np.argmax(pdf, axis=1)])
    return out


def _train(net, tx, z_sigma, params, x, z, centers, order):
  """Every step of a fit in one scan: features x (N, F), z (N,), minibatch indices order
  (steps, B) -> (params, loss of the last minibatch)."""

  def loss_fn(params, idx):
    logits = net.apply(params, x[idx])
    return jnp.mean(losses.redshift_loss(logits, z[idx], jnp.ones(idx.shape, bool), centers,
                                         sigma=z_sigma))

  def step(carry, idx):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, idx)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), loss = jax.lax.scan(step, (params, tx.init(params)), order)
  return params, loss[-1]
