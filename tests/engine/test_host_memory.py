import platform

import pytest

from processor.engine.host_memory import keep_freed_host_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_malloc_thresholds() -> None:
    # mallopt returns 0 for a value it refuses (e.g. an mmap threshold above glibc's maximum).
    assert keep_freed_host_memory() is True
