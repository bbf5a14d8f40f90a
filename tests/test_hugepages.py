"""Entry points re-execute themselves once with glibc's huge-page tunable."""

import ctypes
import mmap
import os
import subprocess
import sys

import pytest

from astra_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPORT = ("import os; from astra_jax import hugepages; hugepages.reexec_with_huge_pages(); "
           "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def child(**env):
  """[whether the process that reports is the one started, its GLIBC_TUNABLES]."""
  env = {k: v for k, v in dict(os.environ, PYTHONPATH=REPO, **env).items() if v is not None}
  proc = subprocess.Popen([sys.executable, "-c", _REPORT], stdout=subprocess.PIPE, text=True,
                          cwd=REPO, env=env)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0
  pid, tunables = out.split()
  return [str(int(pid) == proc.pid), tunables]


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hugepages.thp_mode() == "madvise"
                         and hugepages._glibc_has_tunable()),  # pylint: disable=protected-access
                    reason="needs Linux, glibc >= 2.35 and THP mode 'madvise'")
def test_reexec_sets_the_tunable_once_and_keeps_other_tunables():
  same_pid, tunables = child(ASTRA_HUGEPAGES=None, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert same_pid == "True"  # execve: the same process (signals, parents' waits still apply).
  # The caller's arena_max stays; the other KEEP_MEMORY tunables and the huge pages are added.
  assert tunables.split(":") == ["glibc.malloc.arena_max=4", *hugepages.KEEP_MEMORY[1:],
                                 hugepages.TUNABLE]
  assert child(ASTRA_HUGEPAGES=None, GLIBC_TUNABLES=None)[1].split(":") == [
      *hugepages.KEEP_MEMORY, hugepages.TUNABLE]


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hugepages.thp_mode() == "madvise"
                         and hugepages._glibc_has_tunable()),  # pylint: disable=protected-access
                    reason="needs Linux, glibc >= 2.35 and THP mode 'madvise'")
def test_keep_memory_tunables_stop_the_page_faults_of_repeated_large_buffers():
  # A 64 MB buffer allocated and freed 5 times, as XLA:CPU does with a step's buffers: glibc
  # mmaps and unmaps it each time (16,385 faults with 4 KiB pages, 544 with huge pages here),
  # unless it is kept (none after the first).
  script = ("import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = "
            "ctypes.c_void_p; faults = []\n"
            "for _ in range(5):\n"
            "  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "  p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(ctypes.c_void_p(p))\n"
            "  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
            "print(faults)")
  run = lambda tunables: eval(subprocess.run(  # pylint: disable=eval-used
      [sys.executable, "-c", script], capture_output=True, text=True, check=True,
      env=dict(os.environ, GLIBC_TUNABLES=tunables)).stdout)
  plain = run(hugepages.TUNABLE)
  kept = run(":".join([*hugepages.KEEP_MEMORY, hugepages.TUNABLE]))
  assert min(plain[1:]) >= 32 and max(kept[1:]) < 8, (plain, kept)


def test_opt_out_and_no_second_reexec():
  assert child(ASTRA_HUGEPAGES="0", GLIBC_TUNABLES=None) == ["True", "None"]
  assert child(ASTRA_HUGEPAGES=None, GLIBC_TUNABLES=hugepages.TUNABLE) == ["True",
                                                                         hugepages.TUNABLE]


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
  with hugepages.small_pages():
    assert libc.prctl(42, 0, 0, 0, 0) == 1
    with hugepages.small_pages():  # Nested (or another thread's): still off until both end.
      pass
    assert libc.prctl(42, 0, 0, 0, 0) == 1
    # Memory that asks for huge pages and is first touched here gets none.
    memory = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    memory[:] = b"\1" * len(memory)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    assert _anon_huge_kb(address) == 0
  assert libc.prctl(42, 0, 0, 0, 0) == 0


def test_environ_without_tunable_keeps_the_other_tunables():
  env = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=4:{hugepages.TUNABLE}", "HOME": "/h"}
  assert hugepages.environ_without_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4",
                                                    "HOME": "/h"}
  assert hugepages.environ_without_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}) == {}
  # The KEEP_MEMORY values go too (a reexec_with_huge_pages process's own); other values stay.
  ours = ":".join([*hugepages.KEEP_MEMORY, hugepages.TUNABLE])
  assert hugepages.environ_without_tunable({"GLIBC_TUNABLES": ours}) == {}
  assert hugepages.environ_without_tunable({"GLIBC_TUNABLES": f"glibc.malloc.mmap_max=9:{ours}"}
                                           ) == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=9"}
  assert hugepages.environ_without_tunable({"HOME": "/h"}) == {"HOME": "/h"}
  assert env["GLIBC_TUNABLES"].endswith(hugepages.TUNABLE)  # The argument is left as it was.

