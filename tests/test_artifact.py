"""The membrane file: safetensors with kohya keys and JSON metadata, loadable by diffusers, refused when bad."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spm_train import (IncompatibleMembraneError, MembraneBank, MembraneFormatError, apply_membranes,
                       load_membrane)
from spm_train.architectures import tiny_pipeline
from spm_train.membrane import Membrane


def _trained_like(pipe, seed=3, name="cat", concepts=("a photo of a cat",)) -> Membrane:
    bank = MembraneBank.attach(pipe.unet, generators=[torch.Generator().manual_seed(seed)])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.05)
    membrane = bank.export(0, name=name, concepts=concepts, family="sd1", layout="x", base_fingerprint="f",
                           trainer={"lr": 1e-4})
    bank.detach()
    return membrane


def test_save_load_round_trip_with_kohya_keys_and_metadata(sd1_pipe, tmp_path):
    membrane = _trained_like(sd1_pipe)
    path = membrane.save(tmp_path / "cat.safetensors")
    with safe_open(path, framework="pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in keys
    assert len(keys) == 3 * 48
    assert json.loads(meta["concepts"]) == ["a photo of a cat"]
    assert {meta[k] for k in ("family", "rank", "format_version")} == {"sd1", "1"}
    loaded = load_membrane(path)
    assert loaded.name == "cat" and loaded.rank == 1 and loaded.alpha == 1.0
    assert loaded.trainer == {"lr": 1e-4}
    for key, (down, up) in membrane.weights.items():
        assert torch.equal(loaded.weights[key][0], down) and torch.equal(loaded.weights[key][1], up)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_diffusers_load_lora_weights_matches_our_unet_at_gamma_one(tmp_path):
    ours, theirs = tiny_pipeline("sd1", seed=0), tiny_pipeline("sd1", seed=0)
    membrane = _trained_like(ours)
    path = membrane.save(tmp_path / "cat.safetensors")
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([400, 400])
    with torch.no_grad():
        base = ours.unet(x, t, encoder_hidden_states=ehs).sample
        with apply_membranes(ours, [load_membrane(path)], transport=False):
            mine = ours.unet(x, t, encoder_hidden_states=ehs).sample
        theirs.load_lora_weights(str(path))
        reference = theirs.unet(x, t, encoder_hidden_states=ehs).sample
    assert (mine - base).abs().max() > 1e-3  # the membrane does something
    torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture
def saved(sd1_pipe, tmp_path):
    membrane = _trained_like(sd1_pipe)
    path = membrane.save(tmp_path / "good.safetensors")
    with safe_open(path, framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def test_nan_weights_are_refused(saved, tmp_path):
    tensors, meta = saved
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    with pytest.raises(MembraneFormatError, match="NaN or Inf"):
        load_membrane(_write(tmp_path / "nan.safetensors", tensors, meta))


def test_unknown_keys_are_refused(saved, tmp_path):
    tensors, meta = saved
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(1, 4)
    with pytest.raises(MembraneFormatError, match="unknown key 'lora_te_"):
        load_membrane(_write(tmp_path / "k.safetensors", tensors, meta))


def test_non_positive_rank_and_missing_metadata_are_refused(saved, tmp_path):
    tensors, meta = saved
    with pytest.raises(MembraneFormatError, match="rank must be positive"):
        load_membrane(_write(tmp_path / "r.safetensors", tensors, dict(meta, rank="0")))
    partial = {k: v for k, v in meta.items() if k != "base_fingerprint"}
    with pytest.raises(MembraneFormatError, match="metadata lacks base_fingerprint"):
        load_membrane(_write(tmp_path / "m.safetensors", tensors, partial))


@pytest.mark.parametrize("alpha", ["nan", "inf", "0", "-1"])
def test_alpha_must_be_positive_and_finite(saved, tmp_path, alpha):
    tensors, meta = saved
    tensors = {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    with pytest.raises(MembraneFormatError, match="alpha must be a positive finite number"):
        load_membrane(_write(tmp_path / "a.safetensors", tensors, dict(meta, alpha=alpha, ss_network_alpha=alpha)))


@pytest.mark.parametrize("concepts", ['"snoopy"', '{"snoopy": 1}', "[1, 2]", '[""]', "[snoopy"])
def test_concepts_must_be_a_list_of_names(saved, tmp_path, concepts):
    tensors, meta = saved
    with pytest.raises(MembraneFormatError, match="concepts must be a JSON list|malformed metadata"):
        load_membrane(_write(tmp_path / "c.safetensors", tensors, dict(meta, concepts=concepts)))


def test_weights_of_the_wrong_dimensionality_are_format_errors(saved, tmp_path):
    tensors, meta = saved
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    down = up.replace("lora_up", "lora_down")
    for key, value in ((up, tensors[up].reshape(-1)), (up, tensors[up].unsqueeze(-1)), (down, tensors[down][0, 0])):
        bad = dict(tensors, **{key: value})
        with pytest.raises(MembraneFormatError, match="neither a Linear's"):
            load_membrane(_write(tmp_path / "d.safetensors", bad, meta))


def test_garbage_and_missing_files_get_one_line(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(MembraneFormatError, match="not a readable safetensors file"):
        load_membrane(bad)
    with pytest.raises(MembraneFormatError, match="not found"):
        load_membrane(tmp_path / "absent.safetensors")


def test_a_membrane_of_another_family_does_not_attach(sd1_pipe, tmp_path):
    membrane = _trained_like(sd1_pipe)
    xl = tiny_pipeline("sdxl")
    with pytest.raises(IncompatibleMembraneError, match="lacks|does not fit"):
        apply_membranes(xl, [membrane])
    assert not any(type(m).__name__ == "MembraneLayer" for m in xl.unet.modules())
    sd2 = tiny_pipeline("sd2")  # same layer names, linear instead of 1x1-conv projections
    with pytest.raises(IncompatibleMembraneError, match="does not fit layer"):
        apply_membranes(sd2, [membrane])


def test_saving_invalid_weights_leaves_no_file(sd1_pipe, tmp_path):
    membrane = _trained_like(sd1_pipe)
    target = tmp_path / "cat.safetensors"
    membrane.save(target)
    before = target.read_bytes()
    key = next(iter(membrane.weights))
    membrane.weights[key][1][0, 0] = float("inf")
    with pytest.raises(MembraneFormatError):
        membrane.save(target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["cat.safetensors"]
