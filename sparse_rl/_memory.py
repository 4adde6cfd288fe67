"""Hand memory that set-up freed back to the operating system.

``sparsify`` frees large temporaries before training starts: the gradient probe's dense score buffers (4 bytes per
parameter, and its batches' activations), TRL's reference copy when a shared reference replaces it, the mask
selection's keys. glibc keeps freed heap pages resident, so without a trim they count in the process's memory for
the whole run, and training only partly reuses them (measured: ``benchmarks/bench_sparsify_memory.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_trim = None


def return_freed_memory() -> bool:
    """``gc.collect()`` then glibc's ``malloc_trim(0)``; True if the trim ran (False off glibc: nothing to do)."""
    global _trim
    gc.collect()
    if _trim is None:
        _trim = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim = getattr(libc, "malloc_trim", False)
        except OSError:
            pass
    if not _trim:
        return False
    _trim(0)
    return True
