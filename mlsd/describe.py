"""What a file is, for `mlsd inspect` and `mlsd models`, without building any module."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mlsd.checkpoints.detect import CLIP_TE, EMA, OPENCLIP_TE, UNET, VAE, detect
from mlsd.checkpoints.load import ldm_config_for
from mlsd.checkpoints.read import read_weights
from mlsd.errors import InputFileError

_COMPONENTS = {"unet": UNET, "text_encoder": (CLIP_TE, OPENCLIP_TE), "vae": VAE, "ema": EMA}


def describe(path: str | Path, *, with_hash: bool = True) -> dict:
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    weights = read_weights(path)
    det = detect(weights.tensors, path)
    info: dict = {"path": str(path), "kind": det.kind, "container": weights.container,
                  "size_bytes": path.stat().st_size}
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in weights.tensors.values())
    info["dtype"] = dtypes.most_common(1)[0][0]
    if det.kind == "lora":
        from mlsd.lora import describe_lora

        info |= describe_lora(weights)
    elif det.kind == "vae":
        info["parameters"] = {"vae": sum(t.numel() for t in weights.tensors.values())}
    else:
        ldm, sidecar = ldm_config_for(path, det)
        param = ldm["model"]["params"].get("parameterization")
        info |= {
            "family": det.family.name,
            "family_label": det.family.label + (" inpainting" if det.inpainting else ""),
            "inpainting": det.inpainting,
            "prediction_type": ("v_prediction" if param == "v" else "epsilon") if sidecar
            else det.family.default_prediction,
            "prediction_source": "sidecar yaml" if sidecar else "family default",
            "sidecar_yaml": str(sidecar) if sidecar else None,
            "components": [c for c, ok in (("unet", det.has_unet), ("text_encoder", det.has_text_encoder),
                                          ("vae", det.has_vae)) if ok],
            "ema": det.has_ema,
            "context_dim": det.context_dim,
            "parameters": {name: sum(t.numel() for k, t in weights.tensors.items() if k.startswith(prefix))
                           for name, prefix in _COMPONENTS.items()},
        }
        if with_hash:
            from mlsd.hashes import model_short_hash

            info["short_hash"] = model_short_hash(path)
    return info


def _describe_folder(path: Path) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        raise InputFileError("This folder is not a model (no model_index.json).", where=path,
                             fix="pass a checkpoint file or a diffusers folder")
    import json

    unet_cfg = json.loads((path / "unet" / "config.json").read_text())
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    family = {768: "sd1", 1024: "sd2"}.get(unet_cfg.get("cross_attention_dim"), "unknown")
    return {"path": str(path), "kind": "diffusers folder", "family": family,
            "inpainting": unet_cfg.get("in_channels") == 9,
            "prediction_type": sched.get("prediction_type", "epsilon"),
            "components": sorted(p.name for p in path.iterdir() if p.is_dir())}


def format_description(info: dict) -> str:
    rows = []
    for key, value in info.items():
        if value is None or key == "family":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {_human(v) if isinstance(v, int) else v}" for k, v in value.items()
                              if v not in (0, None, ""))
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        elif key == "size_bytes":
            value = _human_bytes(value)
        rows.append(f"{key.replace('_', ' '):>18}: {value}")
    return "\n".join(rows)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
