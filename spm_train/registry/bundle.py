"""Export registry versions as a self-contained bundle, import one back, and write model cards.

Bundle layout::

    manifest.json                     format, versions with hashes, metrics, validation, lineage, aliases
    <concept>/v<N>/membrane.safetensors
    <concept>/v<N>/README.md          a Hugging Face style model card (YAML front matter)
    <concept>/v<N>/grid.png           the before/after grid, when the version records one
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterable

from ..io import atomic_output, current_umask
from .blobs import sha256_file
from .core import LATEST, Registry, RegistryError, Version, copy_verified, is_protected
from .validate import NOT_EVALUATED, ValidationReport

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "spm-membrane-bundle"
BUNDLE_VERSION = 1
IMAGE_NAME = "grid.png"


# lineage entries that name folders of the machine that trained the membrane: not for a published card
_LOCAL_LINEAGE = ("run_dir", "source_file")
LIMITATIONS = [
    "Loaded as a plain LoRA (diffusers' `load_lora_weights`, A1111, ComfyUI) the membrane acts at full "
    "strength on every prompt: facilitated transport, which opens it only as far as a prompt is close to "
    "the erased concept, is lost, so unrelated prompts change more. Equip it with `spm_train.apply_membranes` "
    "to keep transport.",
    "Erasure is measured on this version's probe prompts (see Validation and Lineage); rephrasings, "
    "other languages and adversarial prompts can still bring the concept back (published attacks recover "
    "SPM-erased concepts in a large share of prompts). It is not a safety guarantee.",
    "It plugs into models of the family and layer layout it was trained on (`family`, `layout` in its "
    "header); other architectures load nothing or fail.",
    "Several membranes equipped together compose exactly, but each one's cost to other prompts adds up.",
]


def base_model_of(lineage: dict[str, Any], family: str) -> tuple[str, str | None]:
    """The base model's name for a card, and its Hub id when it has one (the metadata's ``base_model``).

    A local folder is named by its last component: the card is published, the path is not.
    """
    hub_id = lineage.get("base_model_id")
    source = str(lineage.get("base_model") or "")
    if hub_id:
        return hub_id, hub_id
    if source.startswith("toyworld"):
        return f"ToyWorld {'variant' if 'variant' in source else 'base'} (shipped with spm-train)", None
    if source.startswith(("/", ".", "~")) or "://" in source or "\\" in source:
        return os.path.basename(source.rstrip("/\\")) or family, None
    return source or family, None


def model_card(version: Version, image: str | None = None) -> str:
    """A model card for one version (``huggingface_hub.ModelCard``): metadata the Hub reads (library,
    base model, license, tags), then what it erases, how it validated, its limitations, where it came
    from and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    meta, lineage, validation = version.metadata, version.lineage, version.validation
    concepts = _json_list(meta.get("concepts"))
    family = meta.get("family", "unknown")
    base_name, base_id = base_model_of(lineage, family)
    license_id = lineage.get("base_license")
    data = ModelCardData(
        library_name="diffusers", base_model=base_id, pipeline_tag="text-to-image",
        # a membrane is derived from its base model, so the base's license governs it
        license=license_id or "other", license_name=None if license_id else "same as the base model",
        tags=["stable-diffusion", "lora", "concept-erasure", "spm", "membrane", f"family-{family}"],
        model_name=f"spm-membrane-{version.concept}-v{version.version}",
        spm={"concept": version.concept, "version": version.version, "sha256": version.sha256,
             "validation": version.status, "base_model_name": base_name},
    )
    rows = [("version", f"{version.ref}"), ("aliases", ", ".join(version.aliases) or "-"),
            ("erases", ", ".join(concepts) or version.concept), ("base model", base_name), ("family", family),
            ("license", license_id or "the base model's"),
            ("rank / alpha", f"{meta.get('rank', '?')} / {meta.get('alpha', '?')}"),
            ("base fingerprint", meta.get("base_fingerprint", "?")), ("sha256", version.sha256),
            ("validation", version.status)]
    body = [f"# SPM membrane: {version.concept} (v{version.version})", "",
            "A concept-erasing membrane (SPM, Lyu et al., CVPR 2024): a rank-"
            f"{meta.get('rank', '1')} adapter on the UNet's transformer blocks of {base_name}. Plugged in with "
            "facilitated transport it removes the concept below and leaves other prompts as they were.", "",
            "| field | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    body += ["## Validation", ""]
    body += [f"- structural: {validation.get('structural', '?')}",
             f"- behavioural: {validation.get('behavioural', '?')}"]
    body += [f"- {r}" for r in validation.get("reasons", [])]
    if version.metrics:
        body += ["", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4g} |" for k, v in sorted(version.metrics.items()) if isinstance(v, (int, float))]
    body += ["", "## Limitations", "", *[f"- {line}" for line in LIMITATIONS]]
    shown = {k: v for k, v in lineage.items() if k not in _LOCAL_LINEAGE}
    shown["base_model"] = base_name
    body += ["", "## Lineage", "", "```json", json.dumps(shown, indent=1, sort_keys=True, default=str), "```", ""]
    if image:
        body += ["## Before / after", "", f"![original | with membrane]({image})", ""]
    body += ["## Use", "", "```python",
             "from spm_train import apply_membranes, load_membrane",
             "membrane = load_membrane(\"membrane.safetensors\")",
             "with apply_membranes(pipe, [membrane]):  # facilitated transport on by default",
             "    image = pipe(\"a photo of ...\").images[0]",
             "```", "",
             f"From a registry: `python -m pipelines.generate membranes=[{version.concept}@"
             f"{'production' if 'production' in version.aliases else 'latest'}] prompt=...`", ""]
    # ModelCard parses the front matter back: metadata the Hub could not read fails here, not on upload
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)


def export_bundle(registry: Registry, directory: str, refs: Iterable[str] | None = None) -> str:
    """Write the versions ``refs`` (default: every version) to ``directory``; returns the manifest path.

    Every blob is verified first: a tampered blob stops the export naming its version and both hashes.
    The bundle is written to a temporary folder beside ``directory`` and renamed into place, so a
    refused export leaves nothing behind; ``directory`` must not exist yet, or be empty.
    """
    versions = [registry.resolve(r) for r in refs] if refs else registry.versions()
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise RegistryError(f"{directory} exists and is not an empty folder; export to a new folder")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private; a bundle is for sharing
        manifest = _write_bundle(registry, versions, staging)
        if os.path.isdir(directory):
            os.rmdir(directory)  # empty (checked above); a rename cannot replace a folder
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %d version(s) to %s", len(manifest["versions"]), directory)
    return os.path.join(directory, "manifest.json")


def _write_bundle(registry: Registry, versions: list[Version], directory: str) -> dict[str, Any]:
    entries = []
    for v in versions:
        sub = os.path.join(directory, v.concept, f"v{v.version}")
        os.makedirs(sub, exist_ok=True)
        copy_verified(registry, v, os.path.join(sub, "membrane.safetensors"))
        image = registry.image_of(v)  # recorded here; never a path taken from lineage
        card_image = None
        if image:
            shutil.copyfile(image, os.path.join(sub, IMAGE_NAME))
            card_image = IMAGE_NAME
        with atomic_output(os.path.join(sub, "README.md")) as tmp:
            with open(tmp, "w") as fh:
                fh.write(model_card(v, card_image))
        entry = v.to_dict()
        entry["file"] = os.path.relpath(os.path.join(sub, "membrane.safetensors"), directory)
        entry["card"] = os.path.relpath(os.path.join(sub, "README.md"), directory)
        entries.append(entry)
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "source": registry.root,
                "versions": entries}
    with open(os.path.join(directory, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True, default=str)
    return manifest


def import_bundle(registry: Registry, directory: str) -> list[Version]:
    """Register every version of a bundle after checking each file against the manifest's sha256.

    Versions are numbered by the receiving registry (same bytes -> the existing version). What a
    bundle says about itself is provenance, not a verdict: each version's claimed validation is kept
    in its lineage (``claimed_validation``) and the version is recorded as not validated here; aliases
    other than ``latest`` come along, except protected ones (``production``), which are set here only.
    The import is one transaction: a failure on any entry leaves the registry as it was.
    """
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise RegistryError(f"{directory} is not a bundle (no manifest.json)") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise RegistryError(f"{path}: format is {found!r}, expected {BUNDLE_FORMAT!r}")
    entries = manifest.get("versions", [])
    if not isinstance(entries, list):
        raise RegistryError(f"{path}: 'versions' must be a list of entries")
    problems = [p for i, e in enumerate(entries) for p in _entry_problems(i, e, directory)]
    if problems:
        raise RegistryError(f"refusing to import {path}: " + "; ".join(problems))
    for e in entries:  # check everything before importing anything
        file = os.path.join(directory, e["file"])
        if not os.path.exists(file):
            problems.append(f"{e['concept']}:v{e['version']}: {e['file']} is missing")
        elif (actual := sha256_file(file)) != e["sha256"]:
            problems.append(f"{e['concept']}:v{e['version']}: {e['file']} has sha256 {actual}, "
                            f"manifest records {e['sha256']}")
    if problems:
        raise RegistryError("refusing to import: " + "; ".join(problems))
    source = str(manifest.get("source", directory))
    copied: list[str] = []
    try:
        with registry.transaction():
            imported = [_import_entry(registry, e, directory, source, copied)
                        for e in sorted(entries, key=lambda e: (e["concept"], e["version"]))]
    except BaseException:
        for image in copied:
            with contextlib.suppress(FileNotFoundError):
                os.remove(image)
        raise
    return imported


def _import_entry(registry: Registry, e: dict[str, Any], directory: str, source: str,
                  copied: list[str]) -> Version:
    claimed = e.get("validation") or {}
    where = f"{source} {e['concept']}:v{e['version']}"
    lineage = {**(e.get("lineage") or {}), "imported_from": where, "claimed_validation": claimed}
    claim = ValidationReport.from_dict(claimed).status if claimed else "nothing"
    report = ValidationReport(structural=NOT_EVALUATED, behavioural=NOT_EVALUATED,
                              reasons=[f"imported from {where}; not validated here (the bundle claims {claim})"])
    v = registry.register(os.path.join(directory, e["file"]), concept=e["concept"], validation=report,
                          lineage=lineage, metrics=e.get("metrics"))
    new = v.new
    for alias in e.get("aliases", []):
        if alias == LATEST:
            continue
        if is_protected(alias):
            logger.warning("import: %s@%s is not taken from the bundle; validate %s here and promote it",
                           v.concept, alias, v.ref)
            continue
        held = registry.index.alias(v.concept, alias)
        if held is not None and held != v.version:  # the receiving registry's own choice stands
            logger.warning("import: %s@%s stays on v%d here (the bundle puts it on %s)", v.concept, alias,
                           held, v.ref)
            continue
        v = registry.promote(v.ref, alias, reason=f"imported from {directory}")
    image = _bundle_image(directory, e)
    if new and image:
        kept = _keep_image(registry, image)
        if kept:
            copied.append(kept)
        registry.record_image(v, kept or _image_path(registry, image), prompt="imported with the bundle")
    v.new = new
    return v


def _bundle_image(directory: str, e: dict[str, Any]) -> str | None:
    """The entry's before/after image when the bundle holds one: a regular file inside the bundle."""
    image = os.path.join(directory, os.path.dirname(e["file"]), IMAGE_NAME)
    inside = os.path.realpath(image)
    root = os.path.realpath(directory)
    if os.path.commonpath([inside, root]) != root or os.path.islink(image) or not os.path.isfile(image):
        return None
    return image


def _image_path(registry: Registry, image: str) -> str:
    return os.path.join(registry.root, "images", f"{sha256_file(image)}.png")


def _keep_image(registry: Registry, image: str) -> str | None:
    """Copy a bundle's image into the registry folder (named by its content); the path if it is new."""
    dest = _image_path(registry, image)
    if os.path.exists(dest):
        return None
    with atomic_output(dest) as tmp:
        shutil.copyfile(image, tmp)
    return dest


def import_file(registry: Registry, path: str, concept: str) -> Version:
    """Register one membrane file (ours, or one written by the official SPM code) as not validated here."""
    report = ValidationReport(structural=NOT_EVALUATED, behavioural=NOT_EVALUATED,
                              reasons=[f"imported from {os.path.abspath(path)}; not validated here"])
    return registry.register(path, concept=concept, validation=report,
                             lineage={"imported_from": os.path.abspath(path)})


def _entry_problems(i: int, e: Any, directory: str) -> list[str]:
    """What is wrong with manifest entry ``i`` (types, and a file that stays inside the bundle)."""
    if not isinstance(e, dict):
        return [f"entry {i} is not an object"]
    expected = {"concept": str, "version": int, "file": str, "sha256": str}
    problems = [f"entry {i}: {key!r} must be a {kind.__name__}" for key, kind in expected.items()
                if not isinstance(e.get(key), kind) or isinstance(e.get(key), bool)]
    if not isinstance(e.get("aliases", []), list) or not all(isinstance(a, str) for a in e.get("aliases", [])):
        problems.append(f"entry {i}: 'aliases' must be a list of names")
    validation = e.get("validation") or {}
    known = {f.name for f in dataclasses.fields(ValidationReport)} | {"status"}
    if not isinstance(validation, dict) or set(validation) - known:
        problems.append(f"entry {i}: 'validation' must be an object with keys among {sorted(known)}")
    if isinstance(e.get("file"), str):
        inside = os.path.realpath(os.path.join(directory, e["file"]))
        if os.path.commonpath([inside, os.path.realpath(directory)]) != os.path.realpath(directory):
            problems.append(f"entry {i}: file {e['file']!r} lies outside the bundle")
    return problems


def _json_list(value: Any) -> list[str]:
    if not value:
        return []
    try:
        return [str(x) for x in json.loads(value)]
    except (TypeError, ValueError):
        return [str(value)]
