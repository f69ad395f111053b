"""`python -m pipelines.evaluate` on a finished bulk run: report with transport and anchoring ablations."""

import json

import pytest
import torch


@pytest.fixture
def clip_dir(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from spm_train.architectures import TINY_WORDS
    from spm_train.toyworld.tokenizer import build_word_tokenizer

    path = tmp_path / "clip"
    tok = build_word_tokenizer(TINY_WORDS, str(path))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    return path


def test_evaluate_pipeline_writes_the_report_with_ablations(tmp_path, clip_dir, ray_shutdown):
    from hydra import compose, initialize_config_dir

    from pipelines.bulk_train import train
    from pipelines.evaluate import run
    from tests.bulk.conftest import CONF, compose as compose_bulk

    bulk = train(compose_bulk(tmp_path, "cluster.num_cpus=2"), run_dir=str(tmp_path / "bulk" / "run1"))
    assert all(r.status == "trained" for r in bulk.results)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=tiny_random", "concepts=smoke", "trainer=smoke", f"paths.root={tmp_path}", "eval.kind=clip",
            f"eval.clip_path={clip_dir}", "eval.samples_per_prompt=1", "eval.steps=2", "eval.ablation=true"])
    path = run(cfg, str(tmp_path / "report"))
    text = open(path).read()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    # cat and snoopy use anchoring: transport on, off, without anchoring, all together; vangogh is plain erase
    combos = {(m["concept"], m["equipped"], m["transport"], m["anchoring"]) for m in metrics}
    assert ("cat", "alone", True, False) in combos and ("cat", "alone", False, True) in combos
    assert ("snoopy", "all together", True, True) in combos
    assert len(metrics) == 3 * 4
    assert "grids/cat.png" in text and (tmp_path / "report" / "grids" / "vangogh.png").exists()


def test_the_bulk_job_writes_the_evaluation_report_when_asked(tmp_path, clip_dir, ray_shutdown):
    from pipelines.bulk_train import train
    from tests.bulk.conftest import compose as compose_bulk

    cfg = compose_bulk(tmp_path, "cluster.num_cpus=2", "eval.enabled=true", "eval.kind=clip",
                       f"eval.clip_path={clip_dir}", "eval.samples_per_prompt=1", "eval.steps=2")
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    assert summary.report == str(tmp_path / "run" / "report" / "report.md")
    text = open(summary.report).read()
    assert text.count("| cat |") == 3  # transport on, off, all together
