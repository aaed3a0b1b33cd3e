"""Where a sweep keeps what must outlive a node: the ``storage`` setting, and corpora read from it.

A *location* is a path (that every node mounts, for a cluster) or a URI of a filesystem that
pyarrow knows (``pyarrow.fs.FileSystem.from_uri``, as Ray's ``RunConfig(storage_path=...)``
takes it): ``s3://bucket/prefix`` with S3's query options (``?region=eu-west-1``; an
S3-compatible store: ``?endpoint_override=HOST:PORT&scheme=http``), ``gs://bucket/prefix``,
``abfs://container@account.dfs.core.windows.net/prefix``, ``hdfs://HOST:PORT/prefix``,
``file:///abs/path``. ``location_problem`` checks one when the sweep file is read (the scheme,
the bucket, S3's and GCS's query options, with no network call), so that a mistake names its
field at once, not inside Ray.

Credentials are never part of a URI (refused): the URI is logged, and written by Ray Tune with
its experiment. pyarrow takes them from each process's environment: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an instance role, ...) for
S3, ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS: on a cluster, the environment that ``ray start``
ran in on every node, and the driver's own.

``child`` appends path parts to a location (before a URI's query), ``resolve`` gives the
filesystem and path to hand to Ray and pyarrow (no filesystem for a local path: Ray's own).

Corpora (``local_corpus``): a ``corpus_dir`` that is a URI is copied once per node into a local
cache, ``HYPERLAW_CACHE_DIR`` (default: the user's cache directory, e.g.
``~/.cache/hyperlaw``) ``/corpora/<SHA-256 of the URI>``, and read from there (memory-mapped).
The copy is made under an exclusive lock file, into a temporary folder renamed into place, so
that the workers of a node that start together copy it once and never read half of it. The
cached copy is used while its ``meta.json`` (with the tokens' fingerprint) is the one at the URI
(one small read per run): a corpus rebuilt at the same URI is copied again.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from trainer.data import CorpusError

CACHE_ENV = "HYPERLAW_CACHE_DIR"
SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a path."""
    return _URI.match(location) is not None


def location_problem(location: str) -> str | None:
    """What is wrong with ``location`` as a path or URI (module docstring), or None."""
    if not location.strip():
        return "must be a path or a URI such as s3://bucket/prefix (got an empty string)"
    match = _URI.match(location)
    if match is None:
        return None  # a path: made absolute where it is used
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        return (
            f"has an unknown scheme {scheme!r} ({location!r}): give a path, or a URI with one "
            f"of {', '.join(s + '://' for s in SCHEMES)}"
        )
    parts = urlsplit(location)
    if parts.password is not None or (scheme in ("s3", "gs", "gcs") and parts.username):
        return (
            "must not hold credentials (the URI is logged and written with the experiment): "
            "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or GOOGLE_APPLICATION_CREDENTIALS) "
            "in the environment of the driver and of `ray start` on every node"
        )
    if scheme != "file" and not parts.netloc:
        return f"names no bucket or host ({location!r}): {scheme}://BUCKET/PREFIX"
    if scheme not in ("file", "s3", "gs", "gcs"):
        return None  # Azure and HDFS need their libraries to parse: checked when used
    import pyarrow.fs

    probe = location
    if scheme == "s3" and "region" not in dict(parse_qsl(parts.query)):
        # without a region pyarrow asks AWS where the bucket lives: a network call
        probe += ("&" if parts.query else "?") + "region=us-east-1"
    try:
        pyarrow.fs.FileSystem.from_uri(probe)
    except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
        return f"is not a URI that pyarrow can open ({location!r}): {exc}"
    return None


def child(location: str, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path (before a URI's query)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    head, sep, query = location.partition("?")
    return posixpath.join(head, *parts) + sep + query


def resolve(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a URI; (None, absolute path) of a path."""
    if not is_uri(location):
        return None, str(Path(location).resolve())
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    return fs, path


def filesystem(location: str) -> tuple[Any, str]:
    """Like ``resolve``, with pyarrow's local filesystem for a path."""
    fs, path = resolve(location)
    if fs is None:
        import pyarrow.fs

        fs = pyarrow.fs.LocalFileSystem()
    return fs, path


def delete(location: str) -> None:
    """Remove the directory at ``location`` and all below it; nothing if it is not there."""
    import pyarrow.fs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


def basename(location: str) -> str:
    """The last part of the location's path (a URI's query left out)."""
    path = urlsplit(location).path if is_uri(location) else location
    return posixpath.basename(path.rstrip("/")) or path


def read_json(location: str) -> dict[str, Any] | None:
    """The JSON document at ``location``, or None when there is none."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())
    except FileNotFoundError:
        return None


def corpus_meta(corpus_dir: str) -> dict[str, Any]:
    """The ``meta.json`` of a corpus at a path or URI ({} where there is none)."""
    return read_json(child(corpus_dir, "meta.json")) or {}


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    import platformdirs

    return Path(platformdirs.user_cache_dir("hyperlaw", appauthor=False))


def local_corpus(corpus_dir: str) -> Path:
    """A local folder holding the corpus at ``corpus_dir``: the path itself, or for a URI the
    node's cached copy, copied first if missing or stale (module docstring)."""
    if not is_uri(corpus_dir):
        return Path(corpus_dir)
    import fcntl

    import pyarrow.fs

    remote = corpus_meta(corpus_dir)
    if not remote:
        raise CorpusError(f"{corpus_dir} has no meta.json; build it with `hyperlaw corpus build`")
    root = cache_root() / "corpora"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(corpus_dir.encode()).hexdigest()[:24]
    target = root / key
    if _local_meta(target) == remote:
        return target
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _local_meta(target) == remote:
            return target  # another worker of this node copied it meanwhile
        fs, path = resolve(corpus_dir)
        partial = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            pyarrow.fs.copy_files(
                path,
                str(partial),
                source_filesystem=fs,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )
            if target.exists():  # stale: a run that memory-maps it keeps its files
                target.rename(Path(tempfile.mkdtemp(prefix=f".{key}-old-", dir=root)) / "old")
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            for old in root.glob(f".{key}-old-*"):
                shutil.rmtree(old, ignore_errors=True)
    return target


def _local_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
