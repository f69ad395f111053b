"""The result store: trained membranes keyed by (concept, trainer, base model), and pack checkpoints.

Layout under ``root`` (a local folder or any fsspec URL reachable from every node)::

    results/<key>/membrane.safetensors   written first
    results/<key>/result.json            written last: its presence means the result is complete
    checkpoints/<job_id>/checkpoint.safetensors

Every file is written to a temporary name and renamed, so a killed worker leaves no partial result.
This is the hand-off point to the registry stage, which reads results from here.
"""

from __future__ import annotations

import json
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
    seconds: float = 0.0
    started: float = 0.0  # unix time the pack's task started / finished on its worker
    finished: float = 0.0
    job_id: str = ""
    resumed_from: int = 0
    node: str = ""
    error: str | None = None
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self, with_history: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_history:
            data.pop("history")
        return data


class ResultStore:
    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.fs, self._path = fsspec.core.url_to_fs(self.root)

    def _url(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def membrane_url(self, key: str) -> str:
        return self._url("results", key, "membrane.safetensors")

    def checkpoint_dir(self, job_id: str) -> str:
        return self._url("checkpoints", job_id)

    def has(self, key: str) -> bool:
        return io.exists(self._url("results", key, "result.json"))

    def get(self, key: str) -> ConceptResult:
        with self.fs.open(self.fs._strip_protocol(self._url("results", key, "result.json")), "r") as fh:
            return ConceptResult(**json.load(fh))

    def put(self, result: ConceptResult, membrane: Membrane) -> ConceptResult:
        result.membrane = membrane.save(self.membrane_url(result.key))
        with io.atomic_output(self._url("results", result.key, "result.json")) as tmp:
            with open(tmp, "w") as fh:
                json.dump(result.to_dict(), fh, indent=1, sort_keys=True)
        return result

    def drop_checkpoint(self, job_id: str) -> None:
        path = self.fs._strip_protocol(self.checkpoint_dir(job_id))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def write_json(url: str, payload: Any) -> str:
    with io.atomic_output(url) as tmp:
        with open(tmp, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True, default=str)
    return url
