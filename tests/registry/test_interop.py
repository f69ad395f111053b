"""Interop with the official SPM code (issue 13, items 18-19): its files load and register here, and
its inference script finds what it reads in ours.

The official code writes the kohya keys we write, with a header of ``prompts`` (the erased prompts,
comma-joined), ``rank`` and ``alpha`` only, and may save in half precision.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spm_train.membrane import MembraneBank, load_membrane
from spm_train.registry import Registry

from .conftest import make_membrane, run_cli


def _official_file(membrane, path, dtype=torch.float32) -> str:
    """What the official training script saves for ``membrane``: our tensors, its three header keys."""
    tensors = {k: v.to(dtype) for k, v in membrane.state_dict().items()}
    save_file(tensors, str(path), metadata={"prompts": ",".join(membrane.concepts), "rank": str(membrane.rank),
                                            "alpha": str(membrane.alpha)})
    return str(path)


def _unet_output(pipe, membrane) -> torch.Tensor:
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 16, 32)
    bank = MembraneBank.from_membranes(pipe.unet, [membrane])
    try:
        bank.set_permeability(torch.ones(1, 1))
        with torch.no_grad():
            return pipe.unet(sample, 10, encoder_hidden_states=context).sample
    finally:
        bank.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_official_file_loads_with_its_prompts_as_concepts_and_acts_like_ours(tmp_path, tiny_pipe, base_info,
                                                                                dtype):
    ours = make_membrane(tiny_pipe, "snoopy", 3, base_info["fingerprint"], target="snoopy")
    ours.concepts = ("snoopy", "a photo of snoopy")
    official = load_membrane(_official_file(ours, tmp_path / "snoopy_last.safetensors", dtype))
    assert official.concepts == ("snoopy", "a photo of snoopy") and official.family == "sd1"
    assert (official.rank, official.alpha) == (1, 1.0) and official.extra["source_format"] == "spm-official"
    if dtype == torch.float32:  # bit-compatible: the same tensors act the same
        assert torch.equal(_unet_output(tiny_pipe, official), _unet_output(tiny_pipe, ours))
    else:
        assert torch.allclose(_unet_output(tiny_pipe, official), _unet_output(tiny_pipe, ours), atol=1e-3)


def test_registry_import_accepts_an_official_file_as_not_validated(tmp_path, tiny_pipe, base_info):
    ours = make_membrane(tiny_pipe, "snoopy", 4, base_info["fingerprint"], target="a photo of snoopy")
    path = _official_file(ours, tmp_path / "snoopy_last.safetensors")
    root = str(tmp_path / "reg")
    result = run_cli("--root", root, "import", path, "--concept", "snoopy")
    assert result.returncode == 0 and "snoopy:v1  new  not_validated" in result.stdout, result.stderr
    reg = Registry.open(root)
    assert reg.resolve("snoopy@latest").ref == "snoopy:v1"
    assert reg.load("snoopy").concepts == ("a photo of snoopy",)
    named = run_cli("--root", root, "import", path)  # the concept defaults to the file's name
    assert named.returncode == 0 and "snoopy_last:v1" in named.stdout


def test_our_header_carries_the_prompts_the_official_inference_script_reads(tmp_path, tiny_pipe, base_info):
    m = make_membrane(tiny_pipe, "vangogh", 5, base_info["fingerprint"], target="painting by van gogh")
    path = m.save(str(tmp_path / "vangogh.safetensors"))
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["prompts"].split(",") == ["painting by van gogh"]
    assert int(meta["rank"]) == 1 and float(meta["alpha"]) == 1.0
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "prompts" not in load_membrane(path).extra  # read back as concepts, not kept twice
