"""Segment an image store on a Ray cluster with Ray Data (``fdseg segment --engine ray``).

The driver fits the segmenter once, as the local path does (or loads an inspector file), and
``ray.put``s the fitted state as an **inspector file's bytes** (fdseg/inspector.py: tensors plus
JSON, hash-checked, no pickle; ~2-25 MB) plus, where the backbone was built from a user's
``--weights`` file, that file's bytes: every actor of a ``map_batches`` actor pool gets them once and
loads them (``fdseg.load``), so the supports and a user's weights file need not exist on the workers,
nothing is refitted, and each actor predicts exactly what the driver's fit does (masks identical).
The workers need fdseg and the backbone's package (e.g. the EfficientNet-Lite0 weights package
fdseg depends on); the file's recorded weights hash is checked there. A matcher that cannot be saved
to an inspector (one holding networks: ``meta``, ``sam2_track``, ``fm_prompt``) is shipped as the
pickled segmenter object instead, as before.
Queries are read as bytes by ``ray.data.read_binary_files`` (local paths on a filesystem
the workers share, or any pyarrow filesystem: ``s3://``, ``gs://``, ``hdfs://``), decoded
and segmented in the actors by :func:`fdseg.segment_folder.segment_one` -- the same code
as the single-machine path, so masks are identical image for image -- and the actors
write the mask / score / overlay files straight into the output store.

The driver streams the finished rows into ``summary.jsonl`` (local output: the same file
and format as the local engine, durable at once) or ``summary.parts/`` (remote output,
one object per flush), so an interrupted run resumes with ``resume=True`` without
recomputing what it finished; at the end it writes ``summary.parquet`` (plus the CSV,
JSON and HTML report of the local engine). A query that cannot be decoded becomes an
error row, never a failed job.

Ray is imported only here, inside the functions: ``import fdseg`` never imports it.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

from .data.images import IMAGE_SUFFIXES
from .errors import FdsegError, InputError, MissingExtraError
from .segment_folder import (FIELDS, FolderResult, _row, _unique_names, _write_report, _write_summary,
                             collect_queries, read_log, segment_one)
from .segmenter import FewShotSegmenter
from .store import OutputStore, is_uri, pyarrow_fs

LOG = "summary.jsonl"
PARTS = "summary.parts"


def import_ray():
    """``ray`` and ``ray.data``, or a :class:`MissingExtraError` naming the ``ray`` extra."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingExtraError("--engine ray", "ray", e.name or "ray[data]") from None
    return ray


# -- the queries ---------------------------------------------------------------------------------
@dataclass
class QueryList:
    """Queries as the user named them (``files``), the paths Ray reads (``read_paths``) and the
    pyarrow filesystem they are on (None = the local filesystem)."""

    files: list[str]
    read_paths: list[str]
    filesystem: object = None


def _is_query_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def list_queries(items: Iterable[str | Path]) -> QueryList:
    """Files, folders and globs, local or ``scheme://`` URIs (not mixed) -> :class:`QueryList`.

    A folder gives its image files sorted by name, a glob its matches sorted, as the local engine."""
    items = [str(i) for i in items]
    uris = [is_uri(i) for i in items]
    if not any(uris):
        paths = collect_queries(items)
        return _once(QueryList([str(p) for p in paths], [os.path.abspath(p) for p in paths], None))
    if not all(uris):
        raise InputError(", ".join(items), "queries must be all local paths or all URIs on one filesystem")
    from pyarrow import fs as pafs
    files: list[str] = []
    reads: list[str] = []
    fs0 = None
    for item in items:
        scheme = item[:item.index("://") + 3]
        fs, path = pyarrow_fs(item)
        if fs0 is None:
            fs0 = fs
        elif fs.type_name != fs0.type_name:
            raise InputError(item, "all query URIs must be on one filesystem")
        path = path.rstrip("/")
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            found = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(path))
                            if i.type == pafs.FileType.File and _is_query_name(i.base_name)),
                           key=lambda p: PurePosixPath(p).name)
        elif info.type == pafs.FileType.File:
            found = [path]
        elif any(c in PurePosixPath(path).name for c in "*?["):
            parent, pattern = str(PurePosixPath(path).parent), PurePosixPath(path).name
            found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
                           if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))
        else:
            raise InputError(item, "query file or folder does not exist")
        files.extend(scheme + p for p in found)
        reads.extend(found)
    if not files:
        raise InputError(", ".join(items), "no query images found")
    return _once(QueryList(files, reads, fs0))


def _once(ql: QueryList) -> QueryList:
    """A file named twice (``a.png ./a.png``) is segmented once, under its first name."""
    keep = list({r: i for i, r in reversed(list(enumerate(ql.read_paths)))}.values())
    keep.sort()
    return QueryList([ql.files[i] for i in keep], [ql.read_paths[i] for i in keep], ql.filesystem)


# -- the finished rows -----------------------------------------------------------------------------
class RowLog:
    """Durable record of finished queries, read back by ``resume``.

    Local output: ``summary.jsonl`` appended and fsynced per batch (the local engine's file).
    Remote output (no appends on object stores): one ``summary.parts/*.jsonl`` object per flush."""

    def __init__(self, store: OutputStore, resume: bool, flush_rows: int = 256, flush_seconds: float = 10.0):
        self.store = store
        self.done: dict[str, dict] = {}
        if resume:
            self.done.update(read_log(store.read_text(LOG) or ""))
            for part in store.list(PARTS):
                self.done.update(read_log(store.read_text(f"{PARTS}/{part}") or ""))
        self._pending: list[dict] = []
        self._flush_rows, self._flush_s, self._last = flush_rows, flush_seconds, time.monotonic()
        self._file = None
        if store.local is not None:
            store.write_text(LOG, "".join(json.dumps(r) + "\n" for r in self.done.values()))
            self._file = open(store.local / LOG, "a", encoding="utf-8")

    def append(self, rows: list[dict]) -> None:
        for r in rows:
            self.done[r["query"]] = r
        if self._file is not None:
            self._file.write("".join(json.dumps(r) + "\n" for r in rows))
            self._file.flush()
            os.fsync(self._file.fileno())
            return
        self._pending.extend(rows)
        if len(self._pending) >= self._flush_rows or time.monotonic() - self._last >= self._flush_s:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
            self.store.write_text(f"{PARTS}/{name}", "".join(json.dumps(r) + "\n" for r in self._pending))
            self._pending = []
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


# -- what the driver ships ---------------------------------------------------------------------------
def ship_payload(seg: FewShotSegmenter, inspector: bytes | None = None) -> dict:
    """What goes to every actor: the fitted state as an inspector file's bytes (``inspector``: a file's
    bytes as given; else ``seg`` saved), plus the bytes of a user's ``--weights`` file; or, for a matcher
    an inspector cannot hold, the segmenter object itself (``{"seg": ...}``)."""
    from .errors import InputError as _InputError
    if inspector is None:
        with tempfile.TemporaryDirectory(prefix="fdseg-ship-") as tmp:
            try:
                seg.save(Path(tmp) / "fitted.fdseg")
            except _InputError as e:
                if "cannot be saved" not in str(e):
                    raise
                return {"seg": seg if seg.device.type == "cpu" else copy.deepcopy(seg).to("cpu")}
            inspector = (Path(tmp) / "fitted.fdseg").read_bytes()
    out = {"inspector": inspector}
    w = seg.settings.get("weights")
    if w and w != "random" and Path(w).is_file():
        out["weights"] = Path(w).read_bytes()
        out["weights_suffix"] = Path(w).suffix
    return out


def load_shipped(payload: dict, device: str = "cpu"):
    """An actor's segmenter from :func:`ship_payload`'s inspector bytes (and weights bytes)."""
    from .inspector import load
    with tempfile.TemporaryDirectory(prefix="fdseg-actor-") as tmp:
        path = Path(tmp) / "fitted.fdseg"
        path.write_bytes(payload["inspector"])
        weights = None
        if "weights" in payload:
            weights = Path(tmp) / f"weights{payload.get('weights_suffix', '')}"
            weights.write_bytes(payload["weights"])
        import warnings
        with warnings.catch_warnings():          # the driver warned about a numeric-path change already
            warnings.simplefilter("ignore")
            return load(path, device=device, weights=weights)


# -- the actors ------------------------------------------------------------------------------------
class SegmentActor:
    """A Ray Data actor: unpacks the shipped fitted segmenter once, then segments batches of
    ``{"bytes", "path"}`` rows, writes their files into the output store and returns their rows."""

    def __init__(self, shipped: list, store: str, device: str = "cpu", threads: int = 1):
        import ray
        import torch
        torch.set_num_threads(max(1, int(threads)))
        payload = ray.get(shipped[0])
        if "inspector" in payload:
            self.seg = load_shipped(payload, device)
        else:                                                # a matcher an inspector cannot hold
            self.seg: FewShotSegmenter = payload["seg"]
            if device != "cpu":
                self.seg.to(device)
        self.names: dict[str, str] = payload["names"]      # Ray path -> output name, where not the stem
        self.store = OutputStore(store)

    def __call__(self, batch: dict) -> dict:
        paths, rows = [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            path = str(path)
            name = self.names.get(path, PurePosixPath(path).stem)
            try:
                row, files = segment_one(self.seg, name, path, bytes(data))
                for rel, blob in files.items():
                    self.store.write_bytes(rel, blob)
            except Exception as e:  # not bad input (that is an error row already): keep the job going
                row = _row(name, path, None, f"{path}: internal error ({type(e).__name__}: {e})")
            paths.append(path)
            rows.append(json.dumps(row))
        return {"path": paths, "row": rows}


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class RayResult(FolderResult):
    """What the run gives back: every row (in query order), where, and what this run computed."""

    computed: int = 0                  # queries segmented by this call (0 when all were done)
    actors: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _parquet_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("query", pa.string()), ("file", pa.string()), ("width", pa.int64()),
                        ("height", pa.int64()), ("defect_fraction", pa.float64()), ("components", pa.int64()),
                        ("boxes", pa.list_(pa.list_(pa.int64()))), ("max_score", pa.float64()),
                        ("verdict", pa.string()), ("defect_score", pa.float64()),
                        ("status", pa.string()), ("error", pa.string())])
    assert [f.name for f in schema] == FIELDS
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


def _init_ray(ray, address: str | None, init_kwargs: dict | None) -> bool:
    """Connect to (``address``) or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    kw = dict(init_kwargs or {})
    if _starts_local(address):
        kw.setdefault("include_dashboard", False)     # a throw-away local instance: no dashboard
    ray.init(address=address, **kw)
    return True


def _starts_local(address: str | None) -> bool:
    return address is None and not os.environ.get("RAY_ADDRESS")


def _check_resources(res: dict, cpus: float, gpus: float, local: bool) -> None:
    """Actors that can never be placed would wait forever: say so (a connected cluster may autoscale)."""
    need = [("GPU", gpus, "--gpus-per-actor / --device cuda"), ("CPU", cpus, "--cpus-per-actor")]
    for what, n, flag in need:
        if n > 0 and res.get(what, 0) < n:
            msg = f"each actor asks for {n:g} {what}s but the Ray cluster has {res.get(what, 0):g}"
            if local:
                raise InputError(flag, msg)
            import sys
            print(f"fdseg: warning: {msg}; the actors wait until the cluster has them", file=sys.stderr)


def segment_ray(seg: FewShotSegmenter, queries: Iterable[str | Path] | QueryList, out: str | Path, *,
                actors: int | None = None, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                batch_size: int = 8, resume: bool = False, progress: bool = True,
                supports: list[tuple[Path, Path]] | None = None, address: str | None = None,
                ray_init: dict | None = None, report_limit: int = 2000, inspector: bytes | None = None) -> RayResult:
    """Segment ``queries`` with a pool of Ray actors; results as :func:`fdseg.segment_folder.segment_folder`.

    seg: a fitted segmenter (shipped once to every actor, as an inspector file's bytes).
    inspector: the bytes of the inspector file ``seg`` was loaded from (shipped as they are).
    queries: files / folders / globs (local, on a filesystem the workers share, or ``s3://``,
        ``gs://``, ... URIs), or a :class:`QueryList`.
    out: output folder or URI. actors: pool size (default: the cluster's CPUs / ``cpus_per_actor``,
        or GPUs / ``gpus_per_actor``). gpus_per_actor > 0 puts the actors on CUDA.
    address: Ray address (``auto``, ``ray://head:10001``, ...); None starts a local Ray unless
        one is running in this process or ``RAY_ADDRESS`` is set. ray_init: extra ``ray.init`` arguments.
    """
    if seg.n_supports == 0:
        raise RuntimeError("fit the segmenter on its supports before segment_ray()")
    if batch_size < 1:
        raise InputError("--batch-size", f"must be >= 1, got {batch_size}")
    ray = import_ray()
    t0 = time.perf_counter()
    ql = queries if isinstance(queries, QueryList) else list_queries(queries)
    names = _unique_names([PurePosixPath(f) for f in ql.files])
    store = OutputStore(out)
    if store.local is not None:
        store.local.mkdir(parents=True, exist_ok=True)
    log = RowLog(store, resume)
    by_read = dict(zip(ql.read_paths, zip(names, ql.files)))
    todo = [p for p, (n, _) in by_read.items() if n not in log.done or log.done[n]["status"] != "ok"]
    started = False
    n_actors = 0
    computed = 0
    bar = None
    try:
        if todo:
            started = _init_ray(ray, address, ray_init)
            res = ray.cluster_resources()
            _check_resources(res, cpus_per_actor, gpus_per_actor, started and _starts_local(address))
            if actors is None:
                have = res.get("GPU", 0) / gpus_per_actor if gpus_per_actor > 0 else res.get("CPU", 1) / cpus_per_actor
                actors = max(1, int(have))
            n_actors = max(1, min(int(actors), math.ceil(len(todo) / batch_size)))
            device = "cuda" if gpus_per_actor > 0 else "cpu"
            renamed = {p: n for p, (n, _) in by_read.items() if n != PurePosixPath(p).stem}
            shipped = ray.put({**ship_payload(seg, inspector), "names": renamed})
            ray.data.DataContext.get_current().enable_progress_bars = False    # ours is the tqdm bar below
            ds = ray.data.read_binary_files(todo, include_paths=True, filesystem=ql.filesystem,
                                            override_num_blocks=max(1, math.ceil(len(todo) / batch_size)),
                                            num_cpus=0, concurrency=n_actors)   # I/O: the CPUs go to the actors
            ds = ds.map_batches(SegmentActor, batch_size=batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=n_actors),
                                fn_constructor_kwargs=dict(shipped=[shipped], store=store.address, device=device,
                                                           threads=max(1, int(cpus_per_actor))),
                                num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(by_read), initial=len(by_read) - len(todo), desc=f"segment (ray, {n_actors} actors)",
                           unit="img", dynamic_ncols=True)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows = []
                for path, js in zip(batch["path"], batch["row"]):
                    name, file = by_read[str(path)]
                    r = json.loads(js)
                    r["query"], r["file"] = name, file
                    if r["status"] != "ok":
                        r["error"] = r["error"].replace(str(path), file, 1)
                    rows.append(r)
                log.append(rows)
                computed += len(rows)
                if bar:
                    bar.update(len(rows))
                    for r in rows:
                        if r["status"] != "ok":
                            bar.write(f"skipped {r['file']}: {r['error']}")
    finally:
        if bar:
            bar.close()
        log.close()
        if started:
            ray.shutdown()
    rows = [log.done[n] for n in names if n in log.done]
    _write_tables(store, rows, seg, supports or [], report_limit)
    return RayResult(rows, store.local if store.local is not None else store.address,  # type: ignore[arg-type]
                     computed=computed, actors=n_actors, seconds=time.perf_counter() - t0)


def _write_tables(store: OutputStore, rows: list[dict], seg: FewShotSegmenter,
                  supports: list[tuple[Path, Path]], report_limit: int) -> None:
    """summary.parquet, summary.csv / .json and report.html (the local engine's writers)."""
    if len(rows) > report_limit:   # a gallery of a million images helps nobody: the most defective
        ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: (-r["defect_fraction"], r["query"]))
        shown = ok[:report_limit] + [r for r in rows if r["status"] != "ok"][:report_limit]
    else:
        shown = rows
    if store.local is not None:
        store.write_bytes("summary.parquet", _parquet_bytes(rows))
        _write_summary(store.local, rows)
        _write_report(store.local, shown, seg, supports)
        return
    with tempfile.TemporaryDirectory(prefix="fdseg-") as tmp:
        _write_summary(Path(tmp), rows)
        _write_report(Path(tmp), shown, seg, supports)
        for p in sorted(Path(tmp).rglob("*")):
            if p.is_file():
                store.write_bytes(p.relative_to(tmp).as_posix(), p.read_bytes())
    store.write_bytes("summary.parquet", _parquet_bytes(rows))
