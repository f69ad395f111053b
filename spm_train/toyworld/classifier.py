"""The ToyWorld attribute classifier: a small CNN with one head each for shape, colour and style.

It is the measuring instrument of ToyWorld: erasure and preservation are read off its predictions on
generated images, and its penultimate features give a feature distance between image sets. It is trained
on renders degraded by blur and noise so that it reads the slightly soft images a diffusion model makes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import COLOURS, SHAPES, STYLES

log = logging.getLogger(__name__)

HEADS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}
WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"


@dataclass
class ClassifierConfig:
    channels: tuple[int, ...] = (24, 48, 96)
    feature_dim: int = 128
    heads: dict = None  # head name -> list of class names

    def __post_init__(self):
        if self.heads is None:
            self.heads = {k: list(v) for k, v in HEADS.items()}
        self.channels = tuple(self.channels)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class ToyWorldClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        blocks, c_in = [], 3
        for i, c in enumerate(self.config.channels):
            blocks.append(_conv_block(c_in, c))
            if i < len(self.config.channels) - 1:
                blocks.append(nn.MaxPool2d(2))
            c_in = c
        self.body = nn.Sequential(*blocks)
        # Average and max pooling: position-free, and max keeps small details such as dots.
        self.neck = nn.Sequential(nn.Linear(2 * c_in, self.config.feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(self.config.feature_dim, len(classes))
                                    for name, classes in self.config.heads.items()})

    @staticmethod
    def prepare(images) -> torch.Tensor:
        """uint8 (N,H,W,3) / (N,3,H,W) arrays or tensors, or floats in [0, 1], to float (N,3,H,W) in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x * 2 - 1

    def features(self, images) -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim)."""
        device = next(self.parameters()).device
        h = self.body(self.prepare(images).to(device))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.neck(pooled)

    def forward(self, images) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, images, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Predicted class index per head, e.g. ``{"shape": tensor([...]), ...}`` (on CPU)."""
        was_training = self.training
        self.eval()
        outs = {name: [] for name in self.heads}
        for i in range(0, len(images), batch_size):
            for name, logits in self(images[i:i + batch_size]).items():
                outs[name].append(logits.argmax(1).cpu())
        self.train(was_training)
        return {name: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for name, v in outs.items()}


def accuracy(classifier: ToyWorldClassifier, images, labels: np.ndarray) -> dict[str, float]:
    """Per-head accuracy against (N, 3) labels ordered (shape, colour, style)."""
    preds = classifier.classify(images)
    labels = torch.as_tensor(labels)
    return {name: float((preds[name] == labels[:, i]).float().mean()) for i, name in enumerate(HEADS)}


def degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and contrast changes on images in [-1, 1], imitating decoded generations."""
    n = x.shape[0]
    # Blur: mix each image with its 3x3 box-blurred self by a random amount.
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=generator) * 0.8
    x = x * (1 - amount) + blurred * amount
    scale = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    return (x * scale + shift + noise).clamp(-1, 1)


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int, seed: int, device,
                     batch_size: int = 128, lr: float = 2e-3) -> ToyWorldClassifier:
    """Train on uint8 renders (N, 32, 32, 3) with (N, 3) labels; returns the model in eval mode."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ToyWorldClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, steps)))))
    x_all = ToyWorldClassifier.prepare(images)
    y_all = torch.as_tensor(labels)
    model.train()
    for step in (bar := tqdm(range(steps), desc="classifier", mininterval=5)):
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x = degrade(x_all[idx], gen).to(device)
        y = y_all[idx].to(device)
        h = model.body(x)
        f = model.neck(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))
        loss = sum(F.cross_entropy(head(f), y[:, i]) for i, head in enumerate(model.heads.values()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("classifier step %d loss %.4f", step, loss.item())
    return model.eval()


def save_classifier(model: ToyWorldClassifier, out_dir: str | Path, metrics: dict | None = None) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "model": "ToyWorldClassifier"})
    cfg = asdict(model.config)
    cfg["channels"] = list(cfg["channels"])
    if metrics:
        cfg["heldout_accuracy"] = metrics
    (out_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))


def load_classifier_from(directory: str | Path, device="cpu") -> ToyWorldClassifier:
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / CONFIG_NAME).read_text())
    cfg.pop("heldout_accuracy", None)
    model = ToyWorldClassifier(ClassifierConfig(**cfg))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return model.to(device).eval()
