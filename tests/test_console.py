"""The console of a run: our own calls raise no warnings, third-party notices go to the log file only,
and the summary stays one line per result with each concept's share of its pack's time."""

import io
import logging
import warnings

import pytest
import torch

from pipelines.bulk_train import RunSummary, print_summary, summary_rows
from pipelines.console import OwnRecords, quiet_console
from spm_train.bulk.store import ConceptResult


@pytest.fixture
def hydra_like_logging(tmp_path):
    """A root logger shaped like Hydra's job logging (console + file), restored afterwards."""
    import transformers.utils.logging as transformers_logging

    root, library = logging.getLogger(), logging.getLogger("transformers")
    saved = (root.handlers[:], root.level, library.propagate, library.level)
    library.setLevel(logging.WARNING)  # the suite's conftest may have raised it
    # an earlier test's app may have captured warnings already, into the warnings state pytest then
    # replaced for this test; start from an uncaptured state as a fresh process does
    logging.captureWarnings(False)
    console_stream = io.StringIO()
    console = logging.StreamHandler(console_stream)
    logfile = logging.FileHandler(tmp_path / "job.log")
    root.handlers[:] = [console, logfile]
    root.setLevel(logging.INFO)
    yield console_stream, tmp_path / "job.log"
    logfile.close()
    root.handlers[:], root.level = saved[0], saved[1]
    logging.captureWarnings(False)
    library.propagate, library.level = saved[2], saved[3]
    transformers_logging.enable_default_handler()


def test_third_party_notices_reach_the_log_file_but_not_the_console(hydra_like_logging):
    console, logfile = hydra_like_logging
    quiet_console(("transformers",))
    logging.getLogger("transformers.utils.import_utils").warning("requires torchvision (not installed)")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("some library deprecation", FutureWarning)
    logging.getLogger("spm_train.bulk").info("3 concept(s) to train")
    # a library logger that propagates to the root (Ray's own loggers stop propagating once a test in this
    # process has started Ray, and print through Ray's handler)
    logging.getLogger("fsspec.local").error("a third-party error still shows")
    for handler in logging.getLogger().handlers:
        handler.flush()
    shown, kept = console.getvalue(), logfile.read_text()
    assert "3 concept(s) to train" in shown and "a third-party error still shows" in shown
    assert "torchvision" not in shown and "deprecation" not in shown
    assert "torchvision" in kept and "some library deprecation" in kept and "3 concept(s) to train" in kept


def test_the_filter_is_added_once_per_console_handler(hydra_like_logging):
    quiet_console(("transformers",))
    quiet_console(("transformers",))
    console = logging.getLogger().handlers[0]
    assert sum(isinstance(f, OwnRecords) for f in console.filters) == 1


def test_loading_a_base_model_raises_no_warning_from_our_own_calls():
    """diffusers' torch_dtype deprecation and its "kept in float32" notice came from our calls."""
    from spm_train.models import load_base_model

    diffusers_log = io.StringIO()
    handler = logging.StreamHandler(diffusers_log)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_base_model("toyworld")
            tiny = load_base_model("random:sd1", dtype="bfloat16")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert tiny.unet.dtype == tiny.vae.dtype == tiny.text_encoder.dtype == torch.bfloat16
    assert not [str(w.message) for w in caught if "dtype" in str(w.message)]
    assert "kept in float32" not in diffusers_log.getvalue()


def _result(concept, seconds, pack_concepts, **kw):
    return ConceptResult(concept=concept, key=concept * 8, point={}, point_id="default", status="trained",
                         seconds=seconds, pack_concepts=pack_concepts, **kw)


def test_each_concept_shows_its_share_of_the_pack_time():
    results = [_result("circle", 12.0, 3), _result("red", 12.0, 3), _result("alone", 5.0, 1)]
    rows = summary_rows(RunSummary(results, "/run", "/run/manifest.json", 20.0))
    assert [row[-1] for row in rows] == ["4.0", "4.0", "5.0"]


def test_the_summary_does_not_wrap_cells_outside_a_terminal(capsys):
    long_point = "lr=0.0003,la_strength=1000,anchors_per_step=4"
    results = [_result("snoopy", 9.0, 3, loss=0.000897, erase=0.000725, anchor=1.73e-07),
               ConceptResult(concept="vangogh", key="v" * 16, point={}, point_id=long_point, status="failed",
                             error="training raised: loss is nan at step 3")]
    print_summary(RunSummary(results, "/run", "/run/manifest.json", 12.0, versions={"snoopy" * 8: "snoopy:v12"}))
    lines = capsys.readouterr().out.splitlines()
    snoopy = [line for line in lines if "snoopy" in line]
    vangogh = [line for line in lines if "vangogh" in line]
    assert len(snoopy) == 1 and len(vangogh) == 1  # one line each: nothing folded onto a second line
    assert "0.000725" in snoopy[0] and "snoopy:v12" in snoopy[0] and " 3.0 " in snoopy[0]
    assert long_point in vangogh[0] and "loss is nan at step 3" in vangogh[0]
    assert [line for line in lines if line.startswith("objective loss = n/a") and "(minimize: " in line]  # one line
