"""The Grain input pipeline: shard directory -> per-process batches for the train step.

  it = make_iterator(path, stage="pretrain", global_batch_size=16, seed=0)
  batch = next(it)            # dict of numpy arrays, see `finalize`
  state = it.get_state()      # JSON-serializable; it.set_state(state) resumes with exactly the next batch

Order of operations (all on Grain MapDatasets, so every element is a pure function of its index):
  source -> global shuffle (seeded; a new permutation every epoch) -> repeat -> this process's slice
  (records p, p + P, p + 2P, ... of the global stream) -> batch -> finalize -> iterator (+ worker processes).
Batching happens before `to_iter_dataset`, where `mp_prefetch` gives each worker whole batches, so batch
contents do not depend on `worker_count`, and the iterator state is just the next batch's index.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
from typing import Callable, Iterator, TypeVar

import grain
import numpy as np

from mimix_jax.data import batch as batch_lib
from mimix_jax.data.shards import ShardSource, read_manifest

__all__ = ["make_iterator", "read_manifest", "finalize", "prefetch_to_device"]

T = TypeVar("T")


def finalize(batch: dict[str, np.ndarray], reference_logps: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """A batch of stored records -> the batch schema (data/batch.py), plus `index`; with a reference table [N, 2],
  also each record's reference log-probs (padding rows, index -1, get zeros)."""
  out = {**batch_lib.from_sequences(batch["tokens"], batch["segment_ids"], batch["loss_mask"]),
         "index": batch["index"].astype(np.int64)}
  if reference_logps is not None:
    index = out["index"]
    out[batch_lib.REFERENCE_LOGPS] = np.where((index >= 0)[:, None], reference_logps[np.maximum(index, 0)], 0.0
                                              ).astype(np.float32)
  return out


class _Padded(grain.MapDataset):
  """The parent followed by padding records up to `length` (for evaluation's last partial batch)."""

  def __init__(self, parent: grain.MapDataset, length: int, padding: dict[str, np.ndarray]):
    super().__init__(parent)
    self._length = length
    self._padding = padding

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index < len(self._parents[0]):
      return self._parents[0][index]
    return {k: np.copy(v) for k, v in self._padding.items()}

  def __str__(self) -> str:
    return f"_Padded(length={self._length})"


def make_iterator(
    path: str,
    *,
    stage: str,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
    read_threads: int = 1,
    prefetch_batches: int = 4,
    reference_logps: np.ndarray | None = None,
) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's batches (global_batch_size // process_count rows).

  Each batch is a dict of numpy arrays (b = per-process batch, T = max_len of the shards), data/batch.py's FIELDS:
    pretrain/sft: [b, T]; dpo: [b, 2, T] (0 = chosen, 1 = rejected)
    index int64 [b], the record's global index in the shards (-1 for padding rows)
    reference_logps float32 [b, 2], when a table [N, 2] is given (`reference_logps`).
  num_epochs None repeats forever. With drop_remainder=False (and a finite num_epochs) the stream is padded
  with all-padding rows (loss_mask 0, segment_ids 0) so every process yields the same number of full batches.
  """
  source = ShardSource(path)
  if source.stage != stage:
    raise ValueError(f"{path} holds {source.stage} data, not {stage}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if num_epochs is None and not drop_remainder:
    raise ValueError("drop_remainder=False needs a finite num_epochs")
  if len(source) == 0:
    raise ValueError(f"{path} has no records")
  batch = global_batch_size // process_count
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # ShuffleMapDataset draws a new permutation for every epoch of the repeat
  ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    total = len(ds)
    if drop_remainder:
      ds = ds[: total - total % process_count]  # equal shares, so no process runs an extra step
    else:
      per_process = -(-total // process_count)
      per_process = -(-per_process // batch) * batch
      ds = _Padded(ds, per_process * process_count, source.padding_record())
  ds = ds[process_index::process_count]
  ds = ds.batch(batch, drop_remainder=drop_remainder).map(functools.partial(finalize, reference_logps=reference_logps))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def prefetch_to_device(iterator: grain.DatasetIterator, put: Callable[[dict], T], depth: int) -> Iterator[tuple[T, bytes]]:
  """Yields (put(batch), the iterator's state after that batch as JSON bytes), `depth` batches put ahead.

  `put` starts the host-to-device transfer (asynchronous in JAX), so the next batches travel while the current
  step runs, and a host stall (a metrics fetch, a checkpoint) does not leave the devices waiting for data. Each
  batch carries the state after it: a checkpoint records the position after the last batch trained on, not
  after the last one prefetched, so a resumed run fetches the prefetched batches again.
  """
  queue = collections.deque()
  for batch in iterator:
    queue.append((put(batch), json.dumps(iterator.get_state()).encode()))
    if len(queue) > depth:
      yield queue.popleft()
  yield from queue


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags, which raise if the main program never parsed them."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)

