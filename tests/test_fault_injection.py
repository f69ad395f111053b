"""Fault injection (issue 13, items 3-7 and 13): damaged files, crashed and overlapping runs, failures
half-way. Each test injects one fault and checks that nothing is lost or duplicated and that the fault
is reported where a user looks (an error, a failed status, the exit code).

docs/reliability.md counts these faults; keep its table in step when adding one.
"""

import json
import logging
import os
import shutil
import socket
import threading
import time

import pytest
import torch

from spm_train import ConceptSpec, TrainerConfig
from spm_train.bulk import runner
from spm_train.bulk.plan import expand, pack
from spm_train.bulk.store import ConceptResult, ResultStore, _Owner
from spm_train.membrane import MembraneLayer
from spm_train.registry import IntegrityError, Registry, RegistryError, ValidationReport, export_bundle
from spm_train.registry.blobs import sha256_file
from spm_train.registry.bundle import import_bundle
from tests.registry.conftest import make_membrane, run_cli

PASSED = ValidationReport(structural="passed", behavioural="passed")
TINY = {"source": "random:sd1", "dtype": "float32"}


@pytest.fixture
def membrane(tmp_path, sd1_pipe):
    """``membrane(concept, seed)``: a real membrane file of the tiny sd1 UNet."""
    from spm_train.models import base_fingerprint

    fingerprint = base_fingerprint(sd1_pipe.unet)

    def build(concept: str = "snoopy", seed: int = 0) -> str:
        path = tmp_path / "src" / f"{concept}-{seed}.safetensors"
        make_membrane(sd1_pipe, concept, seed, fingerprint).save(str(path))
        return str(path)

    return build


# -- item 3: `latest` only names a version that did not fail; a failed registration is reported ----


def test_a_truncated_membrane_registers_as_failed_and_latest_stays_on_the_good_version(tmp_path, membrane):
    reg = Registry.open(tmp_path / "reg")
    good = reg.register(membrane("snoopy", 0), concept="snoopy", validation=PASSED)
    data = open(membrane("snoopy", 1), "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    bad = reg.register(str(tmp_path / "cut.safetensors"), concept="snoopy", validation=PASSED)
    assert bad.status == "failed" and "latest" not in bad.aliases
    assert reg.resolve("snoopy@latest").ref == good.ref and reg.load("snoopy").name == "snoopy"
    assert reg.verify() == []


def test_a_bundle_of_random_bytes_is_reported_failed_by_import_and_its_exit_code(tmp_path, membrane):
    source = Registry.open(tmp_path / "source")
    source.register(membrane("snoopy", 0), concept="snoopy", validation=PASSED)
    manifest_path = export_bundle(source, str(tmp_path / "bundle"))
    manifest = json.loads(open(manifest_path).read())
    entry = manifest["versions"][0]
    (tmp_path / "bundle" / entry["file"]).write_bytes(os.urandom(4096))
    entry["sha256"] = sha256_file(str(tmp_path / "bundle" / entry["file"]))
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("--root", str(tmp_path / "reg"), "import", str(tmp_path / "bundle"))
    assert result.returncode == 1 and "snoopy:v1  new  failed" in result.stdout
    assert "failed validation: snoopy:v1" in result.stderr
    with pytest.raises(RegistryError, match="every version of snoopy failed validation"):
        Registry.open(tmp_path / "reg").resolve("snoopy")


# -- item 4: a damaged cached result trains again ---------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "legacy record, truncated"])
def test_a_damaged_cached_membrane_is_reported_and_trained_again(tmp_path, membrane, caplog, damage):
    from spm_train.membrane import load_membrane

    store = ResultStore(tmp_path / "store")
    result = ConceptResult(concept="snoopy", key="k1", point={}, point_id="default", status="trained")
    store.put(result, load_membrane(membrane("snoopy", 0)))
    path = tmp_path / "store" / "results" / "k1" / "membrane.safetensors"
    assert store.lookup("k1") is not None
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":  # still a loadable file, with other weights
        data[-3] ^= 0x01
    else:
        data = data[: len(data) // 2]
    if damage.startswith("legacy"):  # written before result.json recorded the sha256
        record = tmp_path / "store" / "results" / "k1" / "result.json"
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "sha256"}))
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="spm_train.bulk.store"):
        assert store.lookup("k1") is None and not store.has("k1")
    assert "result k1" in caplog.text and "trained again" in caplog.text


def test_a_bulk_run_plans_a_damaged_cached_result_for_training(tmp_path):
    from pipelines.bulk_train import plan_run
    from spm_train.membrane import Membrane
    from tests.bulk.conftest import compose

    cfg = compose(tmp_path, "registry.enabled=false")
    first = plan_run(cfg)
    tasks = [t for job in first.jobs for t in job.tasks]
    for t in tasks:
        weights = {"lora_unet_x": (torch.ones(1, 4), torch.ones(4, 1))}
        first.store.put(ConceptResult(concept=t.concept.name, key=t.key, point={}, point_id="default",
                                      status="trained"), Membrane(weights=weights, rank=1, alpha=1.0))
    assert plan_run(cfg).jobs == []
    victim = tmp_path / "store" / "results" / tasks[0].key / "membrane.safetensors"
    victim.write_bytes(victim.read_bytes()[:40])
    again = plan_run(cfg)
    assert [t.key for job in again.jobs for t in job.tasks] == [tasks[0].key]
    assert len(again.cached) == len(tasks) - 1


# -- item 5: an empty index is refused everywhere, never taken for a new registry --------------------


def test_an_empty_index_is_refused_by_every_command_and_by_a_bulk_run(tmp_path, membrane):
    from pipelines.bulk_train import _registry_index_problems

    root = tmp_path / "reg"
    reg = Registry.open(root)
    v = reg.register(membrane("snoopy", 0), concept="snoopy", validation=PASSED)
    reg.close()
    (root / "index.sqlite").write_bytes(b"")
    with pytest.raises(RegistryError, match="empty"):
        Registry.open(root)
    bundle = tmp_path / "bundle"
    for args in (["import", str(bundle)], ["verify"], ["gc", "--dry-run"], ["list"], ["show", "snoopy"]):
        result = run_cli("--root", str(root), *args)
        assert result.returncode == 2 and "empty" in result.stderr, args
    assert _registry_index_problems(str(root)) and "empty" in _registry_index_problems(str(root))[0]
    assert (root / "index.sqlite").stat().st_size == 0  # left for the user to restore
    assert (root / "blobs" / v.sha256[:2] / f"{v.sha256}.safetensors").exists()  # no blob offered for deletion


# -- item 6: identical runs train once and register once --------------------------------------------


def test_the_same_membrane_always_saves_to_the_same_bytes_and_registers_once(tmp_path, sd1_pipe):
    from spm_train.models import base_fingerprint

    m = make_membrane(sd1_pipe, "snoopy", 0, base_fingerprint(sd1_pipe.unet))
    m.extra.update({f"note{i}": str(i) for i in range(8)})  # many header keys: any order shows
    paths = [m.save(str(tmp_path / f"copy{i}.safetensors")) for i in range(12)]
    assert len({sha256_file(p) for p in paths}) == 1
    reg = Registry.open(tmp_path / "reg")
    versions = {reg.register(p, concept="snoopy", validation=PASSED).ref for p in paths}
    assert versions == {"snoopy:v1"} and len(reg.versions()) == 1


def _job(name: str = "a"):
    tasks = expand([ConceptSpec(name, "a photo of a cat")], TrainerConfig.preset("smoke"), {}, "fp")
    return pack(tasks, 1)[0]


def _stored_row(store: ResultStore, task, tag: str) -> dict:
    from spm_train.membrane import Membrane

    weights = {"lora_unet_x": (torch.ones(1, 4), torch.ones(4, 1))}
    row = ConceptResult(concept=task.concept.name, key=task.key, point={}, point_id="default", status="trained",
                        node=tag)
    return store.put(row, Membrane(weights=weights, rank=1, alpha=1.0, name=task.concept.name)).to_dict()


def test_a_second_run_waits_for_the_first_runs_claim_and_reuses_its_results(tmp_path, monkeypatch):
    job = _job()
    store = ResultStore(tmp_path / "store")
    monkeypatch.setattr(ResultStore, "poll_s", 0.05)
    monkeypatch.setattr(runner, "_train_parts", lambda *a, **k: pytest.fail("trained a claimed pack twice"))
    monkeypatch.setattr(runner, "_load_base", lambda model: None)
    claimed, rows = threading.Event(), []

    def first_run():
        with store.claim([t.key for t in job.tasks]):
            claimed.set()
            time.sleep(0.5)  # the second run starts meanwhile and must wait
            _stored_row(store, job.tasks[0], "first run")

    thread = threading.Thread(target=first_run)
    thread.start()
    claimed.wait(10)
    rows = runner.train_pack(job, TINY, store.root)
    thread.join()
    assert [r["node"] for r in rows] == ["first run"]
    assert not (tmp_path / "store" / "claims" / f"{job.tasks[0].key}.json").exists()


def test_four_overlapping_runs_of_the_same_result_train_it_once(tmp_path, monkeypatch):
    job = _job()
    store = ResultStore(tmp_path / "store")
    monkeypatch.setattr(ResultStore, "poll_s", 0.02)
    trained, inside, overlaps = [], [], []

    def run(tag):
        with store.claim([t.key for t in job.tasks]):
            if store.lookup(job.tasks[0].key) is None:  # what a run trains inside its claim
                inside.append(tag)
                overlaps.append(len(inside))
                time.sleep(0.2)
                trained.append(_stored_row(store, job.tasks[0], tag))
                inside.remove(tag)

    threads = [threading.Thread(target=run, args=(f"run{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1 and max(overlaps) == 1


@pytest.mark.parametrize("holder", ["lease ran out", "process gone"])
def test_a_crashed_runs_claim_lapses_and_the_work_is_taken_over(tmp_path, monkeypatch, holder):
    job = _job()
    store = ResultStore(tmp_path / "store")
    claim = tmp_path / "store" / "claims" / f"{job.tasks[0].key}.json"
    claim.parent.mkdir(parents=True)
    if holder == "lease ran out":
        record = {"owner": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    else:  # a pid that no process has on this host
        record = {"owner": "here:dead", "host": socket.gethostname(), "pid": 2 ** 22 + 17,
                  "expires": time.time() + 3600}
    claim.write_text(json.dumps(record))
    monkeypatch.setattr(runner, "_load_base", lambda model: None)
    monkeypatch.setattr(runner, "_train_parts",
                        lambda rest, *a, **k: [_stored_row(store, t, "took over") for t in rest.tasks])
    rows = runner.train_pack(job, TINY, store.root)
    assert [r["node"] for r in rows] == ["took over"] and not claim.exists()


def test_a_live_claim_of_another_host_is_waited_for(tmp_path):
    job = _job()
    store = ResultStore(tmp_path / "store")
    claim = tmp_path / "store" / "claims" / f"{job.tasks[0].key}.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"owner": "other:1:x", "host": "other", "pid": 1, "expires": time.time() + 60}))
    owner = _Owner.new()
    assert store._claim_all([job.tasks[0].key], owner) == ([], "other:1:x")
    assert json.loads(claim.read_text())["owner"] == "other:1:x"  # untouched


# -- item 7: a failed pack setup leaves the shared base model as it was ------------------------------


def test_a_failed_setup_detaches_its_membranes_and_shows_the_real_cause(fresh_sd1):
    from spm_train.training import train_membranes

    unet = fresh_sd1.unet
    wanted = {n for n, p in unet.named_parameters() if p.requires_grad}
    bad = TrainerConfig.preset("smoke")
    bad.lr = float("nan")  # past validation, as a caller mutating a config would: the optimizer refuses it
    with pytest.raises(ValueError, match="Invalid learning rate"):
        train_membranes(fresh_sd1, [ConceptSpec("a", "a photo of a cat")], bad, progress=False)
    assert not any(isinstance(m, MembraneLayer) for m in unet.modules())
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == wanted
    # the next pack on the same (cached) base trains
    result = train_membranes(fresh_sd1, [ConceptSpec("b", "a photo of a dog")],
                             TrainerConfig.preset("smoke", iterations=1), progress=False)
    assert len(result.membranes) == 1


# -- item 13: export and import are all or nothing --------------------------------------------------


def test_a_refused_export_leaves_no_bundle_folder(tmp_path, membrane):
    reg = Registry.open(tmp_path / "reg")
    reg.register(membrane("a", 0), concept="a", validation=PASSED)
    b = reg.register(membrane("b", 1), concept="b", validation=PASSED)
    blob = reg.blobs.url_of(b.sha256)
    with open(blob, "ab") as fh:  # the second version's blob is altered after registration
        fh.write(b"x")
    with pytest.raises(IntegrityError, match="b:v1"):
        export_bundle(reg, str(tmp_path / "out" / "bundle"))
    assert os.listdir(tmp_path / "out") == []  # neither the bundle nor its temporary folder


def test_an_import_failing_on_its_second_entry_keeps_nothing(tmp_path, membrane):
    source = Registry.open(tmp_path / "source")
    source.register(membrane("a", 0), concept="a", validation=PASSED)
    source.register(membrane("b", 1), concept="b", validation=PASSED)
    manifest_path = export_bundle(source, str(tmp_path / "bundle"))
    manifest = json.loads(open(manifest_path).read())
    second = [e for e in manifest["versions"] if e["concept"] == "b"][0]
    shutil.copyfile(membrane("z", 2), tmp_path / "bundle" / second["file"])  # another concept's membrane
    second["sha256"] = sha256_file(str(tmp_path / "bundle" / second["file"]))
    (tmp_path / "bundle" / "manifest.json").write_text(json.dumps(manifest))
    here = Registry.open(tmp_path / "here")
    with pytest.raises(RegistryError, match="refusing to register it as 'b'"):
        import_bundle(here, str(tmp_path / "bundle"))
    assert here.versions() == [] and here.index.events() == [] and here.blobs.list() == []
