"""One raw galaxy -> the feature dict of an `astropixel` example, or a rejection; no TensorFlow.

Preparation's reader processes import only this module (numpy, astropy), not tensorflow_datasets:
they receive an `ExampleConfig`, a plain dataclass, rather than the tfds builder config.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import multiprocessing.pool
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import numpy as np

from astra_jax import grid
from astra_jax import hugepages
from astra_jax.data import fits_io
from astra_jax.data import preprocess

RAW_IMAGE_SIZE = 288


@dataclasses.dataclass
class ExampleConfig:
  """The parameters of `galaxy_example`; `astropixel.AstropixelConfig` extends it.

  Attributes:
    bands: band letters in the fixed order of the `image` axis 0.
    image_size: stored image size in pixels; the 288x288 cutouts are mean-binned to it.
    stretch_beta: asinh softening in units of each band's sky sigma.
    min_valid_pixels: galaxies with fewer grid pixels of weight > 0 are rejected.
    max_nonfinite_fraction: images with a larger non-finite fraction are rejected.
  """
  bands: tuple[str, ...] = grid.PS1_BANDS
  image_size: int = RAW_IMAGE_SIZE
  stretch_beta: float = 2.5
  min_valid_pixels: int = 500
  max_nonfinite_fraction: float = 0.5

  @classmethod
  def of(cls, config) -> ExampleConfig:
    """The `ExampleConfig` of any object with these attributes (e.g. an `AstropixelConfig`)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def image_example(images: np.ndarray, config, path: str) -> np.ndarray:
  """Linear-flux cutouts (bands, 288, 288) -> stretched, binned float16 (bands, S, S).

  The one image path shared by preparation and prediction; `config` an `ExampleConfig` or an
  `AstropixelConfig`. Raises `fits_io.InputError`.

  float16 halves what training reads per example. Its rounding (relative 2^-11; absolute
  <= 2^-12 below 1, where the sky is) is far below the pixel noise, which asinh(x / (beta sigma))
  maps to ~1 / beta = 0.4 near the sky: it adds < 1e-5 of the noise variance. Stretched values
  stay below ~25 (asinh of 1e10), far from float16's 65504.
  """
  try:
    stretched, _ = preprocess.stretch(images, config.stretch_beta,
                                      max_bad_fraction=config.max_nonfinite_fraction)
  except preprocess.PreprocessError as e:
    raise fits_io.InputError(path, e.reason) from None
  factor = images.shape[-1] // config.image_size
  if factor > 1:
    stretched = preprocess.bin_image(stretched, factor)
  return stretched.astype(np.float16)


def galaxy_example(galaxy_dir: str, row: fits_io.CatalogRow, config) -> dict:
  """One raw galaxy folder -> the feature dict. Raises `fits_io.InputError` with the reason."""
  galaxy = fits_io.read_galaxy(galaxy_dir, bands=config.bands, row=row,
                               image_shape=(RAW_IMAGE_SIZE, RAW_IMAGE_SIZE))
  spectrum = galaxy.spectrum
  if spectrum is None:
    raise fits_io.InputError(galaxy_dir, "missing spectrum")
  flux, weight = preprocess.resample_to_grid(spectrum.wavelength, spectrum.flux,
                                             ivar=spectrum.ivar, and_mask=spectrum.and_mask)
  valid = preprocess.count_valid(weight)
  if valid < config.min_valid_pixels:
    raise fits_io.InputError(spectrum.path,
                             f"fewer than {config.min_valid_pixels} valid pixels on the grid",
                             detail=f"{valid} valid")
  z = row.z if row.has_z else spectrum.z
  has_z = bool(np.isfinite(z))
  return {
      "image": image_example(galaxy.images, config, galaxy_dir),
      "aperture_flux": preprocess.aperture_flux(galaxy.images, galaxy.headers),
      "flux": flux.astype(np.float32),
      "weight": weight.astype(np.float32),
      "z": np.float32(z if has_z else 0.0),
      "has_z": has_z,
      "specobj_id": row.specobj_id,
      "ra": np.float64(row.ra),
      "dec": np.float64(row.dec),
  }


def keep_freed_memory():
  """Reader-process initializer: glibc keeps the memory a galaxy frees for the next one.

  Each galaxy allocates the same few MB at once (a (5, 288, 288) float32 image is 1.7 MB): more
  than glibc's default trim threshold, so its pages go back to the kernel after every galaxy and
  are faulted in and zeroed again for the next. A reader process only ever holds one galaxy, so
  keeping them costs no memory worth counting (RSS ~80 MB either way). Measured with two readers
  on a 2-core AMD EPYC (three alternating runs of 384 galaxies): 15.4-17.2 -> 11.9-13.4 CPU-ms
  per galaxy, 860 -> 19 page faults; under glibc.malloc.hugetlb=1 (which readers no longer
  start with, see `astra_jax.hugepages`) 14.1-16.7 -> 14.7-15.1 ms, within noise, as huge pages
  already leave 19 faults. A no-op without glibc.
  """
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return
  m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
  mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value.
  mallopt(m_trim_threshold, 256 << 20)


def reader_pool(num_workers: int) -> multiprocessing.pool.Pool:
  """`num_workers` spawned reader processes for `try_example` (they import only this module's
  dependencies, not the parent's TensorFlow), each with `keep_freed_memory` and without glibc's
  huge-page tunable, even where this process has it (see `astra_jax.hugepages`)."""
  return hugepages.spawn_context().Pool(num_workers, initializer=keep_freed_memory)


@dataclasses.dataclass(frozen=True)
class HandedOver:
  """An example's image left by a reader process as a .npy file, for `take_image`."""
  path: str


HANDOFF_PREFIX = "astra-prepare-"
# A folder whose process is gone is removed once nothing has been written into it for this long:
# a running preparation adds files every few milliseconds, and where /dev/shm is shared between
# pid namespaces (containers started with --ipc=host) a live process elsewhere can look dead here.
STALE_HANDOFF_S = 600.0


@contextlib.contextmanager
def handoff_folder(root: str = "/dev/shm") -> Iterator[str | None]:
  """A fresh folder in RAM (`root`, /dev/shm) for reader processes' images, removed on exit with
  whatever is left in it; None where there is no such folder (the images then go through the
  pool's pipe).

  The folder is named after this process (astra-prepare-<pid>-<random>). A preparation that was
  killed (SIGKILL, out of memory) leaves its folder behind, and /dev/shm is memory: the next
  preparation removes such folders (`remove_stale_handoff_folders`) and logs what it freed.
  """
  if not (os.path.isdir(root) and os.access(root, os.W_OK | os.X_OK)):
    yield None
    return
  remove_stale_handoff_folders(root)
  with tempfile.TemporaryDirectory(prefix=f"{HANDOFF_PREFIX}{os.getpid()}-", dir=root) as folder:
    yield folder


def remove_stale_handoff_folders(root: str = "/dev/shm",
                                 min_age_s: float = STALE_HANDOFF_S) -> list[str]:
  """Removes the handoff folders in `root` whose process no longer runs and which nothing has
  changed for `min_age_s` seconds; returns their paths. Folders of other users, of live
  processes, or without a pid in their name (left by versions before it was added) stay."""
  removed = []
  now = time.time()
  for entry in os.scandir(root):
    pid = entry.name[len(HANDOFF_PREFIX):].split("-")[0]
    if not (entry.name.startswith(HANDOFF_PREFIX) and pid.isdigit()):
      continue
    try:
      stat = entry.stat(follow_symlinks=False)
      if (not entry.is_dir(follow_symlinks=False) or stat.st_uid != os.getuid()
          or now - stat.st_mtime < min_age_s or _alive(int(pid))):
        continue
      size = sum(f.stat().st_size for f in os.scandir(entry.path) if f.is_file())
      shutil.rmtree(entry.path)
    except OSError as e:  # Removed meanwhile, or not ours to remove: leave it.
      logging.warning("Could not remove the stale handoff folder %s: %s", entry.path, e)
      continue
    logging.warning("Removed %s, left by a stopped preparation (pid %s): %.1f MB freed",
                    entry.path, pid, size / 1e6)
    removed.append(entry.path)
  return removed


def _alive(pid: int) -> bool:
  """Whether a process `pid` exists (in this pid namespace)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's.
    return True
  return True


def try_example_handed_over(args, folder: str) -> tuple[str, dict | None, dict | None]:
  """(galaxy_dir, row, config) -> `try_example`'s result, the image as a `HandedOver` file in
  `folder` (from `handoff_folder`).

  Through a file in RAM, the main process reads a 288-px image (0.83 MB) with one copy; through
  the pool's pipe it cost it ~3 ms of CPU per galaxy (64 KB reads, a buffer, unpickling), as
  much as encoding, serialising and writing the example. Where the folder is full (a
  container's /dev/shm can be 64 MB), that image takes the pipe after all.
  """
  key, example, rejected = try_example(args)
  if example is not None:
    path = None
    try:
      fd, path = tempfile.mkstemp(suffix=".npy", dir=folder)
      with os.fdopen(fd, "wb") as f:
        np.save(f, example["image"])
    except OSError:
      if path is not None:
        os.unlink(path)
    else:
      example["image"] = HandedOver(path)
  return key, example, rejected


def take_image(example: dict) -> dict:
  """`example` with a `HandedOver` image read back and its file removed (in place)."""
  image = example["image"]
  if isinstance(image, HandedOver):
    example["image"] = np.load(image.path, allow_pickle=False)
    os.unlink(image.path)
  return example


def shared_results(pool: multiprocessing.pool.Pool, fn: Callable, jobs: Iterable, ahead: int,
                   chunksize: int = 1, local_fn: Callable | None = None) -> Iterator[Any]:
  """The results of `fn` over `jobs`, computed by `pool`'s workers and by this thread alike, in
  the order they are ready (not the jobs' order).

  Whenever no worker's result is waiting, this thread runs the next job itself (`local_fn`,
  default `fn`) instead of waiting. prepare's main process serialises and writes every example;
  with a reader process fewer, it reads galaxies in the time it would otherwise wait, with no
  pipe or process switch for those.

  Workers take `chunksize` jobs at a time, and at most `ahead` jobs (>= `chunksize`) are handed
  to the pool and their results not yet yielded: plain `imap` has no such bound, and results
  that a slower consumer has not taken yet (~0.9 MB per 288-px galaxy) pile up in memory.
  """
  if ahead < chunksize:
    raise ValueError(f"ahead ({ahead}) must be at least chunksize ({chunksize})")
  local_fn = local_fn or fn
  jobs = iter(jobs)
  lock = threading.Lock()  # This thread and the pool's task handler both take jobs.
  slots = threading.Semaphore(ahead)
  closed = False

  def take():
    with lock:
      return next(jobs, _NO_JOB)

  def chunks():  # Runs in the pool's task-handler thread, which it holds back.
    while True:
      chunk = []
      while len(chunk) < chunksize:
        slots.acquire()
        job = _NO_JOB if closed else take()
        if job is _NO_JOB:
          slots.release()
          break
        chunk.append(job)
      if chunk:
        yield fn, chunk
      if len(chunk) < chunksize:
        return

  # chunksize 1 for the pool itself: its own chunking returns a generator, with no timeout.
  results = pool.imap_unordered(_apply_to_each, chunks(), 1)
  try:
    while True:
      try:
        done = results.next(timeout=0)
      except multiprocessing.TimeoutError:
        job = take()
        if job is not _NO_JOB:
          yield local_fn(job)
          continue
        try:
          done = results.next()
        except StopIteration:
          return
      except StopIteration:
        return
      for result in done:
        slots.release()
        yield result
  finally:
    closed = True  # An abandoned stream must not leave the task handler waiting (pool.close hangs).
    slots.release()


_NO_JOB = object()


def _apply_to_each(fn_and_jobs: tuple[Callable, list]) -> list:
  """(fn, jobs) -> [fn(job) for each job]: one pool task of `shared_results`."""
  fn, jobs = fn_and_jobs
  return [fn(job) for job in jobs]


def rejection(specobj_id: str | None, path: str, reason: str, detail: str | None = None) -> dict:
  """One line of rejected.jsonl: a stable `reason`, and the particulars in `detail`."""
  out = {"specobj_id": specobj_id, "path": path, "reason": reason}
  if detail:
    out["detail"] = detail
  return out


def try_example(args) -> tuple[str, dict | None, dict | None]:
  """(galaxy_dir, row, config) -> (key, example, None) or (key, None, rejection); never raises."""
  galaxy_dir, row, config = args
  try:
    return row.specobj_id, galaxy_example(galaxy_dir, row, config), None
  except fits_io.InputError as e:
    return row.specobj_id, None, rejection(row.specobj_id, e.path, e.reason, e.detail)
  except Exception as e:  # pylint: disable=broad-except
    # One unexpected failure must not kill a run over thousands of galaxies; it is still reported.
    return row.specobj_id, None, rejection(row.specobj_id, galaxy_dir, "unexpected error", repr(e))
