"""The membrane registry: immutable, content-addressed versions per concept, with aliases and lineage.

    reg = Registry.open("runs/registry")
    v = reg.register("snoopy.safetensors", concept="snoopy", validation=report, lineage={...})
    reg.promote("snoopy:v1", "production")
    membrane = reg.load("snoopy@production")      # re-hashes the blob before using it

A version is ``concept:vN``. Its blob lives in a :class:`BlobStore` under its sha256; the index (SQLite)
maps versions and aliases to hashes. ``latest`` follows the newest version automatically; every other
alias is set by ``promote`` and names one version of a concept at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import valid_name
from ..errors import MembraneFormatError, SPMError
from ..membrane import OFFICIAL_SOURCE, Membrane, load_membrane
from .blobs import BlobStore, sha256_bytes, sha256_file
from .faults import pause_point
from .index import Index, log_event
from .validate import FAILED, PASSED, ValidationReport, check_structure

logger = logging.getLogger(__name__)

LATEST = "latest"
PROTECTED_ALIASES = ("production",)  # need a version that passed validation (or force)
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_VERSION_RE = re.compile(r"^v(\d+)$")


class RegistryError(SPMError):
    """A registry operation was refused or the registry is inconsistent; the message says which and why."""


class IntegrityError(RegistryError):
    """A blob's content no longer matches the hash the registry recorded for it."""

    def __init__(self, concept: str, version: int, expected: str, actual: str, where: str):
        self.concept, self.version, self.expected, self.actual = concept, version, expected, actual
        super().__init__(f"{concept}:v{version}: blob {where} has sha256 {actual}, registry recorded {expected}; "
                         "refusing to use it")

    def __reduce__(self):
        return type(self), (self.concept, self.version, self.expected, self.actual, ""), self.__dict__


@dataclass
class Version:
    """One registered membrane: what it is, where it came from, how it validated."""

    concept: str
    version: int
    sha256: str
    size: int
    created: float
    status: str
    validation: dict[str, Any]
    lineage: dict[str, Any]
    metrics: dict[str, float]
    metadata: dict[str, str]
    aliases: list[str] = field(default_factory=list)
    new: bool = False  # registered by this call (False: the same bytes were already there)

    @property
    def ref(self) -> str:
        return f"{self.concept}:v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "version": self.version, "ref": self.ref, "sha256": self.sha256,
                "size": self.size, "created": self.created, "status": self.status, "aliases": self.aliases,
                "validation": self.validation, "lineage": self.lineage, "metrics": self.metrics,
                "metadata": self.metadata}


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``snoopy`` / ``snoopy:v3`` / ``snoopy:3`` / ``snoopy@production`` -> (concept, version, alias)."""
    if "@" in ref:
        concept, _, alias = ref.rpartition("@")
        if not concept or not alias:
            raise RegistryError(f"bad reference {ref!r}; use CONCEPT, CONCEPT:vN or CONCEPT@ALIAS")
        return concept, None, alias
    if ":" in ref:
        concept, _, tail = ref.rpartition(":")
        m = _VERSION_RE.match(tail) or re.match(r"^(\d+)$", tail)
        if not concept or not m:
            raise RegistryError(f"bad reference {ref!r}; use CONCEPT, CONCEPT:vN or CONCEPT@ALIAS")
        return concept, int(m.group(1)), None
    if not ref:
        raise RegistryError("empty reference")
    return ref, None, LATEST


class Registry:
    INDEX_NAME = "index.sqlite"

    def __init__(self, index: Index, blobs: BlobStore, root: str):
        self.index = index
        self.blobs = blobs
        self.root = root
        self._open_transaction: list[str] | None = None  # blobs this transaction put in place

    @classmethod
    def open(cls, root: str, blobs: str | None = None, create: bool = True) -> "Registry":
        """Open (or create) the registry at ``root`` (a local or shared-filesystem folder: the index is SQLite).

        ``blobs`` is any fsspec URL; it is recorded at creation and must agree afterwards. A blob folder
        inside ``root`` is recorded relative to it, so a copied or moved registry keeps using its own.
        Without ``create`` the registry must exist and is opened without taking the write lock.
        """
        if "://" in str(root):
            raise RegistryError(f"registry root {root} is a URL; the index is SQLite and needs a local or shared "
                                "filesystem folder (blobs may live at a URL: registry.blobs)")
        root = os.path.abspath(os.path.expanduser(str(root)))
        path = os.path.join(root, cls.INDEX_NAME)
        if not create and not os.path.exists(path):
            raise RegistryError(f"no registry at {root} (no {cls.INDEX_NAME}); register a membrane first")
        # a local ``blobs`` is relative to the working directory, like every path in a config
        wanted = str(blobs) if blobs and "://" in str(blobs) else \
            os.path.abspath(os.path.expanduser(str(blobs))) if blobs else os.path.join(root, "blobs")
        try:
            index = Index(path, create=create)
            if create:
                _record_blob_location(index, wanted, root)
            location = _blob_location(index, root) or wanted
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"{path} is not a readable registry index ({exc}); restore it from a backup "
                                "or re-import an exported bundle") from None
        if blobs and wanted != location:
            logger.warning("registry %s keeps its blobs at %s (asked for %s); using %s", root, location, blobs,
                           location)
        return cls(index, BlobStore(location), root)

    def close(self) -> None:
        self.index.close()

    @contextlib.contextmanager
    def transaction(self):
        """Registrations, promotions and image records inside the block take effect together or not at all.

        The index is written in one SQLite transaction; blobs put in place by the block are removed again
        when it fails (no other writer can have referenced them: the write lock is held throughout).
        """
        if self._open_transaction is not None:
            raise RegistryError("a registry transaction is already open")
        placed: list[str] = []
        with self.index.write():
            self._open_transaction = placed
            try:
                yield self
            except BaseException:
                for sha in placed:
                    with contextlib.suppress(FileNotFoundError):
                        self.blobs.delete(sha)
                raise
            finally:
                self._open_transaction = None

    @contextlib.contextmanager
    def _writing(self):
        """The open transaction's connection, or a write transaction of its own."""
        if self._open_transaction is not None:
            yield self.index.conn
        else:
            with self.index.write() as conn:
                yield conn

    def _place_blob(self, staged) -> None:
        """Commit a staged blob, noting it when a transaction that may roll back is open."""
        new = self._open_transaction is not None and not self.blobs.exists(staged.sha256)
        self.blobs.commit(staged)
        if new:
            self._open_transaction.append(staged.sha256)

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------
    def _version(self, row: dict[str, Any] | None) -> Version | None:
        if row is None:
            return None
        aliases = [a["alias"] for a in self.index.aliases(row["concept"]) if a["version"] == row["version"]]
        return Version(aliases=aliases, **row)

    def versions(self, concept: str | None = None) -> list[Version]:
        aliases: dict[tuple[str, int], list[str]] = {}
        for a in self.index.aliases(concept):
            aliases.setdefault((a["concept"], a["version"]), []).append(a["alias"])
        return [Version(aliases=aliases.get((r["concept"], r["version"]), []), **r)
                for r in self.index.versions(concept)]

    def concepts(self) -> list[str]:
        return sorted({v["concept"] for v in self.index.versions()})

    def resolve(self, ref: str) -> Version:
        concept, version, alias = parse_ref(ref)
        if alias is not None:
            version = self.index.alias(concept, alias)
            if version is None:
                known = self.concepts()
                if concept not in known:
                    raise RegistryError(f"no concept {concept!r} in the registry at {self.root}"
                                        + (f" (known: {', '.join(known[:10])})" if known else ""))
                if alias == LATEST:
                    raise RegistryError(f"every version of {concept} failed validation, so it has no '{LATEST}'; "
                                        f"name a version ({concept}:vN) to use a failed one")
                have = ", ".join(a["alias"] for a in self.index.aliases(concept)) or "none"
                raise RegistryError(f"{concept} has no alias {alias!r} (aliases: {have})")
        found = self._version(self.index.version(concept, version))
        if found is None:
            raise RegistryError(f"no version {concept}:v{version} in the registry at {self.root}")
        return found

    def read_verified(self, version: Version) -> bytes:
        """The blob's bytes, after checking they hash to what the index recorded."""
        try:
            data = self.blobs.read(version.sha256)
        except FileNotFoundError:
            raise RegistryError(f"{version.ref}: blob {self.blobs.url_of(version.sha256)} is missing") from None
        actual = sha256_bytes(data)
        if actual != version.sha256:
            raise IntegrityError(version.concept, version.version, version.sha256, actual,
                                 self.blobs.url_of(version.sha256))
        return data

    def load(self, ref: str | Version) -> Membrane:
        """The membrane of ``ref``, verified against its recorded sha256."""
        version = ref if isinstance(ref, Version) else self.resolve(ref)
        with _as_file(self.read_verified(version), f"{version.concept}-v{version.version}") as path:
            try:
                membrane = load_membrane(path)
            except MembraneFormatError as exc:  # the temporary file's name means nothing to the user
                raise MembraneFormatError(str(exc).replace(path, version.ref)) from None
        membrane.extra.setdefault("registry_ref", version.ref)
        return membrane

    def equip(self, pipe, *refs: str, **options):
        """Equip a diffusers pipeline with the membranes ``refs`` name (``"snoopy@production"``, ``"red:v2"``):
        ``reg.equip(pipe, "snoopy@production")``. Facilitated transport on, as ``apply_membranes`` (whose
        keyword ``options`` pass through); returns its handle: ``.remove()``, or use it as a context manager.
        """
        from ..transport import apply_membranes

        if not refs:
            raise RegistryError("equip needs at least one membrane reference, "
                                "e.g. reg.equip(pipe, 'snoopy@production')")
        return apply_membranes(pipe, [self.load(ref) for ref in refs], **options)

    # -- writing --------------------------------------------------------------------------------
    def register(self, source: str | bytes, *, concept: str, validation: ValidationReport | Mapping | None = None,
                 lineage: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
                 aliases: tuple[str, ...] = ()) -> Version:
        """Add the membrane file ``source`` as the next version of ``concept``.

        Idempotent: bytes already registered for ``concept`` return their existing version (``new`` False)
        and nothing is written. Extra ``aliases`` are set on a new version (``production`` only if it passed).
        """
        if not valid_name(concept):
            raise RegistryError(f"bad concept name {concept!r}: letters, digits, _ . - (starting with a letter "
                                "or digit)")
        data = source if isinstance(source, bytes) else _read(source)
        report = validation if isinstance(validation, ValidationReport) else \
            ValidationReport.from_dict(validation) if validation else ValidationReport(
                structural="not_evaluated", reasons=["not validated before registration"])
        metadata = _header_metadata(data)
        sha = sha256_bytes(data)
        existing = self._by_hash(concept, sha)
        if existing is not None:
            self.restore_blob(existing, data)
            return existing
        report = _recheck_structure(data, concept, report)
        staged = self.blobs.stage(data)
        try:
            with self._writing() as conn:
                row = conn.execute("SELECT version FROM versions WHERE concept = ? AND sha256 = ?",
                                   (concept, sha)).fetchone()
                if row is not None:  # registered by another writer since we looked
                    self.blobs.discard(staged)
                    return self.resolve(f"{concept}:v{row['version']}")
                number = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE concept = ?",
                                      (concept,)).fetchone()[0]
                now = time.time()
                status = report.status if report.structural in (PASSED, FAILED) else "not_validated"
                conn.execute(
                    "INSERT INTO versions (concept, version, sha256, size, created, status, validation, lineage, "
                    "metrics, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (concept, number, sha, len(data), now, status, _json(report.to_dict()),
                     _json(dict(lineage or {})), _json({**report.metrics, **dict(metrics or {})}), _json(metadata)))
                if status != FAILED:  # `latest` names the newest version that did not fail validation
                    conn.execute("INSERT INTO aliases (concept, alias, version, updated) VALUES (?, ?, ?, ?) "
                                 "ON CONFLICT (concept, alias) DO UPDATE SET version = excluded.version, "
                                 "updated = excluded.updated, forced = 0", (concept, LATEST, number, now))
                log_event(conn, concept, number, "register", sha256=sha, status=status, reasons=report.reasons)
                for alias in aliases:
                    if is_protected(alias) and status != PASSED:
                        logger.warning("%s:v%d is %s: not setting %r at registration", concept, number, status, alias)
                        continue
                    self._set_alias(conn, concept, number, status, alias, force=False, note="set at registration")
                self._place_blob(staged)  # the blob is in place before the row becomes visible
                pause_point("before-index-commit")
        except BaseException:
            self.blobs.discard(staged)
            raise
        version = self.resolve(f"{concept}:v{number}")
        version.new = True
        log = logger.warning if status == FAILED else logger.info
        log("registered %s (%s, sha256 %s)%s", version.ref, version.status, sha[:12],
            "; `latest` stays where it was" if status == FAILED else "")
        return version

    def blob_problem(self, version: Version) -> str | None:
        """What is wrong with ``version``'s stored blob (missing, or altered), or None when it is intact."""
        url = self.blobs.url_of(version.sha256)
        if not self.blobs.exists(version.sha256):
            return f"{version.ref}: blob {url} is missing"
        actual = self.blobs.hash_of(version.sha256)
        if actual != version.sha256:
            return f"{version.ref}: blob {url} has sha256 {actual}, registry recorded {version.sha256}"
        return None

    def restore_blob(self, version: Version, data: bytes) -> bool:
        """Put ``version``'s bytes back when its stored blob went missing or was altered; True if it did."""
        if sha256_bytes(data) != version.sha256:
            raise RegistryError(f"{version.ref}: the bytes offered to restore its blob have another sha256")
        problem = self.blob_problem(version)
        if problem is None:
            return False
        logger.warning("%s; restoring it from the same bytes", problem)
        self.blobs.commit(self.blobs.stage(data))
        return True

    def find(self, concept: str, sha256: str) -> Version | None:
        """The version of ``concept`` holding exactly these bytes, if any."""
        return self._by_hash(concept, sha256)

    def _by_hash(self, concept: str, sha: str) -> Version | None:
        row = self.index.conn.execute("SELECT version FROM versions WHERE concept = ? AND sha256 = ?",
                                      (concept, sha)).fetchone()
        return None if row is None else self.resolve(f"{concept}:v{row['version']}")

    def promote(self, ref: str, alias: str, *, force: bool = False, reason: str = "") -> Version:
        """Point ``alias`` of the version's concept at it (moving it off any other version).

        ``production`` is refused for a version that did not pass validation unless ``force``; a forced
        promotion is marked on the alias and written to the event log with ``reason``.
        """
        version = self.resolve(ref)
        self.read_verified(version)  # an alias on a missing or altered blob would only fail at use
        with self._writing() as conn:
            self._set_alias(conn, version.concept, version.version, version.status, alias, force, reason)
        logger.info("%s -> %s@%s%s", version.ref, version.concept, alias, " (forced)" if force else "")
        return self.resolve(f"{version.concept}:v{version.version}")

    def _set_alias(self, conn, concept: str, number: int, status: str, alias: str, force: bool, note: str) -> None:
        if alias == LATEST:
            raise RegistryError(f"'{LATEST}' follows the newest version automatically and cannot be set")
        if not valid_alias(alias):
            raise RegistryError(f"bad alias {alias!r}: {ALIAS_RULE}")
        forced = False
        if is_protected(alias) and status != PASSED:
            if not force:
                reasons = "; ".join(self.index.version(concept, number)["validation"].get("reasons", [])) or status
                raise RegistryError(f"refusing to promote {concept}:v{number} to {alias}: validation {status} "
                                    f"({reasons}); pass --force to override (recorded)")
            forced = True
        previous = conn.execute("SELECT version FROM aliases WHERE concept = ? AND alias = ?",
                                (concept, alias)).fetchone()
        conn.execute("INSERT INTO aliases (concept, alias, version, updated, forced) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (concept, alias) DO UPDATE SET version = excluded.version, "
                     "updated = excluded.updated, forced = excluded.forced",
                     (concept, alias, number, time.time(), int(forced)))
        log_event(conn, concept, number, "promote", alias=alias, forced=forced, status=status, note=note,
                  previous=None if previous is None else previous["version"], user=_user())

    def remove_alias(self, concept: str, alias: str) -> None:
        """Take ``alias`` off the concept (recorded in the event log); ``latest`` cannot be removed."""
        if alias == LATEST:
            raise RegistryError(f"'{LATEST}' follows the newest version automatically and cannot be removed")
        with self.index.write() as conn:
            row = conn.execute("SELECT version FROM aliases WHERE concept = ? AND alias = ?",
                               (concept, alias)).fetchone()
            if row is None:
                have = ", ".join(a["alias"] for a in self.index.aliases(concept)) or "none"
                raise RegistryError(f"{concept} has no alias {alias!r} (aliases: {have})")
            conn.execute("DELETE FROM aliases WHERE concept = ? AND alias = ?", (concept, alias))
            log_event(conn, concept, row["version"], "unalias", alias=alias, user=_user())
        logger.info("removed %s@%s (was v%d)", concept, alias, row["version"])

    def record_image(self, ref: str | Version, path: str, prompt: str = "") -> None:
        """Note a before/after image made with this version (shown in its exported model card)."""
        version = ref if isinstance(ref, Version) else self.resolve(ref)
        with self._writing() as conn:
            log_event(conn, version.concept, version.version, "image", path=os.path.abspath(path), prompt=prompt)

    def image_of(self, version: Version) -> str | None:
        """The newest image recorded here for ``version`` that still exists.

        Only images recorded by this registry count: lineage comes with imported bundles and is data,
        never a path to open (a bundle naming ``~/.ssh/id_rsa`` would have it copied into the next export).
        """
        candidates = [e["detail"].get("path") for e in reversed(self.index.events(version.concept))
                      if e["action"] == "image" and e["version"] == version.version]
        return next((c for c in candidates if c and os.path.exists(c)), None)

    # -- maintenance ----------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Re-hash every version's blob and check the index; returns the problems (empty: all sound)."""
        problems = list(self.index.integrity_check())
        versions = self.versions()
        problems += [p for p in map(self.blob_problem, versions) if p]
        by_concept: dict[str, list[Version]] = {}
        for v in versions:
            by_concept.setdefault(v.concept, []).append(v)
        for concept, found in by_concept.items():
            numbers = sorted(v.version for v in found)
            if numbers != list(range(1, len(numbers) + 1)):
                problems.append(f"{concept}: versions are not v1..v{len(numbers)}: {numbers}")
            usable = [v.version for v in found if v.status != FAILED]
            expected = max(usable) if usable else None
            if self.index.alias(concept, LATEST) != expected:
                problems.append(f"{concept}: 'latest' is not " + (f"v{expected}" if expected else
                                                                  "absent (every version failed validation)"))
        return problems

    def gc(self, dry_run: bool = False, temporaries_older_than_s: float = 3600.0) -> list[str]:
        """Remove blobs no version points to (and writers' stale temporary files); returns what went."""
        removed = []
        # under the write lock: no registration is between renaming its blob and committing its row
        # (a dry run only reads, and may list a blob whose registration is about to commit)
        with contextlib.nullcontext() if dry_run else self.index.write():
            referenced = {v.sha256 for v in self.versions()}
            for sha in self.blobs.list():
                if sha not in referenced:
                    removed.append(self.blobs.url_of(sha))
                    if not dry_run:
                        self.blobs.delete(sha)
            for path in self.blobs.stale_temporaries(temporaries_older_than_s):
                removed.append(path)
                if not dry_run:
                    self.blobs.remove_path(path)
        for path in removed:
            logger.info("gc: %s %s", "would remove" if dry_run else "removed", path)
        return removed


ALIAS_RULE = "letters, digits, _ . - (and not of the form vN)"


def valid_alias(alias: str) -> bool:
    """Whether ``alias`` is a name an alias may have (``latest`` aside, which only the registry moves)."""
    return bool(_ALIAS_RE.match(alias)) and not _VERSION_RE.match(alias)


def is_protected(alias: str) -> bool:
    """Whether ``alias`` needs a version that passed validation (in any letter case)."""
    return alias.lower() in PROTECTED_ALIASES


@contextlib.contextmanager
def _as_file(data: bytes, stem: str = "membrane"):
    """``data`` as a temporary ``.safetensors`` file, for readers that take a path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{stem}.safetensors")
        with open(path, "wb") as fh:
            fh.write(data)
        yield path


# Where the blobs are: ``blobs_in_root`` (a path relative to the registry folder, so a copied or moved
# registry uses its own), or ``blobs`` (a URL or an absolute path; registries made before
# ``blobs_in_root`` existed may also hold a path relative to the working directory there).
_IN_ROOT, _ELSEWHERE = "blobs_in_root", "blobs"


def _record_blob_location(index: Index, location: str, root: str) -> None:
    """Record the blob location of a new registry (one transaction: concurrent creators agree)."""
    inside = None
    if "://" not in location:
        rel = os.path.relpath(location, root)
        inside = rel if rel != ".." and not rel.startswith(".." + os.sep) else None
    with index.write() as conn:
        known = conn.execute("SELECT 1 FROM meta WHERE key IN (?, ?)", (_IN_ROOT, _ELSEWHERE)).fetchone()
        if known is None:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)",
                         (_IN_ROOT, inside) if inside is not None else (_ELSEWHERE, location))


def _blob_location(index: Index, root: str) -> str | None:
    inside = index.get_meta(_IN_ROOT)
    if inside is not None:
        return os.path.normpath(os.path.join(root, inside))
    return index.get_meta(_ELSEWHERE)


def _recheck_structure(data: bytes, concept: str, report: ValidationReport) -> ValidationReport:
    """Load the bytes as a membrane whatever the report claims: a file that does not load, or loads with
    problems, is recorded as structurally failed; a membrane of another concept is refused."""
    with _as_file(data) as path:
        membrane, problems = check_structure(path)
    official = membrane is not None and membrane.extra.get("source_format") == OFFICIAL_SOURCE
    if membrane is not None and membrane.name != concept and not official:  # official files carry no name
        raise RegistryError(f"the file is membrane {membrane.name!r} (erasing {', '.join(membrane.concepts) or '?'}); "
                            f"refusing to register it as {concept!r}")
    if not problems or report.structural == FAILED:
        return report
    problems = [p.replace(path, "the file") for p in problems]  # a temporary name means nothing to the reader
    return dataclasses.replace(report, structural=FAILED,
                               reasons=[*report.reasons, *(f"at registration: {p}" for p in problems)])


def _read(url: str) -> bytes:
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    with fs.open(path, "rb") as fh:
        return fh.read()


def _header_metadata(data: bytes) -> dict[str, str]:
    """The JSON metadata of a safetensors file's header ({} if there is none or it is unreadable)."""
    import json
    import struct

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        return dict(header.get("__metadata__", {}))
    except Exception:
        return {}


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return os.environ.get("USER", "")


def copy_verified(registry: Registry, version: Version, dest: str) -> str:
    """Write ``version``'s blob to ``dest`` after verifying its hash."""
    data = registry.read_verified(version)
    with open(dest, "wb") as fh:
        fh.write(data)
    return dest


__all__ = ["Registry", "RegistryError", "IntegrityError", "Version", "parse_ref", "LATEST", "copy_verified",
           "sha256_file"]
