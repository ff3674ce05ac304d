"""Pillow's truncated-image switch, scoped instead of global.

The official dataset readers set ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` for the whole process; the
service must refuse truncated uploads. A process may do both (the CLI, the tests), so each sets the flag
only around its own decoding.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import ImageFile

_FLAG_LOCK = threading.RLock()


@contextmanager
def truncated_images(allowed: bool) -> Iterator[None]:
    """Decode with ``LOAD_TRUNCATED_IMAGES = allowed`` inside the block, restoring it afterwards."""
    with _FLAG_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
