"""The result store: trained membranes keyed by (concept, trainer, base model), and pack checkpoints.

Layout under ``root`` (a local folder or any fsspec URL reachable from every node)::

    results/<key>/membrane.safetensors   written first
    results/<key>/result.json            written last: its presence means the result is complete
    checkpoints/<job_id>/checkpoint.safetensors

Every file is written to a temporary name and renamed, so a killed worker leaves no partial result.
result.json names its membrane relative to ``root``, so a store folder can be copied or moved whole;
a result whose membrane file has gone is not a result (``has`` says no, the concept trains again).
This is the hand-off point to the registry stage, which reads results from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from .. import io
from ..membrane import Membrane


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

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        self.root = os.path.abspath(os.path.expanduser(root)) if "://" not in root else root.rstrip("/")
        self.fs, self._path = fsspec.core.url_to_fs(self.root)

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
        """The complete result of ``key`` (as ``get``), or None when there is none; one read of result.json."""
        if not io.exists(self._url("results", key, "result.json")):
            return None
        data = self._read(key)
        found = self._membrane_location(key, data.get("membrane"))
        return None if found is None else ConceptResult(**dict(data, membrane=found))

    def get(self, key: str) -> ConceptResult:
        """The stored result of ``key``, its ``membrane`` resolved to where the file is now."""
        result = self.lookup(key)
        if result is None:
            data = self._read(key)  # no result.json at all raises FileNotFoundError here
            expected = self._resolve(data.get("membrane") or self.membrane_url(key))
            raise FileNotFoundError(f"result {key} in {self.root}: its membrane file {expected} is missing")
        return result

    def put(self, result: ConceptResult, membrane: Membrane) -> ConceptResult:
        """Store ``membrane`` and then ``result`` (which gets the membrane's URL); returns ``result``."""
        result.membrane = membrane.save(self.membrane_url(result.key))
        record = dict(result.to_dict(), membrane="/".join(_membrane_parts(result.key)))
        with io.atomic_output(self._url("results", result.key, "result.json")) as tmp:
            with open(tmp, "w") as fh:
                json.dump(record, fh, indent=1, sort_keys=True)
        return result

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


def _membrane_parts(key: str) -> tuple[str, ...]:
    return ("results", key, "membrane.safetensors")


def write_json(url: str, payload: Any) -> str:
    with io.atomic_output(url) as tmp:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True, default=str)
    return url
