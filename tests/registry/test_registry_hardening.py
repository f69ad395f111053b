"""The registry refuses or records what it cannot trust: moved copies, foreign bytes, bad names and
manifests, a corrupt index; reads never wait for a writer; gates measure what the membrane changed."""

import json
import shutil
import sqlite3

import pytest

from spm_train.registry import Registry, RegistryError, ValidationReport, export_bundle, import_bundle
from spm_train.registry.publish import check_registry_config
from spm_train.registry.validate import FAILED, PASSED, Gates, check_behaviour

from .conftest import run_cli

OK = ValidationReport(structural="passed", behavioural="passed")


def test_a_copied_registry_keeps_its_own_blobs_and_gc_on_the_copy_spares_the_original(tmp_path, membrane_file):
    original = Registry.open(tmp_path / "a")
    original.register(membrane_file("snoopy", 0), concept="snoopy", validation=OK)
    original.close()
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    original = Registry.open(tmp_path / "a")
    v2 = original.register(membrane_file("snoopy", 1), concept="snoopy", validation=OK)
    copy = Registry.open(tmp_path / "copy")
    assert copy.blobs.url_of(v2.sha256).startswith(str(tmp_path / "copy"))
    assert copy.gc() == []  # the copy's store holds only its own v1
    assert original.verify() == [] and original.blobs.exists(v2.sha256)
    shutil.move(str(tmp_path / "copy"), str(tmp_path / "moved"))
    assert Registry.open(tmp_path / "moved").verify() == []


def test_a_url_is_refused_as_the_index_location(tmp_path):
    with pytest.raises(RegistryError, match="is a URL; the index is SQLite"):
        Registry.open("s3://bucket/spm/registry")


def test_bytes_that_are_not_a_membrane_are_recorded_as_failed_whatever_the_claim(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a membrane")
    v = reg.register(str(junk), concept="x", validation=OK, aliases=("production",))
    assert v.status == FAILED and "production" not in v.aliases
    assert any(r.startswith("at registration: unreadable") for r in v.validation["reasons"])

    # a bundle claiming "passed" for such bytes imports them as failed, and never as production
    good = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=OK)
    reg.promote(good.ref, "production")
    bundle = tmp_path / "bundle"
    export_bundle(reg, str(bundle), ["snoopy:v1"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / manifest["versions"][0]["file"]).write_bytes(junk.read_bytes())
    manifest["versions"][0]["sha256"] = v.sha256
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    other = Registry.open(tmp_path / "other")
    [imported] = import_bundle(other, str(bundle))
    assert imported.status == FAILED and "production" not in imported.aliases


def test_concept_names_and_the_files_own_concept_are_checked(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    with pytest.raises(RegistryError, match="bad concept name '../evil'"):
        reg.register(membrane_file("snoopy", 0), concept="../evil", validation=OK)
    with pytest.raises(RegistryError, match="membrane 'snoopy'.*refusing to register it as 'cat'"):
        reg.register(membrane_file("snoopy", 0), concept="cat", validation=OK)
    assert reg.versions() == []


def test_protected_aliases_ignore_case_and_aliases_can_be_removed(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    failed = ValidationReport(structural="passed", behavioural="failed", reasons=["too weak"])
    v = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=failed, aliases=("Production",))
    assert v.aliases == []  # registered; the protected alias skipped (and `latest`: it failed), not the registration
    with pytest.raises(RegistryError, match="refusing to promote snoopy:v1 to Production"):
        reg.promote(v.ref, "Production")
    reg.promote(v.ref, "candidate")
    root = str(tmp_path / "reg")
    assert run_cli("--root", root, "unalias", "snoopy", "candidate").returncode == 0
    assert reg.resolve("snoopy:v1").aliases == []
    gone = run_cli("--root", root, "unalias", "snoopy", "candidate")
    assert gone.returncode == 2 and "has no alias 'candidate'" in gone.stderr
    assert [e["action"] for e in reg.index.events("snoopy")][-1] == "unalias"


def test_import_leaves_the_receiving_registrys_aliases_where_they_are(tmp_path, membrane_file):
    source = Registry.open(tmp_path / "source")
    v = source.register(membrane_file("snoopy", 1), concept="snoopy", validation=OK)
    source.promote(v.ref, "production")
    export_bundle(source, str(tmp_path / "bundle"))
    here = Registry.open(tmp_path / "here")
    mine = here.register(membrane_file("snoopy", 0), concept="snoopy", validation=OK)
    here.promote(mine.ref, "production")
    [imported] = import_bundle(here, str(tmp_path / "bundle"))
    assert imported.ref == "snoopy:v2" and here.resolve("snoopy@production").ref == "snoopy:v1"


@pytest.mark.parametrize("manifest, message", [
    ({"format": "spm-membrane-bundle", "versions": [{"concept": "snoopy"}]}, "'file' must be a str"),
    ({"format": "spm-membrane-bundle", "versions": "all"}, "'versions' must be a list"),
    ({"format": "spm-membrane-bundle", "versions": [{"concept": "a", "version": 1, "file": "../../x",
                                                     "sha256": "0" * 64}]}, "lies outside the bundle"),
])
def test_a_malformed_bundle_manifest_is_one_message(tmp_path, manifest, message):
    from spm_train.registry.bundle import BUNDLE_FORMAT

    manifest["format"] = BUNDLE_FORMAT
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("--root", str(tmp_path / "reg"), "import", str(tmp_path / "b"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_corrupt_index_is_one_message_and_reads_do_not_wait_for_a_writer(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=OK)
    reg.close()
    writer = sqlite3.connect(tmp_path / "reg" / "index.sqlite", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a registration
    try:
        listed = run_cli("--root", str(tmp_path / "reg"), "list")
        verified = run_cli("--root", str(tmp_path / "reg"), "verify")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert listed.returncode == 0 and "snoopy:v1" in listed.stdout
    assert verified.returncode == 0 and "1 version(s) checked, 0 problem(s)" in verified.stdout

    for name in ("index.sqlite-wal", "index.sqlite-shm"):
        (tmp_path / "reg" / name).unlink(missing_ok=True)
    (tmp_path / "reg" / "index.sqlite").write_bytes(b"\x13" * 4096)
    for command in ("list", "verify"):
        result = run_cli("--root", str(tmp_path / "reg"), command)
        assert result.returncode == 2 and "is not a readable registry index" in result.stderr


def test_the_target_drop_gate_fails_a_membrane_that_changed_nothing():
    def unchanged(pipe, membrane, spec):  # the base barely draws the concept: high "erasure", no drop
        return {"erasure_rate": 0.6, "target_drop": -0.03, "preservation_drop": 0.0}

    status, _, reasons = check_behaviour(unchanged, None, None, None, Gates(min_erasure=0.5))
    assert status == PASSED
    status, _, reasons = check_behaviour(unchanged, None, None, None, Gates(min_erasure=0.5, min_target_drop=0.2))
    assert status == FAILED and reasons == ["target_drop -0.03 < min_target_drop 0.2"]
    assert Gates.for_concept("a", overrides={"a": {"min_target_drop": 0.4}}).min_target_drop == 0.4


def test_registry_settings_are_checked_before_any_training():
    good = {"gates": {"red": {"min_target_drop": 0.3}}, "candidate_alias": "candidate"}
    assert check_registry_config(good, ["red", "circle"]) == []
    problems = check_registry_config({"gates": {"nosuch": {"min_erasure": 0.9}, "red": {"min_erasur": 1}},
                                      "candidate_alias": "production", "min_target_drop": 3.0,
                                      "evaluator": "nowhere.mod:fn"}, ["red"])
    text = "; ".join(problems)
    assert "not in the concept set: nosuch" in text and "unknown gate 'min_erasur'" in text
    assert "candidate_alias=production" in text and "cannot import 'nowhere.mod:fn'" in text
    assert "min_target_drop of 'red' is 3.0" not in text  # red's gates failed to parse: reported once
    assert check_registry_config({"candidate_alias": "v2"}, ["red"]) == [
        "registry.candidate_alias=v2: letters, digits, _ . - (and not of the form vN)"]
    assert check_registry_config({"min_target_drop": 3.0}, ["red"]) == [
        "registry gate min_target_drop of 'red' is 3.0; rates and drops lie in [-1, 1]"]
    evaluator = "spm_train.registry.evaluators:toyworld"
    variant = ["toyworld:variant"]
    assert check_registry_config({"transfer_models": variant, "evaluator": evaluator}, ["red"]) == []
    assert check_registry_config({"transfer_models": variant}, ["red"]) == [
        "registry.transfer_models need an evaluator (registry.evaluator, or eval.enabled in a bulk run): "
        "transfer is measured behaviour"]
    assert check_registry_config({"transfer_models": variant[0], "evaluator": evaluator}, ["red"]) == [
        "registry.transfer_models must be a list of model sources, got 'toyworld:variant'"]
    assert check_registry_config({"transfer_models": ["a", "a"], "evaluator": evaluator}, ["red"]) == [
        "registry.transfer_models lists a more than once"]


def test_wandb_mode_disabled_in_the_environment_turns_tracking_off(tmp_path, monkeypatch):
    from spm_train.tracking import NullTracker, open_tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    with open_tracker({"backend": "wandb", "mode": "offline"}, root=str(tmp_path)) as tracker:
        assert type(tracker) is NullTracker
    assert not (tmp_path / "wandb").exists()


def test_a_relative_blob_folder_is_read_from_the_working_directory_as_before(tmp_path, membrane_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reg = Registry.open("runs/registry", "runs/registry/blobs")  # as the default config passes them
    v = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=OK)
    assert reg.blobs.url_of(v.sha256).startswith(str(tmp_path / "runs" / "registry" / "blobs"))
    assert reg.index.get_meta("blobs_in_root") == "blobs"
    reg.close()
    # a registry written before blob folders were recorded relative to it: the path as it was given
    with sqlite3.connect(tmp_path / "runs" / "registry" / "index.sqlite") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'blobs_in_root'")
        conn.execute("INSERT INTO meta (key, value) VALUES ('blobs', 'runs/registry/blobs')")
    for blobs in (None, "runs/registry/blobs"):
        old = Registry.open("runs/registry", blobs)
        assert old.verify() == [] and old.load("snoopy:v1").name == "snoopy"


def test_registering_the_same_bytes_again_repairs_an_altered_blob(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    path = membrane_file("snoopy", 0)
    v = reg.register(path, concept="snoopy", validation=OK)
    blob = reg.blobs.url_of(v.sha256)
    with open(blob, "ab") as fh:
        fh.write(b"tampered")
    assert reg.verify() != []
    assert reg.register(path, concept="snoopy", validation=OK).ref == "snoopy:v1"
    assert reg.verify() == []
    blob_path = reg.blobs.url_of(v.sha256)
    import os

    os.remove(blob_path)  # a lost blob comes back the same way
    assert reg.register(path, concept="snoopy", validation=OK).new is False and reg.verify() == []
