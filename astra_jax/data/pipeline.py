"""tf.data input pipeline over the prepared `astropixel` shards; numpy batches out.

Training stream. Every host builds the same global record stream: epochs concatenated forever,
epoch `e` shuffling the shard files with a stateless seed from (seed, e) and then the records with
a buffer seeded by (seed, e). Global step `k` is the stream's records `[k*B, (k+1)*B)` (B = global
batch); host `h` keeps rows `[h*b, (h+1)*b)` of each such batch (b = B / process count), filtered
while still serialised bytes. So the global batch at every step is a pure function of the seed,
whatever the number of hosts. To resume at step k the pipeline starts directly at epoch
`k*B // n` (n records in the split) and skips the first `k*B % n` records of that epoch as
serialised bytes: earlier epochs are never read and nothing is decoded twice.

Each host batch is parsed at once (`batch_parser`: one `tf.io.parse_example` and one
`tf.io.decode_raw` per feature for the whole batch) rather than example by example, and nothing
else touches the images on the host: the random flips and rotations of training are drawn on the
devices, inside the train step (`astra_jax.augment`), where they cost nothing next to the model.

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


def batch_parser(builder, keys):
  """A function: serialised examples (B,) string -> {key: (B, *shape)} in the features' dtypes.

  One `tf.io.parse_example` for the whole batch, then one `tf.io.decode_raw` per raw-bytes feature
  (image, flux, weight, ra, dec): a per-example parse costs several times as much CPU per image.
  Booleans (stored as int64 in a tf.train.Example) come out as bool.
  """
  features = builder.info.features
  spec, decode = {}, {}
  for key in keys:
    feature = features[key]
    stored = feature.get_serialized_info()
    dtype = tf.as_dtype(stored.dtype)
    spec[key] = tf.io.FixedLenFeature(stored.shape, tf.int64 if dtype == tf.bool else dtype)
    if dtype == tf.string and feature.tf_dtype != tf.string:  # A tensor stored as raw bytes.
      decode[key] = (lambda v, f=feature: tf.reshape(tf.io.decode_raw(v, f.tf_dtype),
                                                      (-1, *f.shape)))
    elif dtype == tf.bool:
      decode[key] = lambda v: tf.cast(v, tf.bool)

  def parse(records):
    parsed = tf.io.parse_example(records, spec)
    return {k: decode[k](v) if k in decode else v for k, v in parsed.items()}
  return parse


def per_host_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} must be a multiple of the process count "
                     f"{process_count}")
  return global_batch // process_count


def train_dataset(dataset_dir: str, *, global_batch: int, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 1024, split: str = "train",
                  process_index: int | None = None, process_count: int | None = None
                  ) -> tf.data.Dataset:
  """Infinite per-host batches of MODEL_KEYS from step `start_step` on (see module docstring)."""
  builder = load_builder(dataset_dir)
  index, count = _host(process_index, process_count)
  batch = per_host_batch(global_batch, count)
  files = tf.constant(_files(builder, split))
  total = builder.info.splits[split].num_examples

  def epoch(e, skip=0):
    """Epoch e of the global record stream, from its record `skip` on: this host's records."""
    file_seed = tf.stack([tf.cast(seed, tf.int64), e])
    records = tf.data.TFRecordDataset(tf.random.experimental.stateless_shuffle(files, file_seed))
    records = records.shuffle(shuffle_buffer, seed=seed * _EPOCH_SEED_STRIDE + e,
                              reshuffle_each_iteration=False)
    if count == 1:  # Every row is this host's: no per-record bookkeeping.
      return records.skip(skip)
    # This host's rows of every global batch, chosen before decoding, by global position.
    mine = lambda i, _: ((e * total + i) % global_batch) // batch == index
    return records.enumerate().skip(skip).filter(mine).map(lambda _, record: record)

  first_epoch, offset = divmod(start_step * global_batch, total)
  stream = epoch(tf.constant(first_epoch, tf.int64), offset).concatenate(
      tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(epoch))
  # Reading and shuffling run ahead of batching and parsing, across epoch boundaries too.
  ds = stream.prefetch(2 * batch).batch(batch, drop_remainder=True)
  ds = ds.map(batch_parser(builder, MODEL_KEYS), num_parallel_calls=tf.data.AUTOTUNE,
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
  steps = num_eval_batches(builder.info.splits[split].num_examples, global_batch)
  parse = batch_parser(builder, MODEL_KEYS + tuple(extra_keys))

  def padded(records):
    """The parsed batch, padded to `batch` rows with examples that count nowhere."""
    out = {k: _pad_rows(v, batch) for k, v in parse(records).items()}
    out["mask"] = tf.range(batch) < tf.shape(records)[0]
    return out

  records = tf.data.TFRecordDataset(_files(builder, split)).shard(count, index)
  ds = records.batch(batch).map(padded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
      padded(tf.zeros((0,), tf.string))).repeat()  # Hosts whose shard ran out keep stepping.
  return ds.concatenate(padding).take(steps).prefetch(2)


def _pad_rows(value: tf.Tensor, rows: int) -> tf.Tensor:
  """`value` (n <= rows, ...) completed to `rows` rows with zeros / False / b"" (so weight 0 and
  has_z False: padding counts nowhere)."""
  shape = tf.shape(value)
  padding = tf.zeros(tf.concat([[rows - shape[0]], shape[1:]], 0), value.dtype)
  out = tf.concat([value, padding], 0)
  out.set_shape([rows, *value.shape[1:]])
  return out


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
