"""Atomic file output on any fsspec URL: write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

import fsspec


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@contextlib.contextmanager
def atomic_output(url: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary local path; on success it replaces ``url`` in one rename.

    Readers never see a half-written file: on error the temporary file is removed and
    ``url`` keeps its previous content (or stays absent). For remote fsspec URLs the file
    is uploaded to a temporary key and moved into place.
    """
    url = os.fspath(url)
    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        directory = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            # some writers (safetensors) create 0600 files: a team's shared store must follow the umask
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        tmp = os.path.join(workdir, os.path.basename(path))
        yield tmp
        remote_tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.put_file(tmp, remote_tmp)
        try:
            fs.mv(remote_tmp, path)
        finally:
            if fs.exists(remote_tmp):
                fs.rm(remote_tmp)


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# this package's extra (pyproject's optional-dependencies) that installs each object store's filesystem
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def filesystem_problem(url: str | os.PathLike) -> str | None:
    """Why fsspec cannot open the filesystem of ``url`` here, or None when it can (or ``url`` is local).

    Checks that every protocol of the URL (``s3://``, ``simplecache::gs://``) is one fsspec knows and that
    the package implementing it imports, without connecting anywhere: a missing ``s3fs`` is found when a
    config is validated, not when the first result is written after the model has loaded.
    """
    for part in os.fspath(url).split("::"):
        protocol, _ = fsspec.core.split_protocol(part)
        if protocol in (None, "file", "local"):
            continue
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            return f"fsspec knows no filesystem for {protocol}:// URLs"
        except ImportError as exc:
            extra = _EXTRAS.get(protocol)
            how = f"pip install 'spm-train[{extra}]'" if extra else f"{exc}"
            return f"the {protocol}:// filesystem is not installed here: {how}"
    return None


def folder_problem(url: str | os.PathLike) -> str | None:
    """Why files cannot be written under the folder ``url`` (a path or fsspec URL), or None when they can.

    Tried for real, leaving nothing behind: a probe file is written and removed in the folder, or (when
    it does not exist yet) in its nearest existing parent (permission bits alone mislead, e.g. for root
    or on a read-only mount).
    """
    url = os.fspath(url)
    if (problem := filesystem_problem(url)) is not None:
        return problem
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as exc:
        return f"cannot open it ({exc})"
    if _is_local(fs):
        path = os.path.abspath(os.path.expanduser(path))
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            where = "it is a file" if parent == path else f"it lies under {parent}, which is a file"
            return f"cannot create or write this folder ({where})"
        path = parent
    probe = f"{path.rstrip('/')}/.spm-write-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - each filesystem raises its own types
        reason = getattr(exc, "strerror", None) or exc
        return f"cannot create or write this folder ({reason})"
    return None


def exists(url: str | os.PathLike) -> bool:
    fs, path = fsspec.core.url_to_fs(os.fspath(url))
    return fs.exists(path)


@contextlib.contextmanager
def local_copy(url: str | os.PathLike) -> Iterator[str]:
    """Yield a local path holding the content of ``url`` (the file itself when local)."""
    url = os.fspath(url)
    fs, path = fsspec.core.url_to_fs(url)
    if _is_local(fs):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        tmp = os.path.join(workdir, os.path.basename(path))
        fs.get_file(path, tmp)
        yield tmp
