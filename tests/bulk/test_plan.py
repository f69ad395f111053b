"""Job planning: sweep expansion, precedence of overrides, packing, result identity."""

import pytest

from spm_train import ConceptSpec, ConfigError, TrainerConfig
from spm_train.bulk.plan import expand, pack, result_key, sweep_points

BASE = TrainerConfig.preset("smoke")
CONCEPTS = [ConceptSpec("a", "apple"), ConceptSpec("b", "banana"), ConceptSpec("c", "cherry", trainer={"lr": 5e-3})]


def test_sweep_points_are_the_cartesian_product():
    points = sweep_points({"lr": [1e-4, 3e-4], "la_strength": [100, 1000]})
    assert len(points) == 4 and {"lr": 3e-4, "la_strength": 100} in points
    assert sweep_points({}) == [{}]


def test_concept_overrides_then_sweep_points_set_the_effective_trainer():
    tasks = expand(CONCEPTS, BASE, {}, "fp")
    assert [t.trainer.lr for t in tasks] == [BASE.lr, BASE.lr, 5e-3]
    swept = expand(CONCEPTS, BASE, {"lr": [1e-2]}, "fp")
    assert {t.trainer.lr for t in swept} == {1e-2}  # the sweep point wins over the concept's own lr


def test_packs_hold_only_concepts_with_identical_trainers():
    jobs = pack(expand(CONCEPTS, BASE, {"la_strength": [10.0, 100.0]}, "fp"), pack_size=8)
    assert len(jobs) == 4  # (a, b) and (c) at each of two points
    for job in jobs:
        assert len({t.trainer.fingerprint() for t in job.tasks}) == 1
    assert sorted(len(j.tasks) for j in pack(expand(CONCEPTS * 1, BASE, {}, "fp"), pack_size=1)) == [1, 1, 1]


def test_job_ids_and_result_keys_are_stable_and_specific():
    a = expand(CONCEPTS, BASE, {}, "fp")
    b = expand(CONCEPTS, BASE, {}, "fp")
    assert [t.key for t in a] == [t.key for t in b]
    assert [j.job_id for j in pack(a, 4)] == [j.job_id for j in pack(b, 4)]
    spec = CONCEPTS[0]
    assert result_key(spec, BASE, "fp") != result_key(spec, BASE, "other-base")
    assert result_key(spec, BASE, "fp") != result_key(spec, BASE.replace(lr=1.0), "fp")
    assert result_key(spec, BASE, "fp") == result_key(spec, BASE.replace(log_every=7), "fp")
    relabelled = ConceptSpec("a", "apple", nontarget=["pear"])
    assert result_key(relabelled, BASE, "fp") == result_key(spec, BASE, "fp")


def test_every_bad_override_is_reported_at_once():
    bad = [ConceptSpec("a", "apple", trainer={"lr": -1.0}), ConceptSpec("b", "banana", trainer={"speed": 3})]
    with pytest.raises(ConfigError) as err:
        expand(bad, BASE, {}, "fp")
    text = str(err.value)
    assert "concept 'a'" in text and "lr must be > 0" in text and "unknown key 'speed'" in text
    with pytest.raises(ConfigError, match="empty"):
        expand([], BASE, {}, "fp")


def test_splitting_a_pack_gives_one_job_per_concept():
    job = pack(expand(CONCEPTS[:2], BASE, {}, "fp"), 4)[0]
    singles = job.split()
    assert [s.names for s in singles] == [["a"], ["b"]]
    assert len({s.job_id for s in singles} | {job.job_id}) == 3


def test_a_sweep_over_the_erase_strength_gives_each_concept_one_candidate_per_value():
    """``guidance_scale`` is a concept field: a sweep over it sets it on every concept at each point; a
    concept's candidates get their own result keys and packs (a pack holds a name once), and a bad value
    is reported before any job."""
    tasks = expand(CONCEPTS[:2], BASE, {"guidance_scale": [4.0, 8.0], "lr": [1e-3]}, "fp")
    assert sorted((t.concept.name, t.concept.guidance_scale, t.trainer.lr) for t in tasks) == [
        ("a", 4.0, 1e-3), ("a", 8.0, 1e-3), ("b", 4.0, 1e-3), ("b", 8.0, 1e-3)]
    assert len({t.key for t in tasks}) == 4 and CONCEPTS[0].guidance_scale == 1.0  # the set is untouched
    jobs = pack(tasks, pack_size=8)
    assert sorted(sorted(j.names) for j in jobs) == [["a", "b"], ["a", "b"]]
    assert {frozenset(t.concept.guidance_scale for t in j.tasks) for j in jobs} == {frozenset([4.0]),
                                                                                   frozenset([8.0])}
    with pytest.raises(ConfigError, match="guidance_scale must be >= 0"):
        expand(CONCEPTS[:1], BASE, {"guidance_scale": [-1.0]}, "fp")
