"""sha256 of a file, read in chunks and remembered per (path, size, modification time) in the process:
what a weights file or an inspector records to check that the bytes are the ones it was made with."""
from __future__ import annotations

import hashlib
from pathlib import Path

_MEMO: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file at ``path`` (1 MiB chunks; a 97 MB file takes ~0.1 s, once)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]
