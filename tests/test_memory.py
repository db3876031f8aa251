"""Returning the allocator's free memory between stages: a no-op where the C library cannot."""

from __future__ import annotations

import ctypes
import platform
import sys

import pytest

from red_onnx.io import memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_free_heap_pages_go_back_to_the_system() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks, pins = [], []
    for _ in range(512):  # 50 MB of 100 KB blocks (below glibc's smallest mmap threshold: from the heap),
        blocks.append(libc.malloc(100_000))  # each followed by a live one: freed, they are holes the
        ctypes.memset(blocks[-1], 1, 100_000)  # heap cannot give back from its top
        pins.append(libc.malloc(4096))
    for block in blocks:
        libc.free(block)
    before = _rss_bytes()
    assert memory.release_free_memory("test") is True
    released = before - _rss_bytes()
    for pin in pins:
        libc.free(pin)
    assert released > 32 * 2**20


def test_without_malloc_trim_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_free_memory("test") is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_provides_malloc_trim() -> None:
    assert memory._malloc_trim() is not None
