"""File digests, as the Hugging Face Hub names its LFS files."""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path


def sha256(path: Path, stop: threading.Event, advance=None) -> str | None:
    """``sha256:<hex>`` of a file (its Hugging Face LFS oid), or None once ``stop`` is set.

    A file of a Hugging Face cache snapshot links to ``blobs/<sha256>`` when it is an LFS file: the name
    is the hash, verified by the download, and nothing is read.
    """
    if path.is_symlink():
        blob = path.resolve()
        if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
            return "sha256:" + blob.name
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            if stop.is_set():
                return None
            digest.update(view[:n])
            if advance is not None:
                advance(n)
    return "sha256:" + digest.hexdigest()
