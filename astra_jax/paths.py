"""Paths of a run: local folders or URLs (gs://bucket/...), all through `etils.epath`.

epath opens gs:// (and s3://, az://) through TensorFlow's gfile when TensorFlow is installed,
as it is here, so every path of a run (data_dir, raw_dir, workdir, predict's input and output)
can be a bucket wherever the library that finally reads it can too (see README, "Multi-host").
"""

from __future__ import annotations

import concurrent.futures
import io
import os

from etils import epath

#: Threads asking a bucket the kind of a folder's entries (`entries`): requests wait on the
#: network, not the CPU.
_LISTING_THREADS = 32


def is_url(path) -> bool:
  """True for "scheme://..." (gs://, s3://, ram://), False for a local path."""
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """A local path made absolute; a URL as it is."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(path, *parts) -> str:
  """`path / parts` as a string, for a local path or a URL alike."""
  return os.fspath(epath.Path(path).joinpath(*parts)) if is_url(path) else os.path.join(
      path, *parts)


def exists(path) -> bool:
  """Whether `path` exists: `os.path.exists` locally, epath for a URL."""
  return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def is_dir(path) -> bool:
  """Whether `path` is a folder: `os.path.isdir` locally, epath for a URL."""
  return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def is_file(path) -> bool:
  """Whether `path` is a file: `os.path.isfile` locally, epath for a URL."""
  return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def open_text(path, encoding: str = "utf-8-sig"):
  """A text file opened for reading (a leading BOM dropped by default). A URL is read whole in
  one request and decoded as it is read, as a local file is. Raises FileNotFoundError."""
  if is_url(path):
    return io.TextIOWrapper(io.BytesIO(epath.Path(path).read_bytes()), encoding=encoding)
  return open(path, encoding=encoding)


def entries(folder) -> list[tuple[str, bool]]:
  """(name, is a folder) of each entry of `folder`, in listing order.

  Locally one `os.scandir` (the kind comes with the listing); for a URL one listing, then the
  kind of each entry asked in parallel threads: a bucket answers each in its own request, and a
  survey has thousands of galaxy folders.
  """
  if not is_url(folder):
    with os.scandir(folder) as listing:
      return [(entry.name, entry.is_dir()) for entry in listing]
  children = list(epath.Path(folder).iterdir())
  with concurrent.futures.ThreadPoolExecutor(_LISTING_THREADS) as pool:
    kinds = list(pool.map(lambda child: child.is_dir(), children))
  # `.name`: gfile lists a bucket's folders as "name/"; the Path drops the slash.
  return [(child.name, kind) for child, kind in zip(children, kinds)]
