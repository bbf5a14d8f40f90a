"""tf.data over the prepared shards: shapes, decoding, determinism, resume, hosts, eval."""

import itertools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from astra_jax.data import pipeline


def batches(dataset_dir, n, **kwargs):
  kwargs = {**dict(global_batch=4, seed=0, process_index=0, process_count=1), **kwargs}
  return list(itertools.islice(pipeline.train_dataset(dataset_dir, **kwargs).as_numpy_iterator(), n))


def test_shapes_and_dtypes(tiny_dataset):
  (batch,) = batches(tiny_dataset, 1)
  assert set(batch) == {"image", "aperture_fluxes", "fiber_diameter", "flux", "weight", "z",
                        "has_z"}
  assert batch["fiber_diameter"].shape == (4,) and batch["fiber_diameter"].dtype == np.float32
  assert set(np.unique(batch["fiber_diameter"])) <= {2.0, 3.0}
  assert batch["aperture_fluxes"].shape == (4, 5, 5) and batch["aperture_fluxes"].dtype == np.float32
  assert batch["image"].shape == (4, 5, 32, 32) and batch["image"].dtype == np.float16
  assert batch["flux"].shape == batch["weight"].shape == (4, 4000)
  assert batch["z"].dtype == np.float32 and batch["has_z"].dtype == bool
  assert tf.config.get_visible_devices("GPU") == []


def test_same_seed_same_batches_other_seed_other_batches(tiny_dataset):
  a, b, c = batches(tiny_dataset, 6), batches(tiny_dataset, 6), batches(tiny_dataset, 6, seed=1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not all(np.array_equal(x["z"], y["z"]) for x, y in zip(a, c))


def test_resume_at_step_k_yields_batch_k(tiny_dataset):
  # 17 training galaxies in batches of 4: step 5 starts in the second epoch.
  full = batches(tiny_dataset, 9)
  for k in (1, 4, 5, 8):
    (resumed,) = batches(tiny_dataset, 1, start_step=k)
    for key in resumed:
      np.testing.assert_array_equal(resumed[key], full[k][key], err_msg=f"step {k} {key}")


def test_epochs_cover_every_example_and_reshuffle(tiny_dataset):
  stream = np.concatenate([b["flux"].sum(1) for b in batches(tiny_dataset, 17)])
  first, second = stream[:17], stream[17:34]
  assert len(set(first)) == 17 and sorted(first) == sorted(second)
  assert not np.array_equal(first, second)


def test_batch_parsing_equals_tfds_decoding_example_by_example(tiny_dataset):
  builder = pipeline.load_builder(tiny_dataset)
  want = {ex["specobj_id"]: ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
  keys = ("image", "flux", "weight", "z", "has_z", "specobj_id", "ra", "dec", "aperture_flux")
  got = {}
  for batch in pipeline.eval_dataset(tiny_dataset, "train", global_batch=4, process_index=0,
                                     process_count=1, extra_keys=keys[5:]).as_numpy_iterator():
    for i in np.flatnonzero(batch["mask"]):
      got[batch["specobj_id"][i]] = {k: batch[k][i] for k in keys}
  assert len(got) == len(want) == 17
  for specobj_id, ex in want.items():
    for k in keys:
      a, b = np.asarray(got[specobj_id][k]), np.asarray(ex[k])
      assert a.dtype == b.dtype or a.dtype.kind == b.dtype.kind == "S", k
      np.testing.assert_array_equal(a, b, err_msg=f"{specobj_id} {k}")


def specobj_ids(dataset_dir, records):
  parse = pipeline.batch_parser(pipeline.load_builder(dataset_dir), ("specobj_id",))
  return [i.decode() for i in parse(tf.constant(list(records)))["specobj_id"].numpy()]


def test_each_process_reads_its_share_and_together_one_epoch(tiny_dataset):
  builder = pipeline.load_builder(tiny_dataset)
  assert pipeline.host_sizes(builder, "train", 2) == [9, 8]   # 17 training galaxies.
  everything = set(specobj_ids(tiny_dataset, tf.data.TFRecordDataset(
      pipeline._files(builder, "train")).as_numpy_iterator()))  # pylint: disable=protected-access
  epochs = []
  for index, size in enumerate((9, 8)):
    # Its first epoch holds only its own range, which is all it reads.
    (instruction,) = pipeline.host_instructions(builder, "train", index, 2)
    assert instruction[1:] == ((0, 9), (9, 8))[index]
    stream = pipeline.train_records(tiny_dataset, seed=0, process_index=index, process_count=2)
    records = list(itertools.islice(stream.as_numpy_iterator(), 2 * size))
    first, second = specobj_ids(tiny_dataset, records[:size]), specobj_ids(tiny_dataset,
                                                                            records[size:])
    assert len(set(first)) == size and set(first) == set(second) and first != second
    epochs.append(set(first))
  assert not epochs[0] & epochs[1] and epochs[0] | epochs[1] == everything

  hosts = [batches(tiny_dataset, 6, process_index=i, process_count=2) for i in (0, 1)]
  assert hosts[0][0]["image"].shape[0] == 2
  for k in (1, 4, 5):  # Host 1's step 5 starts in its third epoch (8 records each).
    (resumed,) = batches(tiny_dataset, 1, process_index=1, process_count=2, start_step=k)
    np.testing.assert_array_equal(resumed["image"], hosts[1][k]["image"])


def test_resume_reads_at_most_one_block(tiny_dataset):
  # Blocks of 4 records; resuming at record 13 (the fourth block of the shuffled order, one
  # record in) gives the stream's records from 13 on.
  stream = lambda start: pipeline.train_records(tiny_dataset, seed=2, start_record=start,
                                                shuffle_buffer=4, process_index=0,
                                                process_count=1)
  full = list(itertools.islice(stream(0).as_numpy_iterator(), 40))
  for start in (3, 13, 17, 21):
    assert list(itertools.islice(stream(start).as_numpy_iterator(), 40 - start)) == full[start:]
  assert len(set(full[:17])) == 17 and set(full[:17]) == set(full[17:34])


def test_eval_processes_cover_the_split_once(tiny_dataset):
  ids = []
  for index in (0, 1):
    out = list(pipeline.eval_dataset(tiny_dataset, "train", global_batch=4, process_index=index,
                                     process_count=2).as_numpy_iterator())
    assert len(out) == 5                   # ceil(9 / 2) per process, the same on both.
    ids += [i for b in out for i, m in zip(b["specobj_id"], b["mask"]) if m]
  assert len(ids) == len(set(ids)) == 17


def test_eval_pads_to_whole_batches_with_a_mask(tiny_dataset):
  out = list(pipeline.eval_dataset(tiny_dataset, "test", global_batch=4, process_index=0,
                                   process_count=1).as_numpy_iterator())
  assert len(out) == 2                                             # 5 test galaxies.
  mask = np.concatenate([b["mask"] for b in out])
  assert mask.tolist() == [True] * 5 + [False] * 3
  pad = out[-1]
  assert np.all(pad["weight"][1:] == 0) and not pad["has_z"][1:].any()
  ids = [i for b in out for i, m in zip(b["specobj_id"], b["mask"]) if m]
  assert len(set(ids)) == 5
