"""sparsify's set-up frees large temporaries (probe buffers, TRL's reference copy); return_freed_memory hands the
pages glibc would keep resident back to the OS."""

import platform
from pathlib import Path

import pytest

from sparse_rl._memory import return_freed_memory

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not glibc, reason="malloc_trim is glibc's")
def test_freed_heap_pages_are_returned():
    chunks = [bytearray(b"\1" * 60_000) for _ in range(3000)]  # ~170 MiB of heap chunks (below the mmap threshold)
    sentinel = bytearray(b"\1" * 60_000)  # above them: free() alone cannot shrink the heap's top
    before = _rss_mib()
    del chunks
    kept = _rss_mib()
    assert return_freed_memory()
    after = _rss_mib()
    assert kept - after > 0.5 * 170, (before, kept, after)  # freed but resident until the trim
    del sentinel


def test_sparsify_returns_freed_memory(monkeypatch, tiny_checkpoint, tmp_path):
    from sparse_rl import SparseConfig, sparsify
    from sparse_rl.trl import training
    from tests.trl_cases import build_trainer

    calls = []
    monkeypatch.setattr(training, "return_freed_memory", lambda: calls.append(True) or True)
    trainer = build_trainer("dpo", tiny_checkpoint, tmp_path)
    sparsify(trainer, SparseConfig(density=0.1, discovery="random", shared_reference=True))
    assert calls == [True]
