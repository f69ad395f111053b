import logging
import os

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sd1_pipe():
    from spm_train.architectures import tiny_pipeline

    return tiny_pipeline("sd1", seed=0)


@pytest.fixture
def fresh_sd1():
    from spm_train.architectures import tiny_pipeline

    return tiny_pipeline("sd1", seed=0)


@pytest.fixture
def ray_shutdown():
    import ray

    yield
    ray.shutdown()


def tiny_clip(directory=None):
    """A tiny random CLIPModel and its word-level tokenizer (saved to ``directory`` when given)."""
    import tempfile

    from transformers import CLIPConfig, CLIPModel

    from spm_train.architectures import TINY_WORDS
    from spm_train.toyworld.tokenizer import build_word_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_word_tokenizer(TINY_WORDS, str(directory or tmp))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    if directory is not None:
        model.save_pretrained(directory)
    return model, tok
