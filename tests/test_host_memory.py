"""Entry points re-execute themselves once with glibc's malloc tunables; what they change."""

import ctypes
import mmap
import os
import subprocess
import sys

import pytest

from astra_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPORT = ("import os; from astra_jax import host_memory; host_memory.reexec_with_tunables(); "
           "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")
_GLIBC = pytest.mark.skipif(
    not (sys.platform.startswith("linux")
         and host_memory._glibc_has_tunables()),  # pylint: disable=protected-access
    reason="needs Linux and glibc >= 2.35")


def run(code: str, **env) -> str:
  """stdout of `python -c code` in a child with `env` added (None values: removed)."""
  env = {k: v for k, v in dict(os.environ, PYTHONPATH=REPO, **env).items() if v is not None}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=120, check=True)
  return proc.stdout


def child(**env):
  """[whether the process that reports is the one started, its GLIBC_TUNABLES]."""
  env = {k: v for k, v in dict(os.environ, PYTHONPATH=REPO, **env).items() if v is not None}
  proc = subprocess.Popen([sys.executable, "-c", _REPORT], stdout=subprocess.PIPE, text=True,
                          cwd=REPO, env=env)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0
  pid, tunables = out.split()
  return [str(int(pid) == proc.pid), tunables]


@_GLIBC
def test_reexec_sets_the_tunables_once_and_keeps_those_already_set():
  same_pid, tunables = child(ASTRA_MALLOC=None, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert same_pid == "True"  # execve: the same process (signals, parents' waits still apply).
  # The user's arena_max stays; the other tunables follow it.
  assert tunables.split(":") == ["glibc.malloc.arena_max=4"] + [
      t for t in host_memory.TUNABLES if not t.startswith("glibc.malloc.arena_max=")]


def test_opt_out_and_no_second_reexec():
  assert child(ASTRA_MALLOC="0", GLIBC_TUNABLES=None) == ["True", "None"]
  all_set = ":".join(host_memory.TUNABLES)
  assert child(ASTRA_MALLOC=None, GLIBC_TUNABLES=all_set) == ["True", all_set]


# A jitted function whose 64 MB intermediate XLA:CPU allocates, and frees, at every call (a
# reduction over a transpose: not fused into one loop); prints the minor page faults of the
# fourth call.
_FAULTS = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(x.T * 2.0, axis=0)[-1])
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@_GLIBC
def test_tunables_keep_freed_buffers_in_the_process():
  untuned = int(run(_FAULTS, ASTRA_MALLOC="0", GLIBC_TUNABLES=None))
  tuned = int(run(_FAULTS, ASTRA_MALLOC="0", GLIBC_TUNABLES=host_memory.tunables()))
  # Untuned, each call faults its buffers in again (the 64 MB alone is 16,384 pages of 4 KiB,
  # unless the kernel's THP mode "always" backs them with huge pages); tuned, the heap holds them.
  if host_memory.thp_mode() != "always":
    assert untuned > 16384, untuned
  assert tuned < 100, (tuned, untuned)


def _anon_huge_kb(address: int) -> int:
  """AnonHugePages (kB) of this process's mapping that contains `address`."""
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and ":" not in head:
        start, end = (int(x, 16) for x in head.split("-"))
        inside = start <= address < end
      elif inside and line.startswith("AnonHugePages:"):
        return int(line.split()[1])
  raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_small_pages_turns_huge_pages_off_inside_the_block_only():
  libc = ctypes.CDLL(None)
  assert libc.prctl(42, 0, 0, 0, 0) == 0  # PR_GET_THP_DISABLE: huge pages allowed.
  with host_memory.small_pages():
    assert libc.prctl(42, 0, 0, 0, 0) == 1
    with host_memory.small_pages():  # Nested (or another thread's): still off until both end.
      pass
    assert libc.prctl(42, 0, 0, 0, 0) == 1
    # Memory that asks for huge pages and is first touched here gets none.
    memory = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    memory[:] = b"\1" * len(memory)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert _anon_huge_kb(address) == 0
  assert libc.prctl(42, 0, 0, 0, 0) == 0
