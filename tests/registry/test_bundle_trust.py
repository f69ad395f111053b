"""Bundles are files people receive (issue 13, items 1-2): what a manifest says is data, never a path to
open, and never a verdict the receiving registry takes over."""

import json

import pytest

from spm_train.registry import Registry, RegistryError, ValidationReport, export_bundle, import_bundle

from .conftest import run_cli

PASSED = ValidationReport(structural="passed", behavioural="passed")


def _bundle(tmp_path, membrane_file, **entry_changes) -> str:
    source = Registry.open(tmp_path / "source")
    v = source.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    source.promote(v.ref, "production")
    bundle = tmp_path / "bundle"
    manifest = json.loads(open(export_bundle(source, str(bundle))).read())
    manifest["versions"][0].update(entry_changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return str(bundle)


def test_a_lineage_image_path_in_a_bundle_is_never_copied_into_a_later_export(tmp_path, membrane_file):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- not for export")
    bundle = _bundle(tmp_path, membrane_file, lineage={"image": str(secret), "base_model": "x"})
    reg = Registry.open(tmp_path / "reg")
    [v] = import_bundle(reg, bundle)
    assert v.lineage["image"] == str(secret)  # kept as data, as it came
    assert reg.image_of(v) is None
    out = tmp_path / "out"
    export_bundle(reg, str(out))
    shipped = [p for p in out.rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == secret.read_bytes() for p in shipped)
    assert not (out / "snoopy" / "v1" / "grid.png").exists()


def test_a_bundle_image_outside_the_bundle_is_not_copied_in(tmp_path, membrane_file):
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"private")
    bundle = _bundle(tmp_path, membrane_file)
    (tmp_path / "bundle" / "snoopy" / "v1" / "grid.png").symlink_to(outside)
    reg = Registry.open(tmp_path / "reg")
    [v] = import_bundle(reg, bundle)
    assert reg.image_of(v) is None and not (tmp_path / "reg" / "images").exists()


def test_a_bundle_cannot_grant_itself_production_or_a_passed_validation(tmp_path, membrane_file):
    bundle = _bundle(tmp_path, membrane_file, aliases=["latest", "production", "Production", "candidate"])
    reg = Registry.open(tmp_path / "reg")
    [v] = import_bundle(reg, bundle)
    assert v.status == "not_validated" and sorted(v.aliases) == ["candidate", "latest"]
    assert v.lineage["claimed_validation"]["status"] == "passed"  # provenance, kept
    assert any("not validated here (the bundle claims passed)" in r for r in v.validation["reasons"])
    refused = run_cli("--root", str(tmp_path / "reg"), "promote", "snoopy:v1", "production")
    assert refused.returncode == 2 and "validation not_validated" in refused.stderr
    with pytest.raises(RegistryError):
        reg.resolve("snoopy@production")
