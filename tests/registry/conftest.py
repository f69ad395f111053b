"""Tiny real membranes (the sd1 test architecture) and a registry in a temporary folder."""

import os
from dataclasses import dataclass
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_pipe():
    from spm_train.architectures import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def base_info(tiny_pipe):
    from spm_train.models import base_fingerprint

    return {"family": "sd1", "fingerprint": base_fingerprint(tiny_pipe.unet)}


def make_membrane(pipe, concept: str, seed: int, fingerprint: str, target: str | None = None):
    """A membrane of the tiny sd1 UNet with random (non-zero) up weights, so seeds give distinct bytes."""
    from spm_train.membrane import MembraneBank, layout_id

    g = torch.Generator().manual_seed(seed)
    layout = layout_id(pipe.unet)
    bank = MembraneBank.attach(pipe.unet, generators=[g])
    try:
        with torch.no_grad():
            for layer in bank.layers.values():
                layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.01)
        return bank.export(0, name=concept, concepts=(target or concept,), family="sd1",
                           layout=layout, base_fingerprint=fingerprint,
                           trainer={"seed": seed, "scope": "transformer", "iterations": 4})
    finally:
        bank.detach()


@pytest.fixture
def membrane_file(tmp_path, tiny_pipe, base_info):
    def build(concept: str = "snoopy", seed: int = 0) -> str:
        path = tmp_path / "src" / f"{concept}-{seed}.safetensors"
        make_membrane(tiny_pipe, concept, seed, base_info["fingerprint"]).save(str(path))
        return str(path)

    return build


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, env=None):
    """``python -m pipelines.registry ARGS`` in this process (same code path, no interpreter start-up)."""
    import contextlib
    import io

    from pipelines.registry import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli_process(*args, env=None, cwd=ROOT):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipelines.registry", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)
