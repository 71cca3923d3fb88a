"""Host memory around XLA compiles: glibc's freed heap handed back to the system at each train-step compile.

Design:
- On XLA:CPU most of a run's peak resident memory is the compiler's transient heap (hundreds of MiB for the
  `small` bench UNet) and the heap that the set-up's many small compiles (each eager op of a new shape compiles
  once) freed but glibc keeps: freed memory stays resident in malloc's arenas until `malloc_trim` returns it.
- `release_freed_heap()` is `malloc_trim(0)`: it frees nothing that is in use, so results are unchanged; it costs
  milliseconds, so it runs at a compile only (the train step's first call and each new batch shape), never per step.
- Without glibc (macOS, musl) it does nothing.
- What trimming cannot touch is the compile's live heap: XLA:CPU's MLIR fusion emitter queues each kernel with an
  MLIR context of its own (236 contexts, ~290 MiB, for the `small` step on 2 cores; heaptrack). Not used, since
  both cost speed (README, Benchmark): YNNPACK for elementwise/reduce fusions (~130 MiB less, steps ~8% slower)
  and XLA's elemental emitter (`--xla_cpu_use_fusion_emitters=false`: ~400 MiB less, steps 1.9x slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_heap() -> bool:
    """Return the heap that glibc holds freed to the system (resident memory drops; live data is untouched).

    Returns whether there was a malloc_trim to call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
