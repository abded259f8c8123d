"""glibc allocator tuning for CPU encoding (see :func:`tune_malloc`)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS (once per process).

    By default glibc serves every block over 128 KiB-32 MiB with a fresh ``mmap`` and unmaps it on
    free, so each activation tensor of a CPU forward pass is page-faulted (and zeroed by the kernel)
    again; with these settings the blocks are reused. It is what jemalloc/tcmalloc give PyTorch.
    Costs: freed memory stays with the process (RSS does not shrink after a peak). Off when
    ``MIXSP_MALLOC_TUNING=0`` or not on glibc. Returns True when the settings are active.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if os.environ.get("MIXSP_MALLOC_TUNING", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)) == 1
        if not ok:  # older glibc caps the threshold at 32 MiB
            ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(32 << 20)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 * threshold)) == 1
    except (OSError, AttributeError) as err:
        log.debug("mallopt unavailable: %s", err)
        return False
    _malloc_tuned = ok
    return ok
