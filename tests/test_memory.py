"""sdlite.memory.set_malloc_policy: what it asks of glibc, checked with a recording stand-in."""

import pytest

from sdlite import memory


class FakeLibc:
    def __init__(self, max_mmap_threshold: int = 1 << 40):
        self.max_mmap_threshold = max_mmap_threshold
        self.settings = {}

    def mallopt(self, parameter: int, value: int) -> int:
        if parameter == memory.M_MMAP_THRESHOLD and value > self.max_mmap_threshold:
            return 0  # glibc refuses it and keeps the old value
        self.settings[parameter] = value
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(memory, "c_library", lambda: fake)
    monkeypatch.setattr(memory, "_low_memory_policy", False)
    return fake


def test_default_keeps_freed_blocks_and_low_memory_gives_them_back_for_good(libc):
    memory.set_malloc_policy(low_memory=False)
    assert libc.settings == {memory.M_MMAP_THRESHOLD: 256 << 20, memory.M_TRIM_THRESHOLD: 1 << 30}
    memory.set_malloc_policy(low_memory=True)
    low = {memory.M_MMAP_THRESHOLD: 64 << 10, memory.M_TRIM_THRESHOLD: 1 << 20}
    assert libc.settings == low
    memory.set_malloc_policy(low_memory=False)  # a later ordinary load does not undo it
    assert libc.settings == low


def test_a_glibc_that_refuses_large_thresholds_gets_32_mib(libc):
    libc.max_mmap_threshold = 32 << 20
    memory.set_malloc_policy(low_memory=False)
    assert libc.settings[memory.M_MMAP_THRESHOLD] == 32 << 20


def test_without_glibc_nothing_happens(monkeypatch):
    monkeypatch.setattr(memory, "c_library", lambda: None)
    memory.set_malloc_policy(low_memory=True)  # no error
