"""Host memory: glibc's freed heap goes back to the system around the train step's compiles (flax_lora.host_memory)."""

import ctypes
import platform

import jax
import jax.numpy as jnp
import pytest

from flax_lora import train as T
from flax_lora.host_memory import release_freed_heap, resident_bytes

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@glibc
def test_release_freed_heap_returns_freed_blocks():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(1024) for _ in range(64 * 1024)]  # 64 MiB of small blocks, below malloc's mmap threshold
    for b in blocks:
        ctypes.memset(b, 1, 1024)  # resident
    pin = libc.malloc(1024)  # above them: the heap's top cannot shrink by itself when they are freed
    for b in blocks:
        libc.free(b)
    before = resident_bytes()
    assert release_freed_heap()
    assert before - resident_bytes() > 32 * 2**20
    libc.free(pin)


def test_train_step_releases_the_heap_around_compiles_only(monkeypatch):
    calls = []
    monkeypatch.setattr(T, "release_freed_heap", lambda: calls.append(1))
    step = T.TrainStep(jax.jit(lambda state, base, batch: (state + base, batch * 2)), jnp.float32(1), mesh=None)
    state, out = step(jnp.float32(0), jnp.ones(3))
    assert len(calls) == 2 and float(state) == 1 and out.tolist() == [2, 2, 2]  # before and after the compile
    step(state, jnp.ones(3))
    assert len(calls) == 2  # same shapes: no compile, no trim
    step(state, jnp.ones(4))
    assert len(calls) == 3  # a new batch shape compiles: the heap goes back after it
