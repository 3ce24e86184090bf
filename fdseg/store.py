"""Where results are written: a local folder or any filesystem pyarrow reaches (S3, GCS, HDFS, ...).

``OutputStore("out/")`` writes under a local folder with :mod:`fdseg.atomic` (write
beside, fsync, rename); ``OutputStore("s3://bucket/run1")`` (or ``gs://``, ``hdfs://``,
``file://``) goes through ``pyarrow.fs``: on object stores an object appears only once
its upload completes, elsewhere the file is written beside and renamed over the target.
Either way a reader never sees half a file. A store pickles as its address, so Ray actors
on other machines open it themselves (and must be able to reach it).
"""
from __future__ import annotations

import uuid
from pathlib import Path, PurePosixPath

from .atomic import write_bytes as _write_local

#: pyarrow filesystems on which an object becomes visible only when its upload has finished
_OBJECT_STORES = {"s3", "gcs", "abfs"}


def is_uri(x: str | Path) -> bool:
    """``scheme://...`` (s3://, gs://, file://, ...) as opposed to a plain local path."""
    return isinstance(x, str) and "://" in x


def pyarrow_fs(uri: str):
    """``scheme://path`` -> (pyarrow FileSystem, path on it); needs pyarrow (the ``ray`` extra)."""
    try:
        from pyarrow import fs as pafs
    except ImportError:  # pragma: no cover - pyarrow comes with the ray extra
        from .errors import MissingExtraError
        raise MissingExtraError(f"reading or writing {uri}", "ray", "pyarrow") from None
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        from .errors import InputError
        raise InputError(uri, f"cannot open this filesystem address with pyarrow ({e})") from None


class OutputStore:
    """Write, read and list files under one output folder, local or remote."""

    def __init__(self, out: str | Path):
        self.address = str(out)
        self.local: Path | None = None if is_uri(self.address) else Path(out)
        self._fs = None
        self._root = ""
        self._made: set[str] = set()

    def __reduce__(self):
        return (OutputStore, (self.address,))

    def __str__(self) -> str:
        return self.address

    def _remote(self):
        if self._fs is None:
            self._fs, self._root = pyarrow_fs(self.address)
            self._root = self._root.rstrip("/")
        return self._fs

    def _path(self, rel: str) -> str:
        return f"{self._root}/{rel}" if self._root else rel

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local is not None:
            _write_local(self.local / rel, data)
            return
        fs = self._remote()
        path = self._path(rel)
        parent = str(PurePosixPath(path).parent)
        if parent not in self._made:
            fs.create_dir(parent, recursive=True)
            self._made.add(parent)
        if fs.type_name in _OBJECT_STORES:
            with fs.open_output_stream(path) as f:
                f.write(data)
        else:
            tmp = f"{parent}/.{PurePosixPath(path).name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                fs.move(tmp, path)
            except BaseException:
                try:
                    fs.delete_file(tmp)
                except Exception:
                    pass
                raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None if it does not exist."""
        if self.local is not None:
            p = self.local / rel
            return p.read_text(encoding="utf-8") if p.is_file() else None
        from pyarrow import fs as pafs
        fs = self._remote()
        if fs.get_file_info(self._path(rel)).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode("utf-8")

    def list(self, rel_dir: str) -> list[str]:
        """Names of the files directly in ``rel_dir`` (sorted; [] if it does not exist)."""
        if self.local is not None:
            d = self.local / rel_dir
            return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        from pyarrow import fs as pafs
        sel = pafs.FileSelector(self._path(rel_dir), allow_not_found=True)
        return sorted(PurePosixPath(i.path).name for i in self._remote().get_file_info(sel)
                      if i.type == pafs.FileType.File)
