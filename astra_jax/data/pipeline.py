"""tf.data input pipeline over the prepared `astropixel` shards; numpy batches out.

Training stream. Every host builds the same global record stream: epochs concatenated forever,
epoch `e` shuffling the shard files with a stateless seed from (seed, e) and then the records with
a buffer seeded by (seed, e). Global step `k` is the stream's records `[k*B, (k+1)*B)` (B = global
batch); host `h` keeps rows `[h*b, (h+1)*b)` of each such batch (b = B / process count), filtered
while still serialised bytes, and the record at global position g is augmented with a stateless
seed from (seed, g). So the global batch at every step, augmentation included, is a pure function
of the seed, whatever the number of hosts. To resume at step k the pipeline starts directly at
epoch `k*B // n` (n records in the split) and skips the first `k*B % n` records of that epoch as
serialised bytes: earlier epochs are never read and nothing is decoded or augmented twice.

Evaluation batches read a split once in file order, padded to a whole number of global batches
with examples of weight 0 and `mask` False, so every host runs the same number of steps.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

try:  # TensorFlow only reads data here; GPUs and TPUs belong to JAX.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # Already initialised elsewhere in this process.
  pass

from astra_jax.data import MODEL_KEYS
_EPOCH_SEED_STRIDE = 1_000_003


def load_builder(dataset_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared dataset in `dataset_dir` (what prepare printed), read-only."""
  if not os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
    raise FileNotFoundError(f"{dataset_dir}: no prepared astropixel dataset (dataset_info.json "
                            "missing); run python -m astra_jax.data.prepare first")
  return tfds.builder_from_directory(dataset_dir)


def _files(builder, split: str) -> list[str]:
  files = sorted(os.fspath(p) for p in builder.info.splits[split].filepaths)
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: shard of split {split!r} is missing")
  return files


def _host(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def _decoder(builder, keys):
  features = builder.info.features
  def decode(record):
    example = features.deserialize_example(record)
    return {k: example[k] for k in keys}
  return decode


# Dihedral element k = rot90^(k % 4), then a left-right flip if k >= 4; on a (bands, H, W) image
# that is a transpose of H and W for odd k, then reversals of (H, W) as below: at most two copies
# of the image instead of the four of transpose + rot90 + flip + transpose.
_DIHEDRAL_REVERSE = tf.constant([[False, False], [True, False], [True, True], [False, True],
                                 [False, True], [True, True], [True, False], [False, False]])


def dihedral(image: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
  """One of the 8 flips/90-degree rotations (k in 0..7) of a square (bands, H, W) image:
  `np.rot90(image, k % 4, axes=(1, 2))`, then reversed along W if k >= 4."""
  image = tf.cond(k % 2 == 1, lambda: tf.transpose(image, (0, 2, 1)), lambda: image)
  return tf.reverse(image, tf.boolean_mask(tf.constant([1, 2]), _DIHEDRAL_REVERSE[k]))


def per_host_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} must be a multiple of the process count "
                     f"{process_count}")
  return global_batch // process_count


def train_dataset(dataset_dir: str, *, global_batch: int, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 1024, augment: bool = True, split: str = "train",
                  process_index: int | None = None, process_count: int | None = None
                  ) -> tf.data.Dataset:
  """Infinite per-host batches of MODEL_KEYS from step `start_step` on (see module docstring)."""
  builder = load_builder(dataset_dir)
  index, count = _host(process_index, process_count)
  batch = per_host_batch(global_batch, count)
  files = tf.constant(_files(builder, split))
  total = builder.info.splits[split].num_examples
  decode = _decoder(builder, MODEL_KEYS)

  def epoch(e):
    """Epoch e of the global record stream, as (global position, serialised record)."""
    file_seed = tf.stack([tf.cast(seed, tf.int64), e])
    records = tf.data.TFRecordDataset(tf.random.experimental.stateless_shuffle(files, file_seed))
    records = records.shuffle(shuffle_buffer, seed=seed * _EPOCH_SEED_STRIDE + e,
                              reshuffle_each_iteration=False)
    return records.enumerate().map(lambda i, r: (e * total + i, r))

  first_epoch, offset = divmod(start_step * global_batch, total)
  stream = epoch(tf.constant(first_epoch, tf.int64)).skip(offset).concatenate(
      tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(epoch))
  # This host's rows of every global batch, chosen before decoding.
  stream = stream.filter(lambda g, _: (g % global_batch) // batch == index)

  def prepare(g, record):
    example = decode(record)
    example["has_z"] = tf.cast(example["has_z"], tf.bool)
    if augment:
      aug_seed = tf.stack([tf.cast(seed, tf.int64), g])
      k = tf.random.stateless_uniform((), aug_seed, maxval=8, dtype=tf.int32)
      example["image"] = dihedral(example["image"], k)
    return example

  ds = stream.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(os.cpu_count() or 1, 2)
  return ds.with_options(options).prefetch(2)


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  return -(-num_examples // global_batch)


def eval_dataset(dataset_dir: str, split: str, *, global_batch: int,
                 process_index: int | None = None, process_count: int | None = None,
                 extra_keys=("specobj_id",)) -> tf.data.Dataset:
  """One pass over `split` in per-host batches with a boolean `mask` (False on padding)."""
  builder = load_builder(dataset_dir)
  index, count = _host(process_index, process_count)
  batch = per_host_batch(global_batch, count)
  keys = MODEL_KEYS + tuple(extra_keys)
  decode = _decoder(builder, keys)
  steps = num_eval_batches(builder.info.splits[split].num_examples, global_batch)

  def real(record):
    example = decode(record)
    example["has_z"] = tf.cast(example["has_z"], tf.bool)
    example["mask"] = tf.constant(True)
    return example

  records = tf.data.TFRecordDataset(_files(builder, split)).shard(count, index)
  ds = records.map(real, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(_padding_example(ds.element_spec)).repeat()
  ds = ds.concatenate(padding).take(steps * batch).batch(batch)
  return ds.prefetch(2)


def _padding_example(spec) -> dict:
  """An example that counts nowhere: zeros, weight 0, has_z False, mask False."""
  return {k: tf.zeros(s.shape, s.dtype) if s.dtype != tf.string else tf.constant(b"")
          for k, s in spec.items()}


class CorruptShardError(RuntimeError):
  """A shard of a prepared dataset cannot be read; the message names the file."""


def check_shards(dataset_dir: str, split: str) -> list[tuple[str, str]]:
  """(path, problem) of every shard of `split` that is unreadable or holds the wrong record count.

  Reads every record's bytes (CRC-checked by TensorFlow), so it costs one pass over the split.
  """
  builder = load_builder(dataset_dir)
  info = builder.info.splits[split]
  problems = []
  for path, expected in zip(sorted(os.fspath(p) for p in info.filepaths), info.shard_lengths):
    try:
      count = int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
    except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as e:
      problems.append((path, f"unreadable shard ({e.message.splitlines()[0]})"))
      continue
    if count != expected:
      problems.append((path, f"{count} records where dataset_info.json says {expected}"))
  return problems


def as_numpy(ds: tf.data.Dataset, dataset_dir: str | None = None, split: str | None = None
             ) -> Iterator[dict[str, np.ndarray]]:
  """Numpy dicts out of a tf.data pipeline; a read error is re-raised naming the bad shard."""
  iterator = ds.as_numpy_iterator()
  while True:
    try:
      yield next(iterator)
    except StopIteration:
      return
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
      if dataset_dir is None or split is None:
        raise
      problems = check_shards(dataset_dir, split) or [(dataset_dir, "unreadable record")]
      raise CorruptShardError("; ".join(f"{path}: {why}" for path, why in problems) +
                              f" (while reading split {split!r}: {e.message.splitlines()[0]})"
                              ) from None
