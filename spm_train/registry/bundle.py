"""Export registry versions as a self-contained bundle, import one back, and write model cards.

Bundle layout::

    manifest.json                     format, versions with hashes, metrics, validation, lineage, aliases
    <concept>/v<N>/membrane.safetensors
    <concept>/v<N>/README.md          a Hugging Face style model card (YAML front matter)
    <concept>/v<N>/grid.png           the before/after grid, when the version records one
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Iterable

from ..io import atomic_output
from .blobs import sha256_file
from .core import LATEST, Registry, RegistryError, Version, copy_verified, is_protected
from .validate import ValidationReport

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "spm-membrane-bundle"
BUNDLE_VERSION = 1


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
    """
    versions = [registry.resolve(r) for r in refs] if refs else registry.versions()
    os.makedirs(directory, exist_ok=True)
    entries = []
    for v in versions:
        sub = os.path.join(directory, v.concept, f"v{v.version}")
        os.makedirs(sub, exist_ok=True)
        copy_verified(registry, v, os.path.join(sub, "membrane.safetensors"))
        image = registry.image_of(v)
        card_image = None
        if image:
            shutil.copyfile(image, os.path.join(sub, "grid.png"))
            card_image = "grid.png"
        with atomic_output(os.path.join(sub, "README.md")) as tmp:
            with open(tmp, "w") as fh:
                fh.write(model_card(v, card_image))
        entry = v.to_dict()
        entry["file"] = os.path.relpath(os.path.join(sub, "membrane.safetensors"), directory)
        entry["card"] = os.path.relpath(os.path.join(sub, "README.md"), directory)
        entries.append(entry)
    manifest = os.path.join(directory, "manifest.json")
    with open(manifest, "w") as fh:
        json.dump({"format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "source": registry.root,
                   "versions": entries}, fh, indent=1, sort_keys=True, default=str)
    logger.info("exported %d version(s) to %s", len(entries), directory)
    return manifest


def import_bundle(registry: Registry, directory: str) -> list[Version]:
    """Register every version of a bundle after checking each file against the manifest's sha256.

    Versions are numbered by the receiving registry (same bytes -> the existing version); aliases other
    than ``latest`` come along, and ``production`` only where the version passed validation.
    """
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise RegistryError(f"{directory} is not a bundle (no manifest.json)") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise RegistryError(f"{path}: format is {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    entries = manifest.get("versions", []) if isinstance(manifest, dict) else None
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
    imported = []
    for e in sorted(entries, key=lambda e: (e["concept"], e["version"])):
        lineage = {**e.get("lineage", {}), "imported_from": f"{manifest.get('source', directory)} "
                                                           f"{e['concept']}:v{e['version']}"}
        v = registry.register(os.path.join(directory, e["file"]), concept=e["concept"],
                              validation=ValidationReport.from_dict(e["validation"]) if e.get("validation") else None,
                              lineage=lineage, metrics=e.get("metrics"))
        new = v.new
        for alias in e.get("aliases", []):
            if alias == LATEST or (is_protected(alias) and v.status != "passed"):
                continue
            held = registry.index.alias(v.concept, alias)
            if held is not None and held != v.version:  # the receiving registry's own choice stands
                logger.warning("import: %s@%s stays on v%d here (the bundle puts it on %s)", v.concept, alias,
                               held, v.ref)
                continue
            v = registry.promote(v.ref, alias, reason=f"imported from {directory}")
        v.new = new
        imported.append(v)
    return imported


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
    known = {"structural", "behavioural", "reasons", "metrics", "gates", "status"}
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
