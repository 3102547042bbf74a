"""Train the built-in demo model on the synthetic shapes, write it as an A1111 file, and measure it.

``python -m mlsd.demo.train`` (``make demo-model``) reproduces the shipped files in mlsd/data/demo/:
the checkpoint (+ sidecar .yaml), the "green" LoRA, the training config and the metrics. Three stages,
each seeded: a VAE (8x down, 4 latent channels), then a CLIP text encoder and a cross-attention UNet
trained together on the DDPM epsilon objective of SD1, then a kohya LoRA on top of the frozen model.
Stage results are cached in ``--work`` so a rerun after a change to a later stage skips the earlier ones.

Two threads by default: on an idle 2-core machine a UNet step took 0.145 s with two against 0.20 s with one
(0.19 s in the recorded run, with light work beside it). ``--set threads=1`` when other jobs share the
cores: OpenMP threads then spin against each other.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from mlsd.demo import shapes

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
MODEL_NAME = "mlsd-demo-shapes"
LORA_NAME = "mlsd-demo-green"


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    images: int = 3000  # rendered once, shared by the VAE and the diffusion stage
    # VAE: channel widths must be multiples of 32 (GroupNorm's 32 groups); [1, 1, 2, 2] keeps the 64x64
    # level at 32 channels, where almost all of its compute goes.
    vae_channels: int = 32
    vae_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2])
    vae_layers: int = 1
    # Most steps on the same scenes drawn at 32x32 (4x cheaper), then at 64x64. Not crops: GroupNorm with
    # one channel per group erases a flat channel, so a crop of plain background teaches the decoder nothing.
    vae_small_steps: int = 600
    vae_full_steps: int = 1500
    vae_logvar_init: float = -6.0  # start near-deterministic: unit posterior noise would drown the signal
    # Then the decoder alone at 64x64 (the encoder, and so the latents the UNet learns, stay as they are),
    # as SD's own ft-MSE VAE was made.
    decoder_steps: int = 1500
    decoder_lr: float = 1e-3
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    # Text encoder: CLIP's head size is 64, so width 64 = one head; the real 49408-token vocabulary.
    text_width: int = 64
    text_layers: int = 2
    text_inner: int = 128
    # UNet on 8x8 latents: 8 -> 4 -> 2, cross-attention at every level.
    unet_channels: int = 32
    unet_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    unet_layers: int = 1
    unet_heads: int = 4
    # Backgrounds are learnt first, then shapes, the foreground colour last (cyan against blue and green):
    # 4600 steps reached colour 91 %, shape 67 %; 8000 (25 min) pass both bars and leave 20 min of the hour.
    unet_steps: int = 8000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.998
    offset_noise: float = 0.1  # lets the model move a whole image's colour away from the noise's mean
    min_snr: float = 5.0
    # LoRA: every shape green, whatever colour the prompt names.
    lora_images: int = 1500
    lora_steps: int = 400
    lora_batch: int = 16
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_lr: float = 2e-3
    # Measurement
    eval_steps: int = 20
    eval_cfg: float = 7.0
    eval_sampler: str = "DPM++ 2M Karras"
    eval_seeds: int = 4

    def stage_key(self, *names: str) -> str:
        d = asdict(self)
        picked = {k: v for k, v in d.items() if any(k.startswith(n) for n in names) or k in ("seed", "images")}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ldm_config(cfg: TrainConfig, scale_factor: float) -> dict:
    """The SD1 LDM config at the demo sizes: what the sidecar .yaml tells the loader."""
    from mlsd.families import SD1

    out = SD1.ldm_config(False)
    params = out["model"]["params"]
    params["scale_factor"] = round(float(scale_factor), 5)
    params["image_size"] = shapes.SIZE // 8
    unet = params["unet_config"]["params"]
    unet.update(image_size=shapes.SIZE // 8, model_channels=cfg.unet_channels, channel_mult=cfg.unet_mult,
                num_res_blocks=cfg.unet_layers, attention_resolutions=[2**i for i in range(len(cfg.unet_mult))],
                num_heads=cfg.unet_heads, context_dim=cfg.text_width)
    params["first_stage_config"]["params"]["ddconfig"].update(
        resolution=shapes.SIZE, ch=cfg.vae_channels, ch_mult=cfg.vae_mult, num_res_blocks=cfg.vae_layers)
    return out


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    return AutoencoderKL(**create_vae_diffusers_config_from_ldm(ldm_config(cfg, 1.0), {}))


def build_unet(cfg: TrainConfig):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    return UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(ldm_config(cfg, 1.0), {}))


def build_text_encoder(cfg: TrainConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_width, intermediate_size=cfg.text_inner,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_width // 64, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


# ---- data ---------------------------------------------------------------------------------------------------


def _images(scenes: list[shapes.Scene], size: int = shapes.SIZE, colour=None) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]."""
    arr = np.stack([np.asarray(shapes.render(s, size, colour=colour)) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_set(n: int, seed: int, *, green: bool = False) -> tuple[list[shapes.Scene], torch.Tensor]:
    """n scenes and their 64x64 images. ``green``: the LoRA's set (every shape green, captions unchanged)."""
    rng = random.Random(seed)
    backgrounds = [b for b in shapes.BACKGROUNDS if b != "green"] if green else shapes.BACKGROUNDS
    scenes = [shapes.random_scene(rng, backgrounds=backgrounds) for _ in range(n)]
    return scenes, _images(scenes, colour=shapes.COLOURS["green"] if green else None)


class Captions:
    """Token ids exactly as mlsd's pipeline makes them (A1111 chunking, BOS/EOS, SD1 padding)."""

    def __init__(self):
        from mlsd.families import SD1, load_tokenizer

        self.tokenizer = load_tokenizer(SD1)
        self.cache: dict[str, torch.Tensor] = {}

    def ids(self, texts: list[str]) -> torch.Tensor:
        from mlsd.prompts import chunks_to_tensors, tokenize_weighted

        for t in texts:
            if t not in self.cache:
                self.cache[t] = chunks_to_tensors(tokenize_weighted(t, self.tokenizer)[:1])[0][0]
        return torch.stack([self.cache[t] for t in texts])


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# ---- stage 1: VAE -------------------------------------------------------------------------------------------


def train_vae(cfg: TrainConfig, scenes: list[shapes.Scene], images: torch.Tensor):
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).train()
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = cfg.vae_logvar_init
    small = _images(scenes, shapes.SIZE // 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    total = cfg.vae_small_steps + cfg.vae_full_steps
    t0, running = time.perf_counter(), 0.0
    for step in range(total):
        full = step >= cfg.vae_small_steps
        pool = images if full else small
        x = pool[torch.randint(len(pool), (cfg.vae_batch // 2 if full else cfg.vae_batch,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * _schedule(step, total, 50)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator=gen)).sample
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running = rec.item() if step == 0 else 0.95 * running + 0.05 * rec.item()
        if step % 50 == 0 or step == total - 1:
            log(f"vae {step}/{total} rec {running:.4f} kl {kl.item():.2f} ({time.perf_counter() - t0:.0f} s)")
    return vae.eval().requires_grad_(False)


def finetune_decoder(cfg: TrainConfig, vae, images: torch.Tensor, moments: torch.Tensor):
    vae.train().requires_grad_(False)
    decoder = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for param in decoder:
        param.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=cfg.decoder_lr, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    t0, running = time.perf_counter(), 0.0
    for step in range(cfg.decoder_steps):
        idx = torch.randint(len(images), (cfg.vae_batch // 2,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * _schedule(step, cfg.decoder_steps, 20)
        y = vae.decode(_sample(moments[idx], gen)).sample
        rec = (y - images[idx]).abs().mean() + F.mse_loss(y, images[idx])
        opt.zero_grad(set_to_none=True)
        rec.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        running = rec.item() if step == 0 else 0.95 * running + 0.05 * rec.item()
        if step % 50 == 0 or step == cfg.decoder_steps - 1:
            log(f"decoder {step}/{cfg.decoder_steps} rec {running:.4f} ({time.perf_counter() - t0:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.parameters for i in range(0, len(images), batch)])


def _sample(moments: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean, logvar = moments.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen)


# ---- stage 2: text encoder + UNet ---------------------------------------------------------------------------


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def diffusion_loss(unet, context, latents, gen, cfg: TrainConfig, alphas: torch.Tensor) -> torch.Tensor:
    """SD1's objective: predict the noise added at a uniform timestep, min-SNR weighted."""
    b = latents.shape[0]
    t = torch.randint(0, 1000, (b,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    noise = noise + cfg.offset_noise * torch.randn((b, latents.shape[1], 1, 1), generator=gen)
    a = alphas[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=context).sample
    snr = a.view(b) / (1 - a.view(b))
    weight = snr.clamp(max=cfg.min_snr) / snr
    return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(live.parameters()), 1 - decay)


def train_diffusion(cfg: TrainConfig, scenes, moments: torch.Tensor, scale: float):
    torch.manual_seed(cfg.seed + 2)
    unet, te = build_unet(cfg).train(), build_text_encoder(cfg).train()
    steps = cfg.unet_steps
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, fused=True)
    captions, alphas = Captions(), _alphas_cumprod()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    rng = random.Random(cfg.seed + 4)
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(len(scenes), (cfg.batch,), generator=gen)
        texts = [shapes.random_caption(scenes[i], rng) for i in idx.tolist()]
        latents = scale * _sample(moments[idx], gen)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _schedule(step, steps, cfg.warmup)
        context = te(captions.ids(texts)).last_hidden_state
        loss = diffusion_loss(unet, context, latents, gen, cfg, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, te, decay)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet {step}/{steps} loss {running:.4f} ({time.perf_counter() - t0:.0f} s)")
    return ema_unet.requires_grad_(False), ema_te.requires_grad_(False)


# ---- the A1111 file -----------------------------------------------------------------------------------------


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_model(path: Path, cfg: TrainConfig, unet, vae, te, scale: float) -> None:
    """fp16 LDM single file + sidecar .yaml (written first: a present checkpoint means a complete pair)."""
    from mlsd.checkpoints.to_ldm import clip_to_ldm, unet_to_ldm, vae_to_ldm

    te_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v
             for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    ldm = unet_to_ldm(unet.state_dict(), cfg.unet_layers) | vae_to_ldm(vae.state_dict(), len(cfg.vae_mult))
    ldm |= clip_to_ldm(te_sd)
    ldm = {k: v.detach().to(torch.float16) for k, v in ldm.items()}
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ldm |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}
    side = path.with_suffix(".yaml")
    tmp = side.with_name(f".{side.name}.partial")
    tmp.write_text("# mlsd demo model: SD1 architecture at demo sizes (written by mlsd/demo/train.py)\n"
                   + yaml.safe_dump(ldm_config(cfg, scale), sort_keys=False), encoding="utf-8")
    os.replace(tmp, side)
    _atomic_save(ldm, path, {"format": "pt", "mlsd_demo": "synthetic shapes, trained by mlsd/demo/train.py"})


# ---- stage 3: LoRA ------------------------------------------------------------------------------------------


class _LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features**0.5)
        self.up = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.down), self.up) * self.scale


LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def train_lora(cfg: TrainConfig, model_path: Path, lora_path: Path) -> None:
    """kohya LoRA on the shipped (fp16-rounded) weights, loaded by mlsd's own loader."""
    from mlsd.checkpoints.load import load_model

    model = load_model(model_path)
    unet, te, vae = model.unet, model.text_encoder, model.vae
    scale = vae.config.scaling_factor
    scenes, images = render_set(cfg.lora_images, cfg.seed + 10, green=True)
    moments = encode_moments(vae, images)
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    wrapped: dict[str, _LoraLinear] = {}
    for name, module in list(unet.named_modules()):
        for suffix in LORA_TARGETS:
            if name.endswith(suffix) and isinstance(module, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                lora = _LoraLinear(module, cfg.lora_rank, cfg.lora_alpha, gen)
                setattr(unet.get_submodule(parent), child, lora)
                wrapped[name] = lora
    params = [p for m in wrapped.values() for p in (m.down, m.up)]
    opt = torch.optim.AdamW(params, lr=cfg.lora_lr, weight_decay=0.0, fused=True)
    captions, alphas = Captions(), _alphas_cumprod()
    rng = random.Random(cfg.seed + 12)
    t0, running = time.perf_counter(), 0.0
    for step in range(cfg.lora_steps):
        idx = torch.randint(len(scenes), (cfg.lora_batch,), generator=gen)
        texts = [shapes.random_caption(scenes[i], rng) for i in idx.tolist()]
        with torch.no_grad():
            context = te(captions.ids(texts)).last_hidden_state
        for g in opt.param_groups:
            g["lr"] = cfg.lora_lr * _schedule(step, cfg.lora_steps, 20)
        loss = diffusion_loss(unet, context, scale * _sample(moments[idx], gen), gen, cfg, alphas)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == cfg.lora_steps - 1:
            log(f"lora {step}/{cfg.lora_steps} loss {running:.4f} ({time.perf_counter() - t0:.0f} s)")
    tensors = {}
    for name, m in wrapped.items():
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[stem + ".lora_down.weight"] = m.down.detach().to(torch.float16)
        tensors[stem + ".lora_up.weight"] = m.up.detach().to(torch.float16)
        tensors[stem + ".alpha"] = torch.tensor(cfg.lora_alpha, dtype=torch.float16)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
                "ss_network_alpha": str(cfg.lora_alpha), "ss_base_model_version": "sd_v1",
                "ss_output_name": LORA_NAME, "ss_training_comment": "every shape green; mlsd/demo/train.py"}
    _atomic_save(tensors, lora_path, metadata)


# ---- measurement --------------------------------------------------------------------------------------------


def eval_prompts() -> list[tuple[str, str, str]]:
    """(colour, shape, background): every colour and shape, backgrounds in rotation."""
    out, k = [], 0
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            backgrounds = [b for b in shapes.BACKGROUNDS if b != colour]
            out.append((colour, shape, backgrounds[k % len(backgrounds)]))
            k += 1
    return out


def evaluate(cfg: TrainConfig, model_path: Path, lora_path: Path | None = None) -> dict:
    """Prompt adherence of images drawn through mlsd's own pipeline (torch backend) from the written file."""
    from mlsd.pipeline.generate import run
    from mlsd.pipeline.request import GenerationRequest
    from mlsd.session import LoraChoice, ModelKey, load_backend

    loras = (LoraChoice(lora_path, 1.0),) if lora_path else ()
    backend = load_backend(ModelKey(model_path, loras=loras, device="cpu"))
    hits = {"colour": 0, "shape": 0, "background": 0, "green": 0}
    per_shape = {s: 0 for s in shapes.SHAPES}
    per_colour = {c: 0 for c in shapes.COLOURS}
    n = 0
    for i, (colour, shape, background) in enumerate(eval_prompts()):
        request = GenerationRequest(prompt=f"a {colour} {shape} on a {background} background",
                                    steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg, sampler=cfg.eval_sampler,
                                    seed=1000 + i * cfg.eval_seeds, width=shapes.SIZE, height=shapes.SIZE,
                                    batch_size=cfg.eval_seeds)
        for image in run(backend, request).images:
            r = shapes.read_image(image)
            n += 1
            hits["colour"] += r.colour == colour
            hits["shape"] += r.shape == shape
            hits["background"] += r.background == background
            hits["green"] += r.colour == "green"
            per_shape[shape] += r.shape == shape
            per_colour[colour] += r.colour == colour
    k = n // len(shapes.SHAPES)
    return {"images": n, "colour_accuracy": hits["colour"] / n, "shape_accuracy": hits["shape"] / n,
            "background_accuracy": hits["background"] / n, "green_fraction": hits["green"] / n,
            "shape_accuracy_by_shape": {s: v / k for s, v in per_shape.items()},
            "colour_accuracy_by_colour": {c: v / (n // len(shapes.COLOURS)) for c, v in per_colour.items()}}


# ---- driver -------------------------------------------------------------------------------------------------


def _cached(work: Path, name: str, key: str, build):
    path = work / f"{name}-{key}.pt"
    if path.is_file():
        log(f"{name}: reusing {path}")
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    value = build()
    value["seconds"] = time.perf_counter() - t0
    tmp = path.with_name(path.name + ".partial")
    torch.save(value, tmp)
    os.replace(tmp, path)
    return value


def measure(cfg: TrainConfig, out: Path) -> dict:
    """metrics.json for the checkpoint and LoRA in ``out``, as they are."""
    from mlsd.hashes import file_sha256

    model_path, lora_path = out / f"{MODEL_NAME}.safetensors", out / f"{LORA_NAME}.safetensors"
    t0 = time.perf_counter()
    metrics = {"checkpoint_sha256": file_sha256(model_path, cache=False),
               "lora_sha256": file_sha256(lora_path, cache=False),
               "setup": {"steps": cfg.eval_steps, "cfg_scale": cfg.eval_cfg, "sampler": cfg.eval_sampler,
                         "size": shapes.SIZE, "seeds_per_prompt": cfg.eval_seeds, "backend": "torch (cpu, fp32)"},
               "base": evaluate(cfg, model_path), "lora_green_weight_1": evaluate(cfg, model_path, lora_path)}
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = out / ".metrics.json.partial"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "metrics.json")
    log(f"metrics: {json.dumps(metrics['base'])}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlsd.demo.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--work", type=Path, default=Path("build/demo-model"), help="stage cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true",
                   help="measure the files already in --out again (after a change to the judges), train nothing")
    args = p.parse_args(argv)
    cfg = TrainConfig()
    for item in args.set:
        key, _, value = item.partition("=")
        setattr(cfg, key, type(getattr(cfg, key))(json.loads(value)))
    torch.set_num_threads(cfg.threads)
    if args.eval_only:
        measure(cfg, args.out)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    scenes, images = render_set(cfg.images, cfg.seed)
    render_s = time.perf_counter() - t0
    log(f"rendered {len(scenes)} images in {render_s:.0f} s")

    def vae_stage():
        vae = train_vae(cfg, scenes, images)
        moments = encode_moments(vae, images)
        return {"vae": vae.state_dict(), "moments": moments}

    vae_out = _cached(args.work, "vae", cfg.stage_key("vae", "kl"), vae_stage)
    moments = vae_out["moments"]
    scale = 1.0 / float(moments.chunk(2, dim=1)[0].std())
    log(f"latent scale factor {scale:.4f}")

    def decoder_stage():
        vae = build_vae(cfg)
        vae.load_state_dict(vae_out["vae"])
        return {"vae": finetune_decoder(cfg, vae, images, moments).state_dict()}

    # Keyed without the decoder's settings below: a new decoder keeps the latents, and so the UNet.
    dec_out = _cached(args.work, "decoder", cfg.stage_key("vae", "kl", "decoder"), decoder_stage)
    vae = build_vae(cfg)
    vae.load_state_dict(dec_out["vae"])
    vae.eval()

    def diffusion_stage():
        unet, te = train_diffusion(cfg, scenes, moments, scale)
        return {"unet": unet.state_dict(), "te": te.state_dict()}

    keys = ("vae", "kl", "text", "unet_channels", "unet_mult", "unet_layers", "unet_heads", "unet_steps", "batch",
            "lr", "warmup", "ema", "offset", "min_snr")
    diff_out = _cached(args.work, "diffusion", cfg.stage_key(*keys), diffusion_stage)
    unet, te = build_unet(cfg), build_text_encoder(cfg)
    unet.load_state_dict(diff_out["unet"])
    te.load_state_dict(diff_out["te"])
    model_path = args.out / f"{MODEL_NAME}.safetensors"
    write_model(model_path, cfg, unet, vae, te, scale)
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")

    lora_path = args.out / f"{LORA_NAME}.safetensors"
    t0 = time.perf_counter()
    train_lora(cfg, model_path, lora_path)
    lora_s = time.perf_counter() - t0
    train_s = render_s + vae_out["seconds"] + dec_out["seconds"] + diff_out["seconds"] + lora_s
    log(f"wrote {lora_path}; training took {train_s / 60:.1f} min")
    (args.out / "training.json").write_text(json.dumps({
        "config": asdict(cfg), "latent_scale_factor": scale,
        "seconds": {"render": round(render_s, 1), "vae": round(vae_out["seconds"], 1),
                    "decoder": round(dec_out["seconds"], 1),
                    "text_encoder_unet": round(diff_out["seconds"], 1), "lora": round(lora_s, 1),
                    "total": round(train_s, 1)},
        "torch": torch.__version__, "cpu_threads": cfg.threads,
    }, indent=2) + "\n", encoding="utf-8")
    if not args.skip_eval:
        measure(cfg, args.out)
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
