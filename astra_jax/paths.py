"""Paths of a run: local folders or URLs (gs://bucket/...), all through `etils.epath`.

epath opens gs:// (and s3://, az://) through TensorFlow's gfile when TensorFlow is installed,
as it is here, so every path of a run (data_dir, raw_dir, workdir, predict's input and output)
can be a bucket wherever the library that finally reads it can too (see README, "Multi-host").
"""

from __future__ import annotations

import os

from etils import epath


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
