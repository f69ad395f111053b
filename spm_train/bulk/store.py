"""The result store: trained membranes keyed by (concept, trainer, base model), and pack checkpoints.

Layout under ``root`` (a local folder or any fsspec URL reachable from every node)::

    results/<key>/membrane.safetensors   written first
    results/<key>/result.json            written last: its presence means the result is complete
    checkpoints/<job_id>/checkpoint.safetensors
    claims/<key>.json                    while a run trains <key>: who, and until when (a lease)

Every file is written to a temporary name and renamed, so a killed worker leaves no partial result.
result.json names its membrane relative to ``root`` (and records its sha256), so a store folder can be
copied or moved whole; a result whose membrane file has gone, or no longer has its recorded bytes, is
not a result (``has`` says no, the concept trains again). This is the hand-off point to the registry
stage, which reads results from here.

Two runs of the same concepts at once would train them twice: a run claims each result before
training it (``claim``), and a second run waits for the first run's results instead. A claim is a
lease renewed while its run lives; a crashed run's claim lapses (at once when its process is known
dead on this host), and the next run takes the work over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import fsspec

from .. import io
from ..errors import MembraneFormatError
from ..membrane import Membrane, load_membrane

logger = logging.getLogger(__name__)

CLAIM_LEASE_S = 120.0  # a claim not renewed for this long has lapsed


@dataclass
class ConceptResult:
    """What a bulk run knows about one (concept, sweep point)."""

    concept: str
    key: str
    point: dict[str, Any]
    point_id: str
    status: str  # "trained", "cached", "failed"
    membrane: str | None = None
    loss: float | None = None
    erase: float | None = None
    anchor: float | None = None
    seconds: float = 0.0  # wall time of the pack that trained it
    pack_concepts: int = 1  # how many concepts shared that pack (and its time)
    started: float = 0.0  # unix time the pack's task started / finished on its worker
    finished: float = 0.0
    job_id: str = ""
    resumed_from: int = 0
    node: str = ""
    error: str | None = None
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def cost_seconds(self) -> float:
        """This concept's share of its pack's time: the pack's seconds over the concepts it trained."""
        return self.seconds / max(1, self.pack_concepts)

    def to_dict(self, with_history: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_history:
            data.pop("history")
        return data


class ResultStore:
    """Trained membranes and pack checkpoints under ``root``, a local folder or an fsspec URL.

    A local ``root`` is made absolute here: the store is handed to Ray workers as its root, and a
    relative one would name a folder under each worker's own working directory.
    """

    poll_s = 2.0  # how often a run waiting for another run's claim looks again

    def __init__(self, root: str | os.PathLike, lease_s: float = CLAIM_LEASE_S):
        root = os.fspath(root)
        self.root = os.path.abspath(os.path.expanduser(root)) if "://" not in root else root.rstrip("/")
        self.fs, self._path = fsspec.core.url_to_fs(self.root)
        self.lease_s = float(lease_s)

    def _url(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def membrane_url(self, key: str) -> str:
        return self._url(*_membrane_parts(key))

    def checkpoint_dir(self, job_id: str) -> str:
        return self._url("checkpoints", job_id)

    def has(self, key: str) -> bool:
        """Whether ``key`` has a complete result: its result.json and the membrane file it names."""
        return self.lookup(key) is not None

    def lookup(self, key: str) -> ConceptResult | None:
        """The complete result of ``key`` (as ``get``), or None when there is none; one read of result.json.

        A result whose membrane no longer has its recorded bytes (or, in older stores, no longer loads)
        is reported and counts as absent, so the concept trains again.
        """
        if not io.exists(self._url("results", key, "result.json")):
            return None
        data = self._read(key)
        found = self._membrane_location(key, data.get("membrane"))
        if found is None:
            return None
        problem = self._membrane_problem(found, data.get("sha256"))
        if problem:
            logger.warning("result %s in %s: %s; it is trained again", key, self.root, problem)
            return None
        data.pop("sha256", None)
        return ConceptResult(**dict(data, membrane=found))

    def get(self, key: str) -> ConceptResult:
        """The stored result of ``key``, its ``membrane`` resolved to where the file is now."""
        result = self.lookup(key)
        if result is None:
            data = self._read(key)  # no result.json at all raises FileNotFoundError here
            expected = self._resolve(data.get("membrane") or self.membrane_url(key))
            raise FileNotFoundError(f"result {key} in {self.root}: its membrane file {expected} is missing "
                                    "or damaged")
        return result

    def put(self, result: ConceptResult, membrane: Membrane) -> ConceptResult:
        """Store ``membrane`` and then ``result`` (which gets the membrane's URL); returns ``result``."""
        data = membrane.to_bytes()
        result.membrane = self.membrane_url(result.key)
        with io.atomic_output(result.membrane) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
        record = dict(result.to_dict(), membrane="/".join(_membrane_parts(result.key)),
                      sha256=hashlib.sha256(data).hexdigest())
        with io.atomic_output(self._url("results", result.key, "result.json")) as tmp:
            with open(tmp, "w") as fh:
                json.dump(record, fh, indent=1, sort_keys=True)
        return result

    def _membrane_problem(self, url: str, sha256: str | None) -> str | None:
        """Why the stored membrane at ``url`` cannot be used (None when it can)."""
        if sha256:
            h = hashlib.sha256()
            with self.fs.open(self.fs._strip_protocol(url), "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            actual = h.hexdigest()
            return None if actual == sha256 else f"its membrane {url} has sha256 {actual}, stored {sha256}"
        try:  # written before result.json recorded hashes: the file must at least load
            load_membrane(url)
        except MembraneFormatError as exc:
            return f"its membrane no longer loads ({exc})"
        return None

    # -- claims: one run trains a result at a time ---------------------------------------------
    @contextlib.contextmanager
    def claim(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold the claims on the ``keys`` that have no result yet, waiting while another run holds any.

        Inside the block the caller trains what ``lookup`` still lacks: results another run stored
        while this one waited are there to reuse. The claims are renewed in the background and
        released on exit; all or none are held at a time, so two runs never wait for each other.
        """
        owner = _Owner.new()
        waited = False
        while True:
            todo = sorted(k for k in keys if self.lookup(k) is None)
            if not todo:
                yield
                return
            held, other = self._claim_all(todo, owner)
            if other is None:
                break
            if not waited:
                logger.info("%d result(s) are being trained by another run (%s); waiting for them",
                            len(todo), other)
                waited = True
            time.sleep(self.poll_s)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(held, owner, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            for key in held:
                self._release(key, owner)

    def _claim_url(self, key: str) -> str:
        return self._url("claims", f"{key}.json")

    def _claim_all(self, keys: list[str], owner: "_Owner") -> tuple[list[str], str | None]:
        """Claim every key, or none: (claimed keys, None), or ([], who holds one of them)."""
        held: list[str] = []
        for key in keys:
            other = self._claim_one(key, owner)
            if other is not None:
                for k in held:
                    self._release(k, owner)
                return [], other
            held.append(key)
        return held, None

    def _claim_one(self, key: str, owner: "_Owner") -> str | None:
        """Take the claim on ``key`` (taking over a lapsed one); None on success, else who holds it."""
        url = self._claim_url(key)
        for _ in range(3):
            if self._create(url, owner.record(self.lease_s)):
                return None
            current = self._read_claim(url)
            if current is None:  # released meanwhile
                continue
            if current.get("owner") == owner.id:
                return None
            if not _lapsed(current):
                return current.get("owner", "?")
            logger.warning("the claim of %s on %s has lapsed; taking the work over", current.get("owner"), key)
            self._remove_if(url, current)
        return "another run (the claim keeps changing hands)"

    def _create(self, url: str, record: dict) -> bool:
        """Write ``record`` at ``url`` unless a claim is there: a complete file appears, or nothing."""
        payload = json.dumps(record, sort_keys=True).encode()
        if not io._is_local(self.fs):  # no exclusive create on object stores: check, then write
            path = self.fs._strip_protocol(url)
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, payload)
            return True
        os.makedirs(os.path.dirname(url), exist_ok=True)
        tmp = f"{url}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(payload)
        try:
            os.link(tmp, url)  # fails when the name exists: exclusive, and never half-written
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _read_claim(self, url: str) -> dict | None:
        try:
            with self.fs.open(self.fs._strip_protocol(url), "rb") as fh:
                data = json.loads(fh.read() or b"{}")
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: it lapses a lease after it was written
            data = {}
        if not isinstance(data, dict) or "expires" not in data:
            try:
                modified = self.fs.modified(self.fs._strip_protocol(url)).timestamp()
            except (FileNotFoundError, NotImplementedError, OSError):
                return None
            data = {"owner": "an unreadable claim", "expires": modified + self.lease_s}
        return data

    def _remove_if(self, url: str, expected: dict) -> None:
        """Remove the claim at ``url`` if it is still ``expected`` (a takeover must not remove a fresh one)."""
        if not io._is_local(self.fs):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.fs._strip_protocol(url))
            return
        aside = f"{url}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(url, aside)
        except FileNotFoundError:
            return
        moved = self._read_claim(aside)
        if moved is not None and moved.get("owner") != expected.get("owner"):
            with contextlib.suppress(FileExistsError):  # not the lapsed claim: put it back
                os.link(aside, url)
        os.remove(aside)

    def _renew(self, keys: list[str], owner: "_Owner", stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 4):
            for key in keys:
                url = self._claim_url(key)
                current = self._read_claim(url)
                if current is None or current.get("owner") != owner.id:
                    logger.warning("lost the claim on %s (now %s)", key, (current or {}).get("owner", "nobody"))
                    continue
                with io.atomic_output(url) as tmp:
                    with open(tmp, "w") as fh:
                        json.dump(owner.record(self.lease_s), fh, sort_keys=True)

    def _release(self, key: str, owner: "_Owner") -> None:
        url = self._claim_url(key)
        current = self._read_claim(url)
        if current is not None and current.get("owner") == owner.id:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.fs._strip_protocol(url))

    def drop_checkpoint(self, job_id: str) -> None:
        path = self.fs._strip_protocol(self.checkpoint_dir(job_id))
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:  # another worker of the same pack removed it first
            pass

    def _read(self, key: str) -> dict[str, Any]:
        with self.fs.open(self.fs._strip_protocol(self._url("results", key, "result.json")), "r") as fh:
            return json.load(fh)

    def _resolve(self, location: str) -> str:
        """A membrane location as recorded: relative to the root, or (older stores) absolute or a URL."""
        if "://" in location or os.path.isabs(location):
            return location
        return self._url(location)

    def _membrane_location(self, key: str, recorded: str | None) -> str | None:
        """Where the membrane of ``key`` is: as recorded, else at its place in this store; None if gone.

        Older stores recorded the path the membrane was written to; once such a store is moved, that
        path is stale while the file is still at its place under the new root.
        """
        candidates = [self._resolve(recorded)] if recorded else []
        candidates.append(self.membrane_url(key))
        for url in dict.fromkeys(candidates):
            if io.exists(url):
                return url
        return None


@dataclass(frozen=True)
class _Owner:
    """Who holds a claim: a unique id, and the host and process, to tell a dead holder on this host."""

    id: str
    host: str
    pid: int

    @classmethod
    def new(cls) -> "_Owner":
        host, pid = socket.gethostname(), os.getpid()
        return cls(f"{host}:{pid}:{uuid.uuid4().hex[:8]}", host, pid)

    def record(self, lease_s: float) -> dict[str, Any]:
        return {"owner": self.id, "host": self.host, "pid": self.pid, "expires": time.time() + lease_s}


def _lapsed(claim: dict[str, Any]) -> bool:
    """A claim lapses when its lease ran out, or at once when its process is gone from this host."""
    if float(claim.get("expires", 0)) < time.time():
        return True
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
    return False


def _membrane_parts(key: str) -> tuple[str, ...]:
    return ("results", key, "membrane.safetensors")


def write_json(url: str, payload: Any) -> str:
    with io.atomic_output(url) as tmp:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True, default=str)
    return url
