"""The wide world's shipped assets (``assets-wide/``, ``SPM_TOYWORLD=wide``) pass the checks the classic
world's pass: the pipeline tests of ``test_pipeline.py`` run again in a process whose world is the wide one
(the world is read once, at import), beside the transport checks that need its synonyms
(``wide_transport_checks.py``), and the build's record meets the quality bar on at least 1,000
generations of the wide vocabulary."""

import json
import os
import subprocess
import sys
from pathlib import Path

from spm_train.toyworld import assets_dir
from spm_train.toyworld.render import WIDE
from tests.toyworld.test_pipeline import QUALITY_BAR

ROOT = Path(__file__).resolve().parents[2]


def test_the_wide_build_record_meets_the_bar_on_the_wide_vocabulary():
    report = json.loads((assets_dir(WIDE) / "quality.json").read_text())
    world = report["world"]
    assert (world["shapes"], world["colours"], world["styles"]) == (list(WIDE.shapes), list(WIDE.colours),
                                                                      list(WIDE.styles))
    assert len(WIDE.shapes) >= 10 and len(WIDE.colours) >= 8 and len(WIDE.styles) >= 6
    assert world["synonyms"] and report["base"]["n"] >= 1000
    assert {h: report["base"][h] for h, bar in QUALITY_BAR.items() if report["base"][h] < bar} == {}
    # how the UNet was trained is part of the record: each learning-rate plan and the step it began at
    plans = report["unet_plans"]
    assert plans and plans[0][0] == 0 and all(a[0] < b[0] for a, b in zip(plans, plans[1:]))


def test_the_pipeline_and_transport_checks_pass_in_the_wide_world():
    env = {**os.environ, "SPM_TOYWORLD": WIDE.name}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "toyworld" / "test_pipeline.py"),
                          str(ROOT / "tests" / "toyworld" / "wide_transport_checks.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
