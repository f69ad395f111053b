"""Content-addressed blob store on any fsspec URL: ``<root>/<sha[:2]>/<sha>.safetensors``.

A blob is written under a hidden temporary name (``.<sha>.<uuid>.tmp``) and renamed into place,
so a reader sees a complete blob or none. Names are their content's sha256, so a blob never changes:
writing the same bytes twice leaves one blob.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass

import fsspec

from .. import io
from .faults import pause_point

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(str(url))
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StagedBlob:
    """Bytes written under a temporary name, not yet visible under their content address."""

    sha256: str
    size: int
    tmp_path: str
    final_path: str


class BlobStore:
    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = io._is_local(self.fs)

    # -- addresses ----------------------------------------------------------------------------
    def _path(self, sha: str) -> str:
        return f"{self.root}/{sha[:2]}/{sha}{SUFFIX}"

    def url_of(self, sha: str) -> str:
        return f"{self.url}/{sha[:2]}/{sha}{SUFFIX}"

    def exists(self, sha: str) -> bool:
        return self.fs.exists(self._path(sha))

    # -- writing: stage, then commit (rename) or discard ------------------------------------------
    def stage(self, data: bytes) -> StagedBlob:
        sha = sha256_bytes(data)
        final = self._path(sha)
        directory = final.rsplit("/", 1)[0]
        self.fs.makedirs(directory, exist_ok=True)
        tmp = f"{directory}/.{sha}.{uuid.uuid4().hex}.tmp"
        if self.local:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
        pause_point("blob-staged")
        return StagedBlob(sha, len(data), tmp, final)

    def commit(self, staged: StagedBlob) -> None:
        """Move a staged blob to its content address (a no-op when that blob already exists intact; an
        altered blob at that address is replaced by the staged bytes, which hash to it)."""
        if self.fs.exists(staged.final_path):
            if self.hash_of(staged.sha256) == staged.sha256:
                self.discard(staged)
                return
            logger.warning("blob %s was altered; restoring it from the bytes being registered", staged.final_path)
        if self.local:
            os.replace(staged.tmp_path, staged.final_path)
        else:
            self.fs.mv(staged.tmp_path, staged.final_path)

    def discard(self, staged: StagedBlob) -> None:
        try:
            self.fs.rm(staged.tmp_path)
        except FileNotFoundError:
            pass

    # -- reading --------------------------------------------------------------------------------
    def read(self, sha: str) -> bytes:
        with self.fs.open(self._path(sha), "rb") as fh:
            return fh.read()

    def hash_of(self, sha: str) -> str:
        """The sha256 of what is stored at ``sha``'s address now (differs from ``sha`` if altered)."""
        return sha256_file(self.url_of(sha))

    def delete(self, sha: str) -> None:
        self.fs.rm(self._path(sha))

    def list(self) -> list[str]:
        """Every committed blob's sha256 (temporary files are not blobs)."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in self.fs.find(self.root):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(SUFFIX) and not name.startswith("."):
                found.append(name[: -len(SUFFIX)])
        return sorted(found)

    def stale_temporaries(self, older_than_s: float = 3600.0) -> list[str]:
        """Temporary files left by killed writers, older than ``older_than_s``."""
        if not self.fs.exists(self.root):
            return []
        now, stale = time.time(), []
        for path in self.fs.find(self.root):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(".") and name.endswith(".tmp"):
                try:
                    mtime = self.fs.modified(path).timestamp()
                except (NotImplementedError, AttributeError, OSError):
                    mtime = 0.0
                if now - mtime >= older_than_s:
                    stale.append(path)
        return stale

    def remove_path(self, path: str) -> None:
        self.fs.rm(path)
