"""Build the shipped ToyWorld assets: classifier, base pipeline, variant pipeline, quality report.

    python -m spm_train.toyworld.build                      # full build into spm_train/toyworld/assets
    python -m spm_train.toyworld.build --smoke --out /tmp/tw  # a few steps of every stage
    SPM_TOYWORLD=wide python -m spm_train.toyworld.build --device cuda  # the wide world, into assets-wide

Stages (each writes into ``--work-dir`` so that a crashed build resumes where it stopped):
data pool -> classifier -> VAE (+ decoder fine-tune on frozen-encoder latents) -> UNet + text encoder
jointly, with caption dropout for classifier-free guidance and an EMA of the weights -> quality measured on
the saved pipeline -> variant UNet fine-tuned on a shifted palette.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import atomic_output
from . import ASSETS
from . import classifier as clf
from .model import (encode_prompts, link_shared_components, make_pipeline, make_scheduler, make_text_encoder,
                    make_tokenizer, make_unet, make_vae, save_pipeline)
from .quality import measure_quality
from .render import (VARIANT_BACKGROUNDS, VARIANT_COLOUR_RGB, WORLD, WORLD_ENV, caption, make_batch,
                     scene_labels)

log = logging.getLogger("spm_train.toyworld.build")

DEFAULT_OUT = ASSETS
# at least 1,000 quality generations whatever the world's number of combinations (100 classic, 480 wide)
_PER_COMBO = max(1, math.ceil(1000 / WORLD.combinations()))


@dataclass
class BuildConfig:
    out: str = str(DEFAULT_OUT)
    work_dir: str = "runs/toyworld_build"
    seed: int = 0
    device: str = "cpu"
    pool_size: int = 60_000
    classifier_steps: int = 1000
    vae_steps: int = 2000
    decoder_steps: int = 700
    vae_batch: int = 64
    steps: int = 8000  # UNet steps (upper bound; --unet-minutes may cut the plan shorter)
    unet_minutes: float = 48.0
    batch: int = 128
    lr: float = 5e-4
    warmup: int = 200
    caption_dropout: float = 0.12
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    quality_per_combo: int = _PER_COMBO  # two standard deviations of a style estimate at 1,000: about 0.03
    variant_steps: int = 300
    variant_pool: int = 20_000
    guidance: float = 3.0
    sampling_steps: int = 25
    # The generative model learns upright shapes turned by at most this much (degrees); the classifier
    # learns every orientation. Full turns cost the 8x8-latent UNet its corners (squares drawn as circles).
    max_rotation: float | None = 12.0


# ----------------------------------------------------------------------------------------------- helpers
def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _cosine_lr(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _progress_lr(step: int, warmup: int, progress: float, floor: float = 0.05) -> float:
    """Warm-up by steps, then cosine decay over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, **meta) -> None:
    """Write safetensors under a temporary name and rename: a kill mid-save keeps the previous file."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in meta.items()})


def _save_state(module: torch.nn.Module, path: Path, **meta) -> None:
    _save_tensors(module.state_dict(), path, **meta)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and its metadata."""
    from safetensors.torch import load_file

    return load_file(str(path)), _read_meta(path)


def _read_meta(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _load_state(module: torch.nn.Module, path: Path) -> dict:
    state, meta = _read_tensors(path)
    module.load_state_dict(state)
    return meta


def _load_prefixed(module: torch.nn.Module, flat: dict[str, torch.Tensor], name: str) -> None:
    """Load ``module`` from the ``<name>/...`` entries of a flat checkpoint (``_training_state``)."""
    module.load_state_dict({k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(f"{name}/")})


def _training_state(modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Modules' weights and the optimizer's per-parameter moments, flat, for one safetensors checkpoint."""
    flat = {f"{name}/{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        flat.update({f"opt/{i}/{k}": torch.as_tensor(v) for k, v in state.items()})
    return flat


def _restore_training_state(flat: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
                            opt: torch.optim.Optimizer) -> None:
    for name, m in modules.items():
        _load_prefixed(m, flat, name)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        if key.startswith("opt/"):
            _, i, k = key.split("/", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _step_streams(seed: int, step: int) -> tuple[torch.Generator, np.random.Generator]:
    """Random streams of one training step, from (seed, step) alone: a resumed run draws what an
    uninterrupted one would."""
    entropy = np.random.SeedSequence([seed, step]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0])), np.random.default_rng(int(entropy[1]))


class _EMA:
    """Exponential moving average of a set of modules' parameters (buffers copied)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for shadow, live in zip(self.shadow, self.modules):
            for ps, pl in zip(shadow.parameters(), live.parameters()):
                ps.lerp_(pl.detach(), 1 - d)


# ------------------------------------------------------------------------------------------------ stages
def _setup_pool(cfg: BuildConfig, max_rotation: float | None = None):
    t0 = time.time()
    images, _, scenes = make_batch(cfg.pool_size, seed=cfg.seed, max_rotation=max_rotation)
    log.info("rendered a pool of %d scenes (rotation %s) in %.0f s", len(scenes),
             "any" if max_rotation is None else f"within {max_rotation} degrees", time.time() - t0)
    return images, scenes


def _stage_classifier(cfg: BuildConfig, out: Path):
    """The classifier learns every orientation, whatever the generative pool's ``max_rotation``."""
    target = out / "classifier"
    if (target / clf.WEIGHTS_NAME).exists():
        log.info("classifier: reusing %s", target)
        return clf.load_classifier_from(target, cfg.device)
    images, scenes = _setup_pool(cfg)
    model = clf.train_classifier(images, scene_labels(scenes), cfg.classifier_steps, cfg.seed, cfg.device)
    held, _, held_scenes = make_batch(2000, seed=cfg.seed + 10_001)
    acc = clf.accuracy(model, held, scene_labels(held_scenes))
    log.info("classifier held-out accuracy %s", acc)
    clf.save_classifier(model, target, metrics=acc)
    return model


def _stage_vae(cfg: BuildConfig, images, scenes, classifier, work: Path):
    path = work / "vae.safetensors"
    vae = make_vae(cfg.seed).to(cfg.device)
    if path.exists():
        meta = _load_state(vae, path)
        vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
        log.info("vae: reusing %s (scaling factor %s)", path, meta["scaling_factor"])
        return vae.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x_all = _to_float(images)

    def batches(steps, desc):
        for step in (bar := tqdm(range(steps), desc=desc, mininterval=5)):
            idx = torch.randint(len(x_all), (cfg.vae_batch,), generator=gen)
            yield step, bar, x_all[idx].to(cfg.device)

    # Joint training: reconstruction + a small KL that keeps the latents near unit scale.
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for step, bar, x in batches(cfg.vae_steps, "vae"):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * _cosine_lr(step, 100, cfg.vae_steps)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / (4 * 8 * 8)
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("vae step %d loss %.4f kl %.2f", step, loss.item(), kl.item())
    # Decoder fine-tune on the frozen encoder's latents: the tiny decoder otherwise loses fine style detail.
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    for step, bar, x in batches(cfg.decoder_steps, "vae decoder"):
        for g in opt.param_groups:
            g["lr"] = 5e-4 * _cosine_lr(step, 50, cfg.decoder_steps)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("vae decoder step %d loss %.4f", step, loss.item())
    vae.requires_grad_(True).eval()
    with torch.no_grad():
        z = vae.encode(x_all[:2000].to(cfg.device)).latent_dist.sample()
        scaling = float(1.0 / z.std())
        rec = vae.decode(z[:1000]).sample
    vae.register_to_config(scaling_factor=scaling)
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    acc = clf.accuracy(classifier, rec_u8, scene_labels(scenes[:1000]))
    log.info("vae: latent std %.3f -> scaling factor %.4f; classifier on reconstructions %s", 1 / scaling,
             scaling, acc)
    _save_state(vae, path, scaling_factor=scaling, recon_accuracy=json.dumps(acc))
    return vae


@torch.no_grad()
def _encode_pool(vae, images: np.ndarray, device, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, scaled by the VAE's scaling factor."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode pool", mininterval=5):
        post = vae.encode(_to_float(images[i:i + batch]).to(device)).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


class _CaptionSampler:
    """Fresh captions for pool scenes every step; tokenization cached per distinct caption."""

    def __init__(self, scenes, tokenizer, seed: int, dropout: float):
        self.scenes, self.tokenizer, self.dropout = scenes, tokenizer, dropout
        self.rng = np.random.default_rng(seed)
        self.cache: dict[str, torch.Tensor] = {}

    def ids(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = self.rng if rng is None else rng
        out = []
        for i in idx:
            text = "" if rng.random() < self.dropout else caption(self.scenes[i], rng)
            if text not in self.cache:
                self.cache[text] = self.tokenizer(text, padding="max_length", truncation=True,
                                                  max_length=self.tokenizer.model_max_length,
                                                  return_tensors="pt").input_ids[0]
            out.append(self.cache[text])
        return torch.stack(out)


def _diffusion_step(unet, text_encoder, scheduler, latents, ids, gen, device):
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    cond = text_encoder(ids.to(device))[0]
    pred = unet(noisy.to(device), t.to(device), cond).sample
    return F.mse_loss(pred, noise.to(device))


@torch.no_grad()
def _guidance_gap(unet, text_encoder, tokenizer, scheduler, latents, scenes, device, seed: int) -> float:
    """Relative size of cond - uncond noise predictions on pool latents: the signal the erasure uses."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    prompts = [caption(s, rng) for s in scenes]
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.full((latents.shape[0],), 500)
    noisy = scheduler.add_noise(latents, noise, t).to(device)
    c = encode_prompts(tokenizer, text_encoder, prompts, device)
    u = encode_prompts(tokenizer, text_encoder, [""] * len(prompts), device)
    ec, eu = unet(noisy, t.to(device), c).sample, unet(noisy, t.to(device), u).sample
    return float((ec - eu).norm() / eu.norm())


def _stage_unet(cfg: BuildConfig, latents_mean, latents_std, scenes, tokenizer, work: Path):
    """Train UNet + text encoder jointly; returns the EMA copies (UNet, text encoder)."""
    final = work / "unet_ema.safetensors"
    unet, text_encoder = make_unet(cfg.seed).to(cfg.device), make_text_encoder(tokenizer, cfg.seed).to(cfg.device)
    ema = _EMA([unet, text_encoder], cfg.ema_decay)
    if final.exists():
        _load_state(ema.shadow[0], final)
        _load_state(ema.shadow[1], work / "text_ema.safetensors")
        log.info("unet: reusing %s", final)
        return ema.shadow[0], ema.shadow[1]
    scheduler = make_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    # One checkpoint file holds weights, EMA and the optimizer's moments, and every step's noise and captions
    # come from (seed, step): under a step plan (--unet-minutes 0) a build killed at any point resumes from its
    # last checkpoint to the weights an uninterrupted build reaches, so a long CPU build can span sessions.
    modules = {"unet": unet, "text": text_encoder, "unet_ema": ema.shadow[0], "text_ema": ema.shadow[1]}
    start, elapsed_before, ckpt = 0, 0.0, work / "unet_ckpt.safetensors"
    plans = [[0, cfg.steps]]  # [first step, planned steps] of each plan the learning rate followed
    if ckpt.exists():
        flat, meta = _read_tensors(ckpt)
        _restore_training_state(flat, modules, opt)
        start, elapsed_before = int(meta["step"]), float(meta["elapsed_s"])
        plans = json.loads(meta["plans"]) if "plans" in meta else [[0, None]]
        log.info("unet: resuming from step %d", start)
        if plans[-1][1] != cfg.steps:
            log.warning("unet: the plan changes from %s to %d steps at step %d; the learning rate follows the "
                        "new plan from here, so the weights are those of neither plan run uninterrupted (the "
                        "plans are recorded in the checkpoint and in quality.json)", plans[-1][1], cfg.steps,
                        start)
            plans.append([start, cfg.steps])
    captions = _CaptionSampler(scenes, tokenizer, cfg.seed + 2, cfg.caption_dropout)
    # The schedule runs on max(step progress, time progress): on a shared 2-core machine the speed varies, and
    # the cosine must still reach its floor when the time budget (--unet-minutes) runs out.
    budget_s = cfg.unet_minutes * 60 if cfg.unet_minutes > 0 else float("inf")
    unet.train(), text_encoder.train()
    t_start, step = time.time(), start
    bar = tqdm(range(start, cfg.steps), desc="unet+text", mininterval=10)
    for step in bar:
        elapsed = elapsed_before + time.time() - t_start
        progress = max(step / cfg.steps, elapsed / budget_s)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _progress_lr(step, cfg.warmup, progress)
        gen, rng = _step_streams(cfg.seed + 3, step)
        idx = torch.randint(len(latents_mean), (cfg.batch,), generator=gen)
        lat = latents_mean[idx] + latents_std[idx] * torch.randn(latents_std[idx].shape, generator=gen)
        loss = _diffusion_step(unet, text_encoder, scheduler, lat, captions.ids(idx.numpy(), rng), gen,
                               cfg.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("unet step %d (%.0f%% of plan) loss %.4f lr %.2e", step, 100 * progress, loss.item(),
                     opt.param_groups[0]["lr"])
        if (step + 1) % cfg.checkpoint_every == 0:
            gap = _guidance_gap(ema.shadow[0], ema.shadow[1], tokenizer, scheduler, latents_mean[:256],
                                scenes[:256], cfg.device, cfg.seed)
            log.info("unet step %d: EMA cond/uncond gap |e_c - e_u| / |e_u| = %.3f", step + 1, gap)
            _save_tensors(_training_state(modules, opt), ckpt, step=step + 1,
                          elapsed_s=elapsed_before + time.time() - t_start, plans=json.dumps(plans))
    log.info("unet: trained %d steps in %.1f min", step + 1 - start, (time.time() - t_start) / 60)
    _save_state(unet, work / "unet_raw.safetensors")
    _save_state(text_encoder, work / "text_raw.safetensors")
    _save_state(ema.shadow[1], work / "text_ema.safetensors")
    _save_state(ema.shadow[0], final, plans=json.dumps(plans))  # last: its presence marks the stage done
    return ema.shadow[0], ema.shadow[1]


def _stage_variant(cfg: BuildConfig, base_unet, text_encoder, vae, tokenizer, work: Path):
    """Briefly fine-tune a copy of the base UNet on a shifted palette (text encoder frozen)."""
    images, _, scenes = make_batch(cfg.variant_pool, seed=cfg.seed + 20_000, palette=VARIANT_COLOUR_RGB,
                                   backgrounds=VARIANT_BACKGROUNDS, max_rotation=cfg.max_rotation)
    mean, std = _encode_pool(vae, images, cfg.device)
    unet = copy.deepcopy(base_unet).train().requires_grad_(True)
    text_encoder = text_encoder.eval().requires_grad_(False)
    scheduler = make_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4, weight_decay=0.01)
    captions = _CaptionSampler(scenes, tokenizer, cfg.seed + 21_000, cfg.caption_dropout)
    gen = torch.Generator().manual_seed(cfg.seed + 22_000)
    for step in (bar := tqdm(range(cfg.variant_steps), desc="variant", mininterval=10)):
        idx = torch.randint(len(mean), (cfg.batch,), generator=gen)
        lat = mean[idx] + std[idx] * torch.randn(std[idx].shape, generator=gen)
        loss = _diffusion_step(unet, text_encoder, scheduler, lat, captions.ids(idx.numpy()), gen, cfg.device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("variant step %d loss %.4f", step, loss.item())
    return unet.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- a build in progress
def checkpoint_pipeline(cfg: BuildConfig):
    """The UNet stage's latest checkpoint (its EMA weights) as a pipeline with the build's VAE and tokenizer,
    and the checkpoint's step: how far a long build has come, measured while it runs (checkpoints are
    written by rename, so a running build never shows a half-written one)."""
    import tempfile

    work = Path(cfg.work_dir)
    ckpt, vae_path = work / "unet_ckpt.safetensors", work / "vae.safetensors"
    missing = [str(p) for p in (ckpt, vae_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no UNet checkpoint to measure in {work}: {', '.join(missing)} missing "
                                "(the build writes them at the end of the VAE stage and every --checkpoint-every "
                                "UNet steps)")
    vae = _stage_vae(cfg, None, None, None, work)
    with tempfile.TemporaryDirectory() as tmp:  # the merges are deterministic: the build's token ids
        tokenizer = make_tokenizer(Path(tmp) / "tokenizer")
    unet, text_encoder = make_unet(cfg.seed), make_text_encoder(tokenizer, cfg.seed)
    flat, meta = _read_tensors(ckpt)
    _load_prefixed(unet, flat, "unet_ema")
    _load_prefixed(text_encoder, flat, "text_ema")
    pipe = make_pipeline(vae, text_encoder.eval(), tokenizer, unet.eval()).to(cfg.device)
    return pipe, int(meta["step"])


def measure_checkpoint(cfg: BuildConfig, per_combo: int = 1) -> dict:
    """Generation quality of the latest checkpoint (``per_combo`` images of every combination), written to
    ``<work-dir>/checkpoint_quality.json`` beside the step it was measured at."""
    pipe, step = checkpoint_pipeline(cfg)
    classifier = clf.load_classifier_from(Path(cfg.out) / "classifier", cfg.device)
    quality = measure_quality(pipe, classifier, per_combo=per_combo, seed=cfg.seed + 30_000,
                              guidance=cfg.guidance, steps=cfg.sampling_steps, device=cfg.device)
    report = {"step": step, "per_combo": per_combo, "world": WORLD.name, "quality": quality}
    with atomic_output(Path(cfg.work_dir) / "checkpoint_quality.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    log.info("checkpoint at UNet step %d: %s", step, quality)
    return report


# ------------------------------------------------------------------------------------------------- main
def build(cfg: BuildConfig) -> dict:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    out, work = Path(cfg.out), Path(cfg.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    classifier = _stage_classifier(cfg, out)
    images, scenes = _setup_pool(cfg, cfg.max_rotation)  # the generative pool: same seed as the classifier's
    vae = _stage_vae(cfg, images, scenes, classifier, work)
    tokenizer = make_tokenizer(work / "tokenizer")
    mean, std = _encode_pool(vae, images, cfg.device)
    del images
    unet, text_encoder = _stage_unet(cfg, mean, std, scenes, tokenizer, work)

    from diffusers import StableDiffusionPipeline

    base_dir, variant_dir = out / "base", out / "variant"
    for d in (base_dir, variant_dir):
        if d.exists():
            shutil.rmtree(d)
    save_pipeline(make_pipeline(vae, text_encoder, tokenizer, unet), base_dir, half=True)
    report = {"world": {"name": WORLD.name, "shapes": list(WORLD.shapes), "colours": list(WORLD.colours),
                        "styles": list(WORLD.styles), "synonyms": dict(WORLD.synonyms)},
              "build": asdict(cfg), "sampler": {"scheduler": "DDIM", "guidance_scale": cfg.guidance,
                                                 "num_inference_steps": cfg.sampling_steps}}
    meta = _read_meta(work / "unet_ema.safetensors")
    report["unet_plans"] = json.loads(meta["plans"]) if "plans" in meta else None
    report["classifier_heldout"] = json.loads((out / "classifier" / clf.CONFIG_NAME).read_text())[
        "heldout_accuracy"] if (out / "classifier" / clf.CONFIG_NAME).exists() else None

    # Measure on the pipeline as shipped (fp16 on disk, loaded back in fp32).
    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), dtype=torch.float32).to(cfg.device)
    report["base"] = measure_quality(pipe, classifier, per_combo=cfg.quality_per_combo, seed=cfg.seed + 30_000,
                                     guidance=cfg.guidance, steps=cfg.sampling_steps, device=cfg.device)
    log.info("base quality: %s", report["base"])
    _write_report(out, report, t0)

    variant_unet = _stage_variant(cfg, pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, work)
    variant = make_pipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, variant_unet)
    save_pipeline(variant, variant_dir, half=True)
    link_shared_components(variant_dir, base_dir)
    vpipe = StableDiffusionPipeline.from_pretrained(str(variant_dir), dtype=torch.float32).to(cfg.device)
    report["variant"] = measure_quality(vpipe, classifier, per_combo=max(1, cfg.quality_per_combo // 2),
                                        seed=cfg.seed + 40_000, guidance=cfg.guidance,
                                        steps=cfg.sampling_steps, device=cfg.device)
    log.info("variant quality: %s", report["variant"])
    _write_report(out, report, t0)
    return report


def _write_report(out: Path, report: dict, t0: float) -> None:
    report["build_minutes"] = round((time.time() - t0) / 60, 1)
    report["torch_threads"] = torch.get_num_threads()
    (out / "quality.json").write_text(json.dumps(report, indent=2))


def _parse(argv=None) -> tuple[BuildConfig, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="assets folder to write")
    p.add_argument("--work-dir", default="runs/toyworld_build", help="checkpoints and intermediate files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=BuildConfig.steps, help="UNet training steps (upper bound)")
    p.add_argument("--unet-minutes", type=float, default=BuildConfig.unet_minutes,
                   help="time budget for UNet training; the step plan is fitted to it (0: no budget)")
    p.add_argument("--checkpoint-every", type=int, default=BuildConfig.checkpoint_every,
                   help="UNet steps between checkpoints (a killed build resumes from the last one)")
    p.add_argument("--batch", type=int, default=BuildConfig.batch, help="UNet training batch")
    p.add_argument("--lr", type=float, default=BuildConfig.lr, help="UNet + text encoder peak learning rate")
    p.add_argument("--max-rotation", type=float, default=BuildConfig.max_rotation,
                   help="degrees either way from upright in the generative pool (negative: any orientation)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch default). On a shared 2-core machine use 1, or set "
                        "OMP_WAIT_POLICY=PASSIVE: two busy-waiting OpenMP pools on 2 cores run ~40x slower")
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage, to test the script")
    p.add_argument("--measure-checkpoint", type=int, default=0, metavar="N",
                   help="do not build: measure the latest UNet checkpoint of --work-dir on N generations of "
                        "every combination (the classifier comes from --out), e.g. beside a running build")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = BuildConfig(out=a.out, work_dir=a.work_dir, seed=a.seed, device=a.device, steps=a.steps,
                      unet_minutes=a.unet_minutes, batch=a.batch, lr=a.lr, checkpoint_every=a.checkpoint_every,
                      max_rotation=None if a.max_rotation < 0 else a.max_rotation)
    if a.smoke:
        cfg = BuildConfig(out=a.out, work_dir=a.work_dir, seed=a.seed, device=a.device, pool_size=600,
                          classifier_steps=10, vae_steps=10, decoder_steps=5, steps=min(a.steps, 40),
                          unet_minutes=0, warmup=5, checkpoint_every=20, quality_per_combo=1,
                          variant_steps=5, variant_pool=200, sampling_steps=5)
    if a.measure_checkpoint < 0:
        p.error(f"--measure-checkpoint must be a positive number of generations per combination, got "
                f"{a.measure_checkpoint}")
    return cfg, a.measure_checkpoint


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, measure = _parse(argv)
    log.info("ToyWorld %r (%d combinations; %s selects the world); build config: %s", WORLD.name,
             WORLD.combinations(), WORLD_ENV, cfg)
    if measure:
        measure_checkpoint(cfg, per_combo=measure)
        return
    report = build(cfg)
    log.info("done in %.1f min: base %s, variant %s", report["build_minutes"], report["base"], report["variant"])


if __name__ == "__main__":
    main()
