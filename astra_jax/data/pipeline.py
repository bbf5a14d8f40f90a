"""tf.data input pipeline over the prepared `astropixel` shards; numpy batches out.

Each process reads only its own share of a split: `tfds.even_splits(split, n=process_count)`
cuts the split into `process_count` contiguous record ranges whose sizes differ by at most one,
and the range of process `h` comes as tfds file instructions (shard file, first record, count).
Records outside it are never read: a range or block that starts inside a shard seeks to its
first record (`_records`: an unbuffered `TFRecordDataset.skip` reads only record headers).

Training stream of one process. Its range is cut into blocks of `shuffle_buffer` consecutive
records. Epoch `e` reads the blocks in an order drawn statelessly from (seed, process, e) and
each block in a permutation drawn from (seed, process, e, block): the order of the examples is a
pure function of the seed and the position, so the stream resumes exactly. Host step `k` is this
process's records `[k*b, (k+1)*b)` of the stream (b = global batch / process count); the global
batch at step `k` is every process's rows at that step, in process order. To resume at step k
the stream starts at epoch `k*b // n` (n records in this process's range), skips the whole
blocks before `k*b % n` without opening them, and reads at most one block it does not use.
The batches therefore depend on the number of processes (each shuffles within its own range),
not on the number of devices.

Each host batch is parsed at once (`batch_parser`: one `tf.io.parse_example` and one
`tf.io.decode_raw` per feature for the whole batch) rather than example by example, and nothing
else touches the images on the host: the random flips and rotations of training are drawn on the
devices, inside the train step (`astra_jax.augment`), where they cost nothing next to the model.

Evaluation batches read this process's range once in file order, padded with examples of
weight 0 and `mask` False to the number of batches of the largest range, so every process runs
the same number of steps.
"""

from __future__ import annotations

import os
from typing import Iterator

from etils import epath
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
  """The prepared dataset in `dataset_dir` (what prepare printed; a local path or a URL such as
  gs://bucket/...), read-only."""
  if not epath.Path(dataset_dir, "dataset_info.json").exists():
    raise FileNotFoundError(f"{dataset_dir}: no prepared astropixel dataset (dataset_info.json "
                            "missing); run python -m astra_jax.data.prepare first")
  return tfds.builder_from_directory(dataset_dir)


def _files(builder, split: str) -> list[str]:
  files = sorted(os.fspath(p) for p in builder.info.splits[split].filepaths)
  for path in files:
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"{path}: shard of split {split!r} is missing")
  return files


def _host(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def host_instructions(builder, split: str, process_index: int, process_count: int
                      ) -> list[tuple[str, int, int]]:
  """(shard path, first record, number of records) of process `process_index`'s share of
  `split`: `tfds.even_splits`' contiguous range, sizes differing by at most one."""
  _files(builder, split)  # Every shard is there, or an error naming the missing one.
  share = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  return [(os.fspath(fi.filename), int(fi.skip), int(fi.take))
          for fi in builder.info.splits[share].file_instructions if fi.take > 0]


def host_sizes(builder, split: str, process_count: int) -> list[int]:
  """The number of records of every process's share of `split` (`host_instructions`)."""
  return [builder.info.splits[share].num_examples
          for share in tfds.even_splits(split, n=process_count, drop_remainder=False)]


def _read(instructions) -> tf.data.Dataset:
  """The serialised records of (path, first record, count) instructions, in their order."""
  paths, skips, takes = zip(*instructions)
  return tf.data.Dataset.from_tensor_slices(
      (list(paths), np.array(skips, np.int64), np.array(takes, np.int64))).flat_map(
          lambda path, skip, take: _records(path, skip, take))


def _records(path, skip, take) -> tf.data.Dataset:
  """Records `[skip, skip + take)` of one shard. Unbuffered (`buffer_size=0`), so that the skip
  seeks past each record instead of reading it: measured on a 795-record shard of 96 px
  galaxies, skipping 700 records and taking 50 read 67.6 MB with TensorFlow's default buffer,
  6.2 MB (the 50 records) without."""
  return tf.data.TFRecordDataset(path, buffer_size=0).skip(skip).take(take)


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
  """Rows of the global batch that each process feeds."""
  if global_batch < process_count or global_batch % process_count:
    raise ValueError(f"batch_size={global_batch} must be a multiple of the process count "
                     f"{process_count} (every process feeds the same number of rows, at least 1)")
  return global_batch // process_count


def train_records(dataset_dir: str, *, seed: int, start_record: int = 0,
                  shuffle_buffer: int = 1024, split: str = "train",
                  process_index: int | None = None, process_count: int | None = None
                  ) -> tf.data.Dataset:
  """This process's infinite stream of serialised records from its record `start_record` on
  (epochs concatenated; see the module docstring)."""
  builder = load_builder(dataset_dir)
  index, count = _host(process_index, process_count)
  blocks = []  # (path, first record, count) of at most shuffle_buffer records.
  for path, skip, take in host_instructions(builder, split, index, count):
    blocks += [(path, skip + i, min(shuffle_buffer, take - i))
               for i in range(0, take, shuffle_buffer)]
  total = sum(take for _, _, take in blocks)
  if not total:
    raise ValueError(f"{dataset_dir}: split {split!r} has {builder.info.splits[split].num_examples}"
                     f" examples, none for process {index} of {count}")
  paths = tf.constant([b[0] for b in blocks])
  skips = tf.constant([b[1] for b in blocks], tf.int64)
  takes = tf.constant([b[2] for b in blocks], tf.int64)
  stream_seed = tf.constant(seed * _EPOCH_SEED_STRIDE + index, tf.int64)

  def read_block(e, block):
    """Block `block` of epoch `e`, its records in a permutation of their own."""
    records = _records(paths[block], skips[block], takes[block])
    def permute(batch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(tf.shape(batch)[0]), tf.stack([stream_seed, e * len(blocks) + block]))
      return tf.gather(batch, order)
    return records.batch(shuffle_buffer).map(permute).unbatch()

  def epoch(e, skip=0):
    """Epoch e of this process's stream, from its record `skip` on."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(blocks), dtype=tf.int64), tf.stack([stream_seed, -1 - e]))
    ends = tf.cumsum(tf.gather(takes, order))
    first = tf.reduce_sum(tf.cast(ends <= skip, tf.int64))   # Whole blocks before `skip`.
    within = skip - tf.concat([[0], ends], 0)[first]
    return (tf.data.Dataset.from_tensor_slices(order[first:])
            .flat_map(lambda block: read_block(e, block)).skip(within))

  first_epoch, offset = divmod(start_record, total)
  return epoch(tf.constant(first_epoch, tf.int64), offset).concatenate(
      tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(epoch))


def train_dataset(dataset_dir: str, *, global_batch: int, seed: int, start_step: int = 0,
                  shuffle_buffer: int = 1024, split: str = "train",
                  process_index: int | None = None, process_count: int | None = None
                  ) -> tf.data.Dataset:
  """Infinite per-host batches (global_batch / process_count rows) of MODEL_KEYS from step
  `start_step` on: this process's `train_records`, batched and parsed."""
  index, count = _host(process_index, process_count)
  batch = per_host_batch(global_batch, count)
  records = train_records(dataset_dir, seed=seed, start_record=start_step * batch,
                          shuffle_buffer=shuffle_buffer, split=split, process_index=index,
                          process_count=count)
  # Reading and shuffling run ahead of batching and parsing, across epoch boundaries too.
  ds = records.prefetch(2 * batch).batch(batch, drop_remainder=True)
  ds = ds.map(batch_parser(load_builder(dataset_dir), MODEL_KEYS),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(os.cpu_count() or 1, 2)
  return ds.with_options(options).prefetch(2)


def num_eval_batches(num_examples: int, global_batch: int) -> int:
  return -(-num_examples // global_batch)


def eval_dataset(dataset_dir: str, split: str, *, global_batch: int,
                 process_index: int | None = None, process_count: int | None = None,
                 extra_keys=("specobj_id",)) -> tf.data.Dataset:
  """One pass over this process's share of `split` in per-host batches with a boolean `mask`
  (False on padding); every process gets the same number of batches."""
  builder = load_builder(dataset_dir)
  index, count = _host(process_index, process_count)
  batch = per_host_batch(global_batch, count)
  steps = num_eval_batches(max(host_sizes(builder, split, count)), batch)
  parse = batch_parser(builder, MODEL_KEYS + tuple(extra_keys))

  def padded(records):
    """The parsed batch, padded to `batch` rows with examples that count nowhere."""
    out = {k: _pad_rows(v, batch) for k, v in parse(records).items()}
    out["mask"] = tf.range(batch) < tf.shape(records)[0]
    return out

  instructions = host_instructions(builder, split, index, count)
  padding = tf.data.Dataset.from_tensors(
      padded(tf.zeros((0,), tf.string))).repeat()  # Processes whose share ran out keep stepping.
  if not instructions:
    return padding.take(steps)
  ds = _read(instructions).batch(batch).map(padded, num_parallel_calls=tf.data.AUTOTUNE,
                                            deterministic=True)
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
