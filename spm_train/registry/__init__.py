"""The membrane registry: validation, content-addressed immutable versions, aliases, lineage, bundles."""

from .blobs import BlobStore, sha256_file
from .bundle import export_bundle, import_bundle, import_file, model_card
from .core import LATEST, IntegrityError, Registry, RegistryError, Version, parse_ref
from .publish import Publication, code_version, publish_results
from .validate import (FAILED, NOT_EVALUATED, PASSED, Evaluator, Gates, ValidationReport, check_behaviour,
                       check_structure, load_evaluator, validate)

__all__ = [
    "Registry", "RegistryError", "IntegrityError", "Version", "parse_ref", "LATEST",
    "BlobStore", "sha256_file", "export_bundle", "import_bundle", "import_file", "model_card",
    "Publication", "publish_results", "code_version",
    "Evaluator", "Gates", "ValidationReport", "validate", "check_structure", "check_behaviour", "load_evaluator",
    "PASSED", "FAILED", "NOT_EVALUATED",
]
