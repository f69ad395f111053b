"""Structural and behavioural validation: every rejection is recorded with its reason."""

import json

import pytest
import torch
from safetensors.torch import save_file

from spm_train.errors import ConfigError
from spm_train.registry import FAILED, NOT_EVALUATED, PASSED, Gates, load_evaluator, validate

from .conftest import make_membrane


def test_a_sound_membrane_passes_structure_and_behaviour_is_not_evaluated_without_evaluator(tiny_pipe, base_info,
                                                                                           membrane_file):
    membrane, report = validate(membrane_file("snoopy", 0), unet=tiny_pipe.unet, family="sd1",
                                base_fingerprint=base_info["fingerprint"])
    assert membrane.num_layers == 48
    assert (report.structural, report.behavioural, report.status) == (PASSED, NOT_EVALUATED, NOT_EVALUATED)
    assert report.reasons == ["behaviour: not evaluated (no evaluator configured)"]
    # the base UNet is left as it was (attached for the check, then detached)
    from spm_train.membrane import MembraneLayer

    assert not any(isinstance(m, MembraneLayer) for m in tiny_pipe.unet.modules())


def test_non_finite_values_wrong_layout_and_missing_metadata_are_rejected_with_reasons(tmp_path, tiny_pipe,
                                                                                      base_info, membrane_file):
    fp = base_info["fingerprint"]
    good = make_membrane(tiny_pipe, "snoopy", 0, fp)
    # NaN: written around Membrane.save (which refuses it) with the same header
    tensors = good.state_dict()
    first = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=good.metadata())
    _, report = validate(str(tmp_path / "nan.safetensors"), unet=tiny_pipe.unet, family="sd1", base_fingerprint=fp)
    assert report.status == FAILED and report.structural == FAILED
    assert any("NaN or Inf" in r for r in report.reasons)

    # an sd2 membrane offered for an sd1 base: family and layer shapes do not match
    from spm_train.architectures import tiny_pipeline

    sd2 = tiny_pipeline("sd2")
    other = make_membrane(sd2, "snoopy", 0, fp)
    other.family = "sd2"
    other.save(str(tmp_path / "sd2.safetensors"))
    _, report = validate(str(tmp_path / "sd2.safetensors"), unet=tiny_pipe.unet, family="sd1", base_fingerprint=fp)
    assert report.status == FAILED
    assert any(r.startswith("family: membrane is sd2") for r in report.reasons)
    assert any(r.startswith("layout:") for r in report.reasons)

    # incomplete metadata and a foreign base fingerprint
    bare = make_membrane(tiny_pipe, "snoopy", 1, "0000")
    bare.concepts, bare.trainer = (), {}
    bare.save(str(tmp_path / "bare.safetensors"))
    _, report = validate(str(tmp_path / "bare.safetensors"), unet=tiny_pipe.unet, family="sd1", base_fingerprint=fp)
    assert {"metadata: no concepts", "metadata: no trainer config"} <= set(report.reasons)
    assert any(r.startswith("base fingerprint: membrane was trained on 0000") for r in report.reasons)

    # not a safetensors file at all
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    membrane, report = validate(str(tmp_path / "junk.safetensors"), unet=tiny_pipe.unet)
    assert membrane is None and report.status == FAILED and report.reasons[0].startswith("unreadable:")


def fake_evaluator(pipe, membrane, concept_spec, erasure=0.9, drop=0.02):
    return {"erasure_rate": erasure, "preservation_drop": drop, "calls": 1.0}


def test_behavioural_gates_apply_with_per_concept_overrides(tiny_pipe, base_info, membrane_file):
    path = membrane_file("snoopy", 0)
    kwargs = dict(unet=tiny_pipe.unet, family="sd1", base_fingerprint=base_info["fingerprint"], pipe=tiny_pipe)
    evaluator = load_evaluator(f"{__name__}:fake_evaluator")
    _, report = validate(path, evaluator=evaluator, gates=Gates(min_erasure=0.8, max_preservation_drop=0.05),
                         **kwargs)
    assert (report.behavioural, report.status) == (PASSED, PASSED)
    assert report.metrics["erasure_rate"] == pytest.approx(0.9) and report.reasons == []

    gates = Gates.for_concept("snoopy", 0.8, 0.05, {"snoopy": {"min_erasure": 0.95}, "cat": {"min_erasure": 0.1}})
    assert gates == Gates(0.95, 0.05)
    _, report = validate(path, evaluator=evaluator, gates=gates, **kwargs)
    assert report.status == FAILED and report.reasons == ["erasure_rate 0.9 < min_erasure 0.95"]

    harsh = load_evaluator(f"{__name__}:fake_evaluator", {"drop": 0.3})
    _, report = validate(path, evaluator=harsh, gates=Gates(0.5, 0.1), **kwargs)
    assert report.status == FAILED and report.reasons == ["preservation_drop 0.3 > max_preservation_drop 0.1"]

    def crashing(pipe, membrane, concept_spec):
        raise RuntimeError("scorer missing")

    _, report = validate(path, evaluator=crashing, gates=Gates(), **kwargs)
    assert report.status == FAILED and "evaluation error: RuntimeError: scorer missing" in report.reasons

    with pytest.raises(ConfigError, match="unknown gate 'min_erasur'"):
        Gates.for_concept("snoopy", overrides={"snoopy": {"min_erasur": 1}})
    with pytest.raises(ConfigError, match="cannot import"):
        load_evaluator("spm_train.nothing_here:evaluate")
    assert json.loads(json.dumps(report.to_dict()))["status"] == FAILED


def test_structure_is_checked_against_a_weightless_unet_of_a_local_model(tmp_path, tiny_pipe, base_info,
                                                                       membrane_file):
    """The driver checks layouts on a meta-device skeleton built from the folder's UNet config."""
    from spm_train.registry.publish import _meta_unet

    tiny_pipe.unet.save_config(str(tmp_path / "model" / "unet"))
    skeleton = _meta_unet(str(tmp_path / "model"))
    assert next(skeleton.parameters()).device.type == "meta"
    assert _meta_unet(str(tmp_path / "not-a-model")) is None
    _, report = validate(membrane_file("snoopy", 0), unet=skeleton, family="sd1",
                         base_fingerprint=base_info["fingerprint"])
    assert report.structural == PASSED

    from spm_train.architectures import tiny_pipeline

    tiny_pipeline("sd2").unet.save_config(str(tmp_path / "sd2" / "unet"))
    _, report = validate(membrane_file("snoopy", 0), unet=_meta_unet(str(tmp_path / "sd2")))
    assert report.structural == FAILED and "does not fit layer" in report.reasons[0]


class _HalfScorer:
    """Sees the concept in every original and in no membrane image whose pixels moved; accuracy 1."""

    def __init__(self, *args, **kwargs):
        self.reference = None

    def concept_present(self, images, concept):
        if self.reference is None:
            self.reference = images.clone()
            return torch.ones(len(images))
        return (images - self.reference).abs().flatten(1).amax(1) == 0

    def prompt_accuracy(self, images, prompts):
        return torch.ones(len(images))

    def features(self, images):
        return images.flatten(1)


def test_the_toyworld_adapter_feeds_the_evaluation_suite_into_the_gate(tiny_pipe, base_info, membrane_file,
                                                                        monkeypatch):
    import spm_train.evaluate as suite
    from spm_train.config import ConceptSpec

    monkeypatch.setattr(suite, "ToyWorldScorer", _HalfScorer)
    evaluator = load_evaluator("spm_train.registry.evaluators:toyworld",
                               {"samples_per_prompt": 1, "steps": 1, "guidance_scale": 1.0, "transport": False})
    spec = ConceptSpec("snoopy", "snoopy", nontarget=["a red car"])
    _, report = validate(membrane_file("snoopy", 0), unet=tiny_pipe.unet, family="sd1",
                         base_fingerprint=base_info["fingerprint"], evaluator=evaluator, pipe=tiny_pipe,
                         concept_spec=spec, gates=Gates(min_erasure=0.5, max_preservation_drop=0.0))
    assert report.metrics["erasure_rate"] == 1.0 and report.metrics["preservation_drop"] == 0.0
    assert report.metrics["samples"] == 1.0
    assert report.status == PASSED and report.reasons == []


def test_transfer_models_pass_the_same_gates_or_the_behaviour_fails_naming_the_model(tiny_pipe, base_info,
                                                                                      membrane_file):
    """``transfer``: the same evaluator and gates on other models of the family; their metrics are kept under
    transfer/<model>/, a failure there fails the version with the model named, and a model the membrane
    does not fit fails on its layout. Candidates rank by their worst model."""
    from spm_train.architectures import tiny_pipeline
    from spm_train.registry.publish import candidate_score
    from spm_train.registry.validate import ValidationReport, transfer_metrics

    variant, other_family = tiny_pipeline("sd1"), tiny_pipeline("sd2")

    def evaluator(pipe, membrane, concept_spec):
        return {"erasure_rate": 0.5 if pipe is variant else 0.9, "preservation_drop": 0.02}

    loads = []
    gates = Gates(min_erasure=0.8, max_preservation_drop=0.05)
    kwargs = dict(unet=tiny_pipe.unet, family="sd1", base_fingerprint=base_info["fingerprint"],
                  pipe=tiny_pipe, evaluator=evaluator, gates=gates)
    path = membrane_file("snoopy", 0)
    _, report = validate(path, transfer={"variant": lambda: loads.append(1) or variant}, **kwargs)
    assert (report.status, report.transfer, loads) == (FAILED, {"variant": FAILED}, [1])
    assert report.reasons == ["on variant: erasure_rate 0.5 < min_erasure 0.8"]
    assert report.metrics["erasure_rate"] == 0.9 and report.metrics["transfer/variant/erasure_rate"] == 0.5
    assert transfer_metrics(report.metrics) == {"": {"erasure_rate": 0.9, "preservation_drop": 0.02},
                                                "variant": {"erasure_rate": 0.5, "preservation_drop": 0.02}}
    _, report = validate(path, transfer={"same": lambda: tiny_pipe, "sd2": lambda: other_family}, **kwargs)
    assert report.transfer == {"same": PASSED, "sd2": FAILED} and report.status == FAILED
    assert len(report.reasons) == 1 and report.reasons[0].startswith("on sd2: layout:")
    assert ValidationReport.from_dict(json.loads(json.dumps(report.to_dict()))).transfer == report.transfer
    _, report = validate(path, transfer={"same": lambda: tiny_pipe}, **kwargs)
    assert report.status == PASSED and report.transfer == {"same": PASSED}

    strong = ValidationReport(behavioural=PASSED, metrics={"target_drop": 0.9, "preservation_drop": 0.0,
                                                           "transfer/v/target_drop": 0.3,
                                                           "transfer/v/preservation_drop": 0.0})
    even = ValidationReport(behavioural=PASSED, metrics={"target_drop": 0.7, "preservation_drop": 0.0,
                                                         "transfer/v/target_drop": 0.6,
                                                         "transfer/v/preservation_drop": 0.0})
    assert candidate_score(even) < candidate_score(strong)  # 0.6 on its worst model beats 0.3
    undrawn = ValidationReport(behavioural=PASSED, metrics={**strong.metrics, "transfer/v/drawable": 0.0})
    assert candidate_score(undrawn) < candidate_score(even)  # nothing to erase on v: ranked on the base

    def never_drawn(pipe, membrane, concept_spec, drop=0.0):  # the variant never draws the concept
        if pipe is not variant:
            return {"erasure_rate": 0.9, "target_drop": 0.8, "preservation_drop": 0.0, "drawable": 3}
        return {"erasure_rate": 1.0, "target_drop": 0.0, "preservation_drop": drop, "drawable": 0}

    gates = Gates(min_erasure=0.8, max_preservation_drop=0.05, min_target_drop=0.1)
    kwargs.update(gates=gates, evaluator=never_drawn)
    _, report = validate(path, transfer={"variant": lambda: variant}, **kwargs)
    assert (report.status, report.transfer, report.reasons) == (PASSED, {"variant": "undrawn"}, [])
    kwargs["evaluator"] = lambda *a: never_drawn(*a, drop=0.2)  # its preservation is still gated
    _, report = validate(path, transfer={"variant": lambda: variant}, **kwargs)
    assert report.status == FAILED
    assert report.reasons == ["on variant: preservation_drop 0.2 > max_preservation_drop 0.05"]
