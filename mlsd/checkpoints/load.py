"""Turn a checkpoint (single file or diffusers folder) into diffusers/transformers modules, offline.

Key tables come from diffusers' ``single_file_utils``; what mlsd adds is the
offline family configs, detection by fingerprint, a sidecar ``.yaml`` for
non-standard sizes, EMA selection and errors a user can act on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mlsd.checkpoints.detect import CLIP_TE, EMA, OPENCLIP_TE, UNET, Detection, detect
from mlsd.checkpoints.read import WeightsFile, read_weights
from mlsd.errors import InputFileError, UnknownModelError, UsageError
from mlsd.families import FAMILIES, SD1, SD2, Family, load_tokenizer

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class LoadedModel:
    """Everything a backend needs, already translated out of the checkpoint's world."""

    source: Path
    family: Family
    prediction_type: str
    prediction_source: str  # "sidecar yaml" | "option" | "family default" | "scheduler config"
    inpainting: bool
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    source_dtype: torch.dtype
    used_ema: bool = False
    vae_source: Path | None = None
    loras: list = field(default_factory=list)


def load_model(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    use_ema: bool = False,
    vae: str | Path | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> LoadedModel:
    """Load a checkpoint file or diffusers folder. ``dtype=None`` keeps the file's dtype."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UsageError(
            f"Unknown prediction type '{prediction_type}'.", fix=f"use one of: {', '.join(PREDICTION_TYPES)}"
        )
    if path.is_dir():
        model = _load_diffusers_folder(path, prediction_type, dtype)
    else:
        model = _load_single_file(path, prediction_type, use_ema, dtype)
    if vae is not None:
        swap_vae(model, vae)
    return model


def _load_single_file(path: Path, prediction_type, use_ema: bool, dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.utils import logging as diffusers_logging

    # diffusers' converter warns about EMA choices that mlsd makes itself (see _select_unet_weights).
    diffusers_logging.set_verbosity_error()
    weights = read_weights(path)
    det = detect(weights.tensors, path)
    if det.kind != "checkpoint":
        raise InputFileError(
            f"This file is a {det.kind.upper()}, not a full checkpoint.",
            where=path,
            fix="pass it with --lora NAME:WEIGHT" if det.kind == "lora" else "pass it with --vae",
        )
    missing = [n for n, ok in (("UNet", det.has_unet), ("text encoder", det.has_text_encoder),
                               ("VAE", det.has_vae)) if not ok]
    if missing:
        raise InputFileError(
            f"The checkpoint lacks its {', '.join(missing)} weights.",
            where=path,
            fix="use a full checkpoint (UNet + text encoder + VAE); pruned 'unet-only' files cannot generate",
        )
    tensors = _select_unet_weights(weights, det, use_ema)
    ldm, sidecar = ldm_config_for(path, det)
    pred, pred_source = _prediction_type(ldm, sidecar, prediction_type, det.family)
    source_dtype = weights.tensors[UNET + "input_blocks.0.0.weight"].dtype

    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(ldm, tensors)
    unet_cfg["in_channels"] = det.in_channels
    unet = _instantiate(UNet2DConditionModel, unet_cfg,
                        sfu.convert_ldm_unet_checkpoint(tensors, unet_cfg), dtype, path, "UNet")
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(ldm, tensors)
    vae = _instantiate(AutoencoderKL, vae_cfg, sfu.convert_ldm_vae_checkpoint(tensors, vae_cfg), dtype, path, "VAE")
    text_encoder = _load_text_encoder(tensors, det.family, dtype, path)
    return LoadedModel(
        source=path, family=det.family, prediction_type=pred, prediction_source=pred_source,
        inpainting=det.inpainting, unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=load_tokenizer(det.family), scheduler_config=det.family.scheduler_config(pred),
        source_dtype=source_dtype, used_ema=use_ema,
    )


def _select_unet_weights(weights: WeightsFile, det: Detection, use_ema: bool) -> dict[str, torch.Tensor]:
    if not use_ema:
        return weights.tensors
    if not det.has_ema:
        raise UsageError("--ema was given but the checkpoint holds no EMA weights (no 'model_ema.*' keys).",
                         where=weights.path, fix="drop --ema")
    # LDM stores the EMA copy with the dots of each UNet key removed after 'model_ema.'.
    out = dict(weights.tensors)
    for key in weights.tensors:
        if key.startswith(UNET):
            ema_key = EMA + "".join(key.split(".")[1:])
            if ema_key not in weights.tensors:
                raise InputFileError(f"EMA copy is incomplete: '{ema_key}' is missing.", where=weights.path,
                                     fix="load without --ema")
            out[key] = weights.tensors[ema_key]
    return out


def sidecar_yaml(path: Path) -> Path | None:
    """A1111 convention: 'model.yaml' beside 'model.safetensors' describes the model."""
    candidate = path.with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def ldm_config_for(path: Path, det: Detection) -> tuple[dict, Path | None]:
    side = sidecar_yaml(path)
    if side is None:
        return det.family.ldm_config(det.inpainting), None
    try:
        cfg = yaml.safe_load(side.read_text(encoding="utf-8"))
        cfg["model"]["params"]["unet_config"]["params"]
        cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise InputFileError(
            f"The sidecar config is not an LDM model config ({type(e).__name__}: {e}).",
            where=side,
            fix="fix or delete the .yaml beside the checkpoint (it needs model.params.unet_config and "
            "first_stage_config)",
        ) from e
    return cfg, side


def _prediction_type(ldm: dict, sidecar: Path | None, option: str | None, family: Family) -> tuple[str, str]:
    if sidecar is not None:
        param = ldm["model"]["params"].get("parameterization", "eps")
        return ("v_prediction" if param == "v" else "epsilon"), "sidecar yaml"
    if option:
        return option, "option"
    return family.default_prediction, "family default"


def _instantiate(cls, config: dict, state: dict, dtype, path: Path, what: str):
    """Build on the meta device and adopt the (memory-mapped) tensors: no second copy of a 2 GB UNet."""
    with torch.device("meta"):
        module = cls(**config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    expected = module.state_dict()
    for key, value in state.items():
        if key in expected and expected[key].shape != value.shape and expected[key].numel() == value.numel():
            state[key] = value.reshape(expected[key].shape)  # LDM 1x1 conv attention vs diffusers linear
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or wrong:
        detail = (f"missing {missing[:5]}" if missing else "") + (f" shape mismatch {wrong[:5]}" if wrong else "")
        raise UnknownModelError(
            f"The {what} weights do not fit the {what} architecture: {detail.strip()}.",
            where=path,
            fix="if the model has a non-standard size, put its LDM config as a .yaml beside it",
        )
    module.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _load_text_encoder(tensors: dict, family: Family, dtype, path: Path):
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    if family is SD2:
        prefix = OPENCLIP_TE
        vocab, hidden = tensors[prefix + "token_embedding.weight"].shape
        positions = tensors[prefix + "positional_embedding"].shape[0]
        blocks = _count(tensors, re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
        inner = tensors[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
    else:
        tensors = _normalise_clip_prefix(tensors)
        prefix = CLIP_TE + "text_model."
        vocab, hidden = tensors[prefix + "embeddings.token_embedding.weight"].shape
        positions = tensors[prefix + "embeddings.position_embedding.weight"].shape[0]
        blocks = _count(tensors, re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
        inner = tensors[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        act = "quick_gelu"
    if hidden % 64:
        raise UnknownModelError(f"Text encoder width {hidden} is not a multiple of 64 (CLIP's head size).",
                                where=path, fix="this text encoder layout is not supported")
    layers = blocks - family.text_layers_dropped
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, max_position_embeddings=positions, hidden_act=act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if family is SD2 else 49407,
        projection_dim=hidden,
    )
    model = CLIPTextModel(config)
    if family is SD2:
        state = sfu.convert_open_clip_checkpoint(model, tensors)
        dropped = f"text_model.encoder.layers.{layers}."
        state = {k: v for k, v in state.items() if not k.startswith(dropped) and k != "text_projection.weight"}
    else:
        state = sfu.convert_ldm_clip_checkpoint(tensors)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 flattened it
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UnknownModelError(
            f"The text encoder weights do not fit a CLIP text model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}.",
            where=path, fix="the checkpoint's text encoder is damaged or of an unknown layout",
        )
    if dtype is not None:
        model.to(dtype)
    else:
        model.to(next(iter(state.values())).dtype)
    return model.eval().requires_grad_(False)


def _normalise_clip_prefix(tensors: dict) -> dict:
    """Old SD1 files (transformers < 4.x) lack the 'text_model.' level."""
    old = CLIP_TE + "embeddings."
    if not any(k.startswith(old) for k in tensors):
        return tensors
    return {(CLIP_TE + "text_model." + k[len(CLIP_TE):] if k.startswith(CLIP_TE) else k): v
            for k, v in tensors.items()}


def _count(tensors: dict, pattern: re.Pattern) -> int:
    found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def swap_vae(model: LoadedModel, vae_path: str | Path) -> None:
    """Replace the model's VAE with a standalone VAE file (A1111 models/VAE)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    vae_path = Path(vae_path)
    weights = read_weights(vae_path)
    tensors = weights.tensors
    if not any(k.removeprefix("first_stage_model.").startswith(("decoder.", "encoder.")) for k in tensors):
        raise InputFileError("This file holds no VAE weights (no 'decoder.*'/'encoder.*' keys).",
                             where=vae_path, fix="pick a VAE file from models/VAE")
    config = dict(model.vae.config)
    dtype = next(model.vae.parameters()).dtype
    if any(".up_blocks." in k or ".down_blocks." in k for k in tensors):
        state = {k.removeprefix("first_stage_model."): v for k, v in tensors.items()}  # already diffusers
    else:
        state = sfu.convert_ldm_vae_checkpoint(tensors, config)
    model.vae = _instantiate(AutoencoderKL, {k: v for k, v in config.items() if not k.startswith("_")},
                             state, dtype, vae_path, "VAE")
    model.vae_source = vae_path


def _load_diffusers_folder(path: Path, prediction_type, dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    index = path / "model_index.json"
    if not index.is_file():
        raise InputFileError("This folder is not a diffusers model (no model_index.json).", where=path,
                             fix="pass a .safetensors/.ckpt file or a diffusers folder")
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise InputFileError(f"The diffusers folder is incomplete or damaged ({e}).", where=path,
                             fix="make sure unet/, vae/ and text_encoder/ hold config and weights") from e
    # OpenAI CLIP (SD1) uses quick_gelu, OpenCLIP (SD2) plain gelu: a fingerprint that holds at any width.
    family = SD1 if text_encoder.config.hidden_act == "quick_gelu" else SD2
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise UnknownModelError(
            f"UNet cross-attention width {unet.config.cross_attention_dim} does not match the text encoder "
            f"width {text_encoder.config.hidden_size}.", where=path, fix="the folder mixes components of two models")
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    if prediction_type:
        pred, source = prediction_type, "option"
    elif "prediction_type" in sched:
        pred, source = sched["prediction_type"], "scheduler config"
    else:
        pred, source = family.default_prediction, "family default"
    tok_dir = path / "tokenizer"
    tokenizer = load_tokenizer(family, tok_dir if (tok_dir / "vocab.json").is_file() else None)
    modules = [m.eval().requires_grad_(False) for m in (unet, vae, text_encoder)]
    if dtype is not None:
        modules = [m.to(dtype) for m in modules]
    return LoadedModel(
        source=path, family=family, prediction_type=pred, prediction_source=source,
        inpainting=unet.config.in_channels == 9, unet=modules[0], vae=modules[1], text_encoder=modules[2],
        tokenizer=tokenizer, scheduler_config=family.scheduler_config(pred),
        source_dtype=next(unet.parameters()).dtype,
    )


__all__ = ["FAMILIES", "LoadedModel", "load_model", "swap_vae", "sidecar_yaml", "PREDICTION_TYPES"]
