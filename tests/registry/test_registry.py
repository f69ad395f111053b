"""Registry reliability: concurrent writers, tampering, crashes mid-registration, gated promotion,
bundles and the command line."""

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from spm_train.registry import (IntegrityError, Registry, RegistryError, ValidationReport, export_bundle,
                                import_bundle)

from .conftest import run_cli, run_cli_process

PASSED = ValidationReport(structural="passed", behavioural="passed",
                          metrics={"erasure_rate": 0.95, "preservation_drop": 0.01})
FAILED = ValidationReport(structural="passed", behavioural="failed", reasons=["erasure_rate 0.1 < min_erasure 0.8"],
                          metrics={"erasure_rate": 0.1, "preservation_drop": 0.0})


def _writer(root, files, barrier, queue):
    """One process: register its list of (concept, file) as fast as it can.

    Forked children must not run torch ops (a forked OpenMP pool can hang); registering needs none.
    """
    barrier.wait()
    reg = Registry.open(root)
    out = []
    for concept, path in files:
        v = reg.register(path, concept=concept, validation=PASSED, lineage={"pid": os.getpid()})
        out.append((concept, v.version, v.sha256, v.new))
    reg.close()
    queue.put(out)


def test_eight_processes_register_at_once_without_losing_or_duplicating_a_version(tmp_path, membrane_file):
    snoopy = [membrane_file("snoopy", s) for s in range(6)]
    others = {c: membrane_file(c, 100 + i) for i, c in enumerate(["cat", "dog", "vangogh"])}
    # nobody creates the registry beforehand: the eight writers also race to create the index
    # every process registers 3 snoopy files (overlapping with its neighbours) and one other concept
    plans = [[("snoopy", snoopy[(p + k) % 6]) for k in range(3)] + [(c, others[c]) for c in [list(others)[p % 3]]]
             for p in range(8)]
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "reg"), plan, barrier, queue)) for plan in plans]
    for p in procs:
        p.start()
    outs = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    reg = Registry.open(tmp_path / "reg")
    versions = reg.versions()
    by_concept = {}
    for v in versions:
        by_concept.setdefault(v.concept, []).append(v)
    # one version per distinct file, numbered v1..vN without gaps
    assert sorted(v.version for v in by_concept["snoopy"]) == [1, 2, 3, 4, 5, 6]
    assert {v.sha256 for v in by_concept["snoopy"]} == {_sha(p) for p in snoopy}
    for c in others:
        assert [v.version for v in by_concept[c]] == [1]
    # every writer saw a consistent answer: a given file always maps to the same version
    seen = {}
    for concept, number, sha, _ in (row for out in outs for row in out):
        assert seen.setdefault((concept, sha), number) == number
    # and exactly one writer created each version
    assert sum(new for out in outs for *_, new in out) == len(versions) == 9
    assert reg.resolve("snoopy").version == 6  # latest
    assert reg.verify() == []
    assert len(reg.blobs.list()) == 9


def _sha(path):
    from spm_train.registry import sha256_file

    return sha256_file(path)


def _tamper(reg, version):
    path = reg.blobs.url_of(version.sha256)
    with open(path, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x01\x02\x03")
    return path


def test_an_altered_blob_is_refused_at_load_export_verify_and_generate(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    v = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    reg.promote(v.ref, "production")
    assert reg.load("snoopy@production").name == "snoopy"
    _tamper(reg, v)
    actual = _sha(reg.blobs.url_of(v.sha256))
    assert actual != v.sha256
    for action in (lambda: reg.load("snoopy@production"), lambda: export_bundle(reg, str(tmp_path / "b"))):
        with pytest.raises(IntegrityError) as err:
            action()
        message = str(err.value)
        assert "snoopy:v1" in message and v.sha256 in message and actual in message
    problems = reg.verify()
    assert len(problems) == 1 and "snoopy:v1" in problems[0] and actual in problems[0]

    from pipelines.generate import generate

    from .test_generate import compose_generate

    cfg = compose_generate(tmp_path, "membranes=[snoopy@production]", "prompt=snoopy")
    with pytest.raises(IntegrityError, match=f"snoopy:v1.*{actual}.*{v.sha256}"):
        generate(cfg, run_dir=str(tmp_path / "gen"))
    assert not os.path.exists(tmp_path / "gen" / "grid.png")

    cli = run_cli_process("--root", str(tmp_path / "reg"), "export", str(tmp_path / "b2"))
    assert cli.returncode == 2
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: snoopy:v1") and actual in lines[0]
    assert run_cli("--root", str(tmp_path / "reg"), "verify").returncode == 1


def _register_and_pause(root, path, point, marker):
    os.environ["SPM_REGISTRY_PAUSE"] = f"{point}:{marker}"
    Registry.open(root).register(path, concept="snoopy", validation=PASSED)


@pytest.mark.parametrize("point", ["blob-staged", "before-index-commit"])
def test_a_writer_killed_mid_registration_leaves_no_partial_blob_or_row(tmp_path, membrane_file, point):
    root = str(tmp_path / "reg")
    reg = Registry.open(root)
    first = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    path = membrane_file("snoopy", 1)
    marker = tmp_path / "paused"
    proc = mp.get_context("fork").Process(target=_register_and_pause, args=(root, path, point, str(marker)))
    proc.start()
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the writer never reached the pause point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL

    reg = Registry.open(root)
    assert [v.ref for v in reg.versions()] == ["snoopy:v1"]  # no row
    assert reg.resolve("snoopy@latest").ref == "snoopy:v1"
    # the only visible blob is v1's; a killed writer's blob is either a hidden temp file or a complete orphan
    visible = reg.blobs.list()
    assert set(visible) <= {first.sha256, _sha(path)}
    for sha in visible:
        assert reg.blobs.hash_of(sha) == sha
    assert reg.verify() == []
    # the index was not left locked: the next writer registers the same file as v2
    again = reg.register(path, concept="snoopy", validation=PASSED)
    assert again.ref == "snoopy:v2" and again.new
    assert reg.gc() == [] and reg.verify() == []


def test_promoting_a_failed_version_needs_force_and_the_force_is_recorded(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    good = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    bad = reg.register(membrane_file("snoopy", 1), concept="snoopy", validation=FAILED)
    assert (good.status, bad.status) == ("passed", "failed")
    reg.promote(good.ref, "production")
    with pytest.raises(RegistryError, match="refusing to promote snoopy:v2 to production.*erasure_rate 0.1"):
        reg.promote(bad.ref, "production")
    assert reg.resolve("snoopy@production").ref == "snoopy:v1"  # unchanged
    # other aliases are not gated
    assert "candidate" in reg.promote(bad.ref, "candidate").aliases
    forced = reg.promote(bad.ref, "production", force=True, reason="hotfix approved by x")
    assert "production" in forced.aliases
    assert "production" not in reg.resolve(good.ref).aliases  # an alias names one version per concept
    alias_row = [a for a in reg.index.aliases("snoopy") if a["alias"] == "production"][0]
    assert alias_row["forced"] == 1 and alias_row["version"] == 2
    event = [e for e in reg.index.events("snoopy") if e["action"] == "promote"][-1]
    assert event["detail"]["forced"] is True and event["detail"]["note"] == "hotfix approved by x"
    assert event["detail"]["previous"] == 1 and event["detail"]["status"] == "failed"
    with pytest.raises(RegistryError, match="follows the newest version"):
        reg.promote(good.ref, "latest")

    # the CLI: refused with exit 2 and one line; forced and shown as forced
    root = str(tmp_path / "reg")
    reg.promote(good.ref, "production")
    refused = run_cli("--root", root, "promote", "snoopy:v2", "production")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert reg.resolve("snoopy@production").ref == "snoopy:v1"
    ok = run_cli("--root", root, "promote", "snoopy:v2", "production", "--force", "--reason", "cli")
    assert ok.returncode == 0 and "(forced)" in ok.stdout
    listing = json.loads(run_cli("--root", root, "list", "--json").stdout)
    assert {(v["ref"], v["status"]) for v in listing} == {("snoopy:v1", "passed"), ("snoopy:v2", "failed")}
    assert [v["aliases"] for v in listing if v["ref"] == "snoopy:v2"][0] == ["candidate", "production"]
    assert reg.resolve("snoopy@latest").ref == "snoopy:v1"  # `latest` never moves to a failed version


def test_versions_are_immutable_and_registration_is_idempotent(tmp_path, membrane_file):
    import sqlite3

    reg = Registry.open(tmp_path / "reg")
    path = membrane_file("snoopy", 0)
    v1 = reg.register(path, concept="snoopy", validation=PASSED)
    again = reg.register(path, concept="snoopy", validation=FAILED)
    assert (again.ref, again.new, again.status) == ("snoopy:v1", False, "passed")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        reg.index.conn.execute("UPDATE versions SET sha256 = 'x' WHERE concept = 'snoopy'")
    with pytest.raises(sqlite3.IntegrityError, match="cannot be deleted"):
        reg.index.conn.execute("DELETE FROM versions")
    assert reg.resolve("snoopy:v1").sha256 == v1.sha256 == _sha(path)
    assert reg.index.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_export_import_roundtrip_with_model_cards_and_gc(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "reg")
    v1 = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED,
                      lineage={"base_model": "random:sd1", "seed": 0})
    reg.register(membrane_file("cat", 1), concept="cat", validation=FAILED)
    reg.promote(v1.ref, "production")
    from PIL import Image

    Image.new("RGB", (8, 4)).save(tmp_path / "grid.png")
    reg.record_image(v1, str(tmp_path / "grid.png"))
    bundle = tmp_path / "bundle"
    manifest = json.loads(open(export_bundle(reg, str(bundle))).read())
    assert [(e["ref"], e["sha256"]) for e in manifest["versions"]] == \
        [("cat:v1", reg.resolve("cat:v1").sha256), ("snoopy:v1", v1.sha256)]
    card = (bundle / "snoopy" / "v1" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: diffusers" in front and "- concept-erasure" in front
    assert "base_model:" not in front and "| base model | random:sd1 |" in card  # not a Hub id: named, not linked
    assert "![original | with membrane](grid.png)" in card and (bundle / "snoopy" / "v1" / "grid.png").exists()
    assert _sha(bundle / "snoopy" / "v1" / "membrane.safetensors") == v1.sha256

    other = Registry.open(tmp_path / "other")
    imported = import_bundle(other, str(bundle))
    assert [(v.ref, v.new) for v in imported] == [("cat:v1", True), ("snoopy:v1", True)]
    # a bundle's verdicts are provenance: not validated here, and no production alias from a bundle
    snoopy = other.resolve("snoopy:v1")
    assert snoopy.sha256 == v1.sha256 and snoopy.status == "not_validated" and "production" not in snoopy.aliases
    assert snoopy.lineage["claimed_validation"]["status"] == "passed"
    assert other.resolve("cat:v1").lineage["claimed_validation"]["status"] == "failed"
    # the bundle's own image comes along, copied into the receiving registry
    image = other.image_of(snoopy)
    assert image.startswith(str(tmp_path / "other")) and _sha(image) == _sha(bundle / "snoopy" / "v1" / "grid.png")
    assert [v.new for v in import_bundle(other, str(bundle))] == [False, False]  # nothing twice

    # a bundle file altered after export is refused before anything is imported
    with open(bundle / "cat" / "v1" / "membrane.safetensors", "ab") as fh:
        fh.write(b"x")
    third = Registry.open(tmp_path / "third")
    with pytest.raises(RegistryError, match="cat:v1.*manifest records"):
        import_bundle(third, str(bundle))
    assert third.versions() == []

    # gc removes only blobs no version points to
    orphan = reg.blobs.stage(b"not a membrane")
    reg.blobs.commit(orphan)
    assert reg.gc(dry_run=True) == [reg.blobs.url_of(orphan.sha256)] and reg.blobs.exists(orphan.sha256)
    assert reg.gc() == [reg.blobs.url_of(orphan.sha256)]
    assert not reg.blobs.exists(orphan.sha256) and reg.verify() == []


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, membrane_file):
    reg = Registry.open(tmp_path / "registry")
    reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    root = str(tmp_path / "registry")
    shown = run_cli("show", "snoopy:v1", "--json", env={"SPM_HOME": str(tmp_path)})  # root from $SPM_HOME
    assert shown.returncode == 0 and json.loads(shown.stdout)["sha256"] == reg.resolve("snoopy:v1").sha256
    for args, message in [(["show", "snoopy:v9"], "no version snoopy:v9"),
                          (["show", "nobody@production"], "no concept 'nobody'"),
                          (["promote", "snoopy:v1", "v2"], "bad alias"),
                          (["import", str(tmp_path / "nothing")], "not a bundle")]:
        out = run_cli("--root", root, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and message in out.stderr
    text = run_cli("--root", root, "show", "snoopy")
    assert text.returncode == 0 and text.stdout.startswith("snoopy:v1  (passed)  aliases: latest")
    table = run_cli("--root", root, "list")
    assert table.returncode == 0 and "snoopy:v1" in table.stdout and "latest" in table.stdout


def test_blobs_on_another_fsspec_filesystem(tmp_path, membrane_file):
    url = f"memory://spm-test-{os.getpid()}/blobs"
    reg = Registry.open(tmp_path / "reg", blobs=url)
    v = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    assert reg.blobs.url_of(v.sha256).startswith(url) and reg.blobs.list() == [v.sha256]
    assert reg.load("snoopy").name == "snoopy" and reg.verify() == []
    assert Registry.open(tmp_path / "reg").blobs.url == url  # the blob location is remembered


def test_model_cards_carry_valid_hub_metadata_and_no_local_paths(tmp_path, membrane_file):
    from huggingface_hub import ModelCard

    reg = Registry.open(tmp_path / "reg")
    hub = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED, lineage={
        "base_model": "/data/models/sd15", "base_model_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "base_license": "creativeml-openrail-m", "run_dir": "/home/me/runs/bulk/2026-12-02",
        "source_file": "/home/me/runs/store/results/ab/membrane.safetensors"})
    local = reg.register(membrane_file("cat", 1), concept="cat", validation=PASSED,
                         lineage={"base_model": "/data/models/my-finetune"})
    export_bundle(reg, str(tmp_path / "bundle"))

    card = ModelCard.load(tmp_path / "bundle" / "snoopy" / "v1" / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m" and card.data.library_name == "diffusers"
    assert card.data.to_dict()["spm"]["sha256"] == hub.sha256
    assert "## Limitations" in card.text and "facilitated transport" in card.text and "load_lora_weights" in card.text
    assert "/home/me" not in str(card) and "/data/models" not in str(card)  # no folder of the training machine

    card = ModelCard.load(tmp_path / "bundle" / "cat" / "v1" / "README.md")
    assert card.data.base_model is None  # a local fine-tune has no Hub id to link
    assert card.data.license == "other" and card.data.license_name == "same as the base model"
    assert "| base model | my-finetune |" in card.text and local.sha256 in str(card)


def test_equip_puts_named_versions_on_a_pipeline_and_takes_them_off(tmp_path, membrane_file, tiny_pipe):
    import torch

    reg = Registry.open(tmp_path / "reg")
    v1 = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=PASSED)
    reg.promote(v1.ref, "production")
    g = torch.Generator().manual_seed(0)
    sample, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)

    def unet_out():
        with torch.no_grad():
            return tiny_pipe.unet(sample, 10, encoder_hidden_states=states).sample

    before = unet_out()
    with reg.equip(tiny_pipe, "snoopy@production", transport=False):  # no prompt here to gate on
        equipped = unet_out()
    assert not torch.allclose(equipped, before)
    assert torch.equal(unet_out(), before)  # taken off: the base exactly as it was
    with pytest.raises(RegistryError, match="at least one membrane reference"):
        reg.equip(tiny_pipe)
    with pytest.raises(RegistryError):
        reg.equip(tiny_pipe, "snoopy@nosuch")
