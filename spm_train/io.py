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
