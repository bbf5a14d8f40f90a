"""How the host's memory is allocated: the command-line entry points re-execute themselves once
with glibc malloc tunables (Linux with glibc >= 2.35), and restores fault in small pages.

XLA:CPU allocates every buffer of a step afresh (the seed config's bf16 train step: 3.2 GB of
temporaries) and frees it at the end. By default glibc serves allocations this large with mmap
and returns them with munmap (threads other than the main one always do so: their arenas hold at
most 64 MB), so the kernel faults in and zeroes every page again each step: ~800,000 faults and
3-5 s of system time per seed step on a 2-core AMD EPYC VM. The tunables:
  glibc.malloc.hugetlb=1: transparent huge pages for malloc'd memory (madvise(MADV_HUGEPAGE)),
    which a kernel whose THP mode is "madvise" (Debian's and Ubuntu's default) backs with 2 MiB
    pages: 512x fewer faults and TLB misses on what is still faulted in;
  glibc.malloc.arena_max=1, glibc.malloc.mmap_max=0 and a trim_threshold of 1 TiB: every thread
    allocates from the one main heap, large blocks included, and freed memory stays in the process
    for the next step (as the GPU allocators of jax and torch keep theirs), so from the second or
    third step on a step faults in nothing (0 faults, 0.2 s of system time per seed step).
Measured on that VM: the peer-matched patch embedding's forward + backward pass at batch 32, 6.0 s
with 4 KiB pages, 3.5 s with huge pages (the torch peer's step, 8.9 and 5.3 s); the seed bf16 train
step, 20.6-21.8 s with huge pages alone, 18.5-21.0 s with the heap kept; the tf.data pipeline,
490-580 and 743-744 samples/s/core. The cost: the process keeps its peak heap until it exits.
A tunable already set in GLIBC_TUNABLES keeps its value; no results change. Set ASTRA_MALLOC=0 to
keep a process as it was started (e.g. in a debugger); in a notebook, start Jupyter with
`GLIBC_TUNABLES=$(python -m astra_jax.host_memory)` for the same effect.

`small_pages()` turns huge pages off for a block that touches much memory once: on the
Firecracker VM these figures come from, faulting in fresh 2 MiB pages was ~2x slower than 4 KiB
ones (restoring the seed TrainState: 3.6-4.7 s with them, 2.0-2.6 s without).
"""

import contextlib
import ctypes
import os
import platform
import sys
import threading

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            f"glibc.malloc.trim_threshold={1 << 40}")
# Set in the re-executed process (and inherited by its children): never re-execute twice.
_DONE = "ASTRA_MALLOC"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(_THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_has_tunables() -> bool:
  libc, version = platform.libc_ver()
  try:
    return libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def tunables(current: str = "") -> str:
  """GLIBC_TUNABLES with `TUNABLES` added after `current`'s, but for the names `current` sets."""
  kept = [t for t in current.split(":") if t]
  names = {t.split("=")[0] for t in kept}
  return ":".join(kept + [t for t in TUNABLES if t.split("=")[0] not in names])


def wanted() -> bool:
  """Whether re-executing with the tunables would change anything for this process."""
  if os.environ.get(_DONE) is not None:
    return False
  current = os.environ.get("GLIBC_TUNABLES", "")
  return (sys.platform.startswith("linux") and _glibc_has_tunables()
          and tunables(current) != current)


def reexec_with_tunables():
  """Replaces this process (same pid, arguments and environment) by one with the tunables set.

  Call first thing in a `__main__` block, before importing jax or TensorFlow: the restart then
  costs only the interpreter's start. Returns without doing anything when `wanted()` is False.
  """
  if not wanted():
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables(os.environ.get("GLIBC_TUNABLES", "")),
             **{_DONE: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


_PR_SET_THP_DISABLE, _PR_GET_THP_DISABLE = 41, 42  # <linux/prctl.h>
_lock = threading.Lock()
_blocks = 0  # Threads inside small_pages().
_turned_off = False  # Whether the first of them turned THP off (the last turns it back on).


@contextlib.contextmanager
def small_pages():
  """Memory this process first touches inside the block gets 4 KiB pages, not transparent huge
  pages (Linux's per-process PR_SET_THP_DISABLE; elsewhere, or if THP was already off, nothing
  changes). For memory written once and then kept, such as a restored checkpoint: there the fault
  cost is all, and TLB reach did not matter (an update streaming over the restored seed TrainState
  took 0.09-0.11 s per pass either way). Process-wide while any thread is inside a block.
  """
  global _blocks, _turned_off
  with _lock:
    if _blocks == 0:
      libc = _libc()
      _turned_off = (libc is not None and libc.prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0) == 0
                     and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0)
    _blocks += 1
  try:
    yield
  finally:
    with _lock:
      _blocks -= 1
      if _blocks == 0 and _turned_off:
        _libc().prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)
        _turned_off = False


def _libc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    return ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None


if __name__ == "__main__":
  print(tunables(os.environ.get("GLIBC_TUNABLES", "")))
