"""Hand the allocator's free memory back to the operating system between the pipeline's stages.

A run allocates and frees the model's weights several times over (the parsed file, onnxruntime's
sessions, the working graph's arrays, the exported candidate). glibc keeps most of what is freed: after
a block is freed from its own mapping, later blocks up to that size come from the heap, and a heap page
is returned only from the heap's top. conv25m at ``--target-macs 0.8``, just before verification: 373 MB
of heap, 315 MB of it free, all counted in the process's RSS. ``malloc_trim(0)`` returns every whole
free page (a few milliseconds). Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache

logger = logging.getLogger(__name__)


@cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """Glibc's ``malloc_trim``, or None where the C library has none."""
    try:  # the process's own symbols: glibc's on Linux (find_library would spawn ldconfig: 0.3 s)
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # no such symbol (musl, macOS), no CDLL(None) (Windows)
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def release_free_memory(stage: str) -> bool:
    """Return the C heap's free pages to the system (glibc); whether anything could be released.

    Args:
        stage: Where in the run this is called (for the debug log).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    released = bool(trim(0))
    logger.debug("free heap memory returned to the system before %s: %s", stage, released)
    return released
