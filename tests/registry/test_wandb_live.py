"""The evaluation report reaches the bulk job's W&B run: grids as images, metrics as a table. Read back
from the offline run. (The run opening before training and the live loss stream are checked by
test_bulk_registry.py on a real bulk run.)"""

import json

from PIL import Image

from pipelines.bulk_train import _log_report
from spm_train.tracking import open_tracker

from .test_publish import inspect


def test_the_report_grids_and_metrics_reach_the_run(tmp_path):
    report = tmp_path / "report"
    (report / "grids").mkdir(parents=True)
    for concept, colour in (("circle", "red"), ("red", "blue")):
        Image.new("RGB", (16, 8), colour).save(report / "grids" / f"{concept}.png")
    metrics = [{"concept": "circle", "erasure_rate": 1.0, "preservation_drop": 0.2},
               {"concept": "red", "erasure_rate": 0.75, "preservation_drop": 0.0}]
    (report / "metrics.json").write_text(json.dumps(metrics))
    with open_tracker({"backend": "wandb", "mode": "offline", "dir": str(tmp_path)}, root=str(tmp_path)) as tracker:
        _log_report(tracker, str(report))
        run_dir = tracker.run_dir
    history = [r["history"]["item"] for r in inspect(run_dir) if r["type"] == "history"]
    images = [h for h in history if "eval/grids.count" in h][0]
    assert images["eval/grids.count"] == 2 and images["eval/grids.captions"] == ["circle", "red"]
    table = [h for h in history if "eval/metrics._type" in h][0]
    assert table["eval/metrics._type"] == "table-file"
    assert table["eval/metrics.nrows"] == 2 and table["eval/metrics.ncols"] == 3
