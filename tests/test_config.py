"""Bad input is refused with one message naming every problem."""

import pytest

from spm_train import ConceptSpec, ConfigError, TrainerConfig


def test_empty_target_and_bad_name_are_reported_together():
    with pytest.raises(ConfigError) as err:
        ConceptSpec("bad name!", "   ")
    assert len(err.value.problems) == 2
    assert "target prompt is empty" in str(err.value) and "bad name!" in str(err.value)


def test_surrogate_sets_the_neutral_prompt_and_conflicts_with_neutral():
    spec = ConceptSpec("ww", "wonder woman", surrogate="gal gadot")
    assert (spec.positive_prompt, spec.neutral_prompt) == ("wonder woman", "gal gadot")
    assert ConceptSpec("cat", "cat").neutral_prompt == ""
    with pytest.raises(ConfigError, match="either surrogate or neutral"):
        ConceptSpec("ww", "wonder woman", surrogate="gal gadot", neutral="woman")


def test_trainer_errors_are_collected_in_one_message():
    with pytest.raises(ConfigError) as err:
        TrainerConfig(lr=-1e-4, rank=0, lr_scheduler="warp", anchor_scale_min=2.0)
    text = str(err.value)
    for fragment in ("lr must be > 0", "rank must be > 0", "lr_scheduler 'warp'", "anchor scale range"):
        assert fragment in text
    assert len(err.value.problems) == 4


def test_presets_match_the_paper_and_unknown_keys_are_refused():
    paper = TrainerConfig.preset("paper")
    assert (paper.lr, paper.iterations, paper.lr_scheduler, paper.lr_cycles, paper.lr_warmup_steps,
            paper.batch_size, paper.rank, paper.alpha, paper.la_strength, paper.anchors_per_step,
            paper.max_denoising_steps) == (1e-4, 3000, "cosine_with_restarts", 3, 500, 1, 1, 1.0, 1000.0, 4, 30)
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        paper.replace(learning_rate=1.0)
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainerConfig.preset("turbo")


def test_fingerprint_ignores_logging_cadence_only():
    a = TrainerConfig()
    assert a.fingerprint() == a.replace(log_every=1, checkpoint_every=50).fingerprint()
    assert a.fingerprint() != a.replace(lr=2e-4).fingerprint()
