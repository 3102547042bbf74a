"""Read a LoRA file and group its tensors per target module, detecting each module's format.

Pure parsing: nothing here knows the model. Names stay as the file spells them; ``mlsd.lora.names``
resolves them against a model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlsd.errors import InputFileError, LoraError

LORA, LOCON, LOHA, LOKR, PEFT, DIFFUSERS = "lora", "locon", "loha", "lokr", "peft", "diffusers"

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}
_LYCORIS_ROLES = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
# Dotted (diffusers/PEFT) key endings -> (role, format). Order matters: longest first.
_DOTTED_ROLES = [
    (".lora_linear_layer.down.weight", "down", DIFFUSERS), (".lora_linear_layer.up.weight", "up", DIFFUSERS),
    (".lora.down.weight", "down", DIFFUSERS), (".lora.up.weight", "up", DIFFUSERS),
    (".lora_A.weight", "down", PEFT), (".lora_B.weight", "up", PEFT), (".alpha", "alpha", None),
]
# Old diffusers attention-processor LoRAs name the projection, not the module holding the weight.
_ATTN_PROC = re.compile(r"^(.*?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DOTTED_TARGETS = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                   "base_model.model.": "auto"}
# Known LoRA-family keys that mlsd does not merge: refuse them by name rather than as "unknown".
_UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "LyCORIS full",
                "diff_b": "LyCORIS full", "on_input": "IA3", "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
                "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
                "lora_A.bias": "LoRA with bias", "lora_B.bias": "LoRA with bias"}


@dataclass(frozen=True)
class LoraModule:
    """One target module's tensors. ``name`` is underscored for kohya keys, dotted otherwise."""

    key: str  # the stem as written in the file, for messages
    target: str  # "unet" | "text_encoder" | "text_encoder_2" | "auto" (decided against the models)
    name: str
    dotted: bool
    format: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None


@dataclass(frozen=True)
class LoraMetadata:
    """The kohya ``ss_*`` fields users recognise from Civitai pages."""

    network_module: str | None = None
    network_dim: str | None = None
    network_alpha: str | None = None
    base_model_version: str | None = None
    v2: bool | None = None
    model_hash: str | None = None
    output_name: str | None = None

    @classmethod
    def from_dict(cls, md: dict[str, str]) -> LoraMetadata:
        v2 = md.get("ss_v2")
        return cls(md.get("ss_network_module"), md.get("ss_network_dim"), md.get("ss_network_alpha"),
                   md.get("ss_base_model_version"), None if v2 is None else v2.strip().lower() == "true",
                   md.get("sshs_model_hash"), md.get("ss_output_name"))


@dataclass
class LoraFile:
    path: Path
    modules: list[LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    ignored_keys: list[str] = field(default_factory=list)  # bundled embeddings: not LoRA weights

    @property
    def summary(self) -> LoraMetadata:
        return LoraMetadata.from_dict(self.metadata)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(sorted({m.format for m in self.modules}))


def read_lora_file(path: str | Path) -> LoraFile:
    path = Path(path)
    tensors, metadata = _load(path)
    return parse_lora(tensors, metadata, path)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise InputFileError(f"LoRA file {path.name} does not exist", where=path, fix="check the path or name")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip / legacy pickle, whatever the extension
        from mlsd.checkpoints.safe_pickle import safe_torch_load  # written alongside; keep import lazy

        obj = safe_torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InputFileError(f"{path.name} is a PyTorch file but not a LoRA (no flat name -> tensor dict)",
                                 where=path, fix="pick a LoRA .safetensors file")
        return dict(obj), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputFileError(f"Cannot read LoRA {path.name}: not a valid safetensors file ({exc})", where=path,
                             fix="download the file again (it may be incomplete) or pick another file") from exc


def _split_key(key: str) -> tuple[str, str, str, bool, str | None] | None:
    """key -> (stem, target, role, dotted, format-hint), or None when it fits no known layout."""
    stem, _, suffix = key.partition(".")
    for prefix, target in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            role = _KOHYA_ROLES.get(suffix, suffix if suffix in _LYCORIS_ROLES else None)
            return (stem, target, role, False, None) if role else None
    target, rest = "auto", key
    for prefix, t in _DOTTED_TARGETS.items():
        if key.startswith(prefix):
            target, rest = t, key[len(prefix):]
            break
    if m := _ATTN_PROC.match(rest):
        base, proj, role = m.groups()
        proj = _TE_PROJ[proj] if base.endswith("self_attn") else ("to_out.0" if proj == "to_out" else proj)
        return f"{base}.{proj}", target, role, True, DIFFUSERS
    for ending, role, fmt in _DOTTED_ROLES:
        if rest.endswith(ending) and len(rest) > len(ending):
            return rest[: -len(ending)], target, role, True, fmt
    return None


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> LoraFile:
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    info: dict[tuple[str, str], tuple[bool, set[str | None]]] = {}
    unknown, unsupported, ignored = [], {}, []
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            ignored.append(key)
            continue
        split = _split_key(key)
        if split is None:
            kind = next((v for s, v in _UNSUPPORTED.items() if key.endswith("." + s)), None)
            if kind:
                unsupported.setdefault(kind, []).append(key)
            else:
                unknown.append(key)
            continue
        stem, target, role, dotted, fmt = split
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LoraError(f"LoRA {path.name} contains NaN or infinite values ({key})", where=path,
                            fix="the LoRA is broken (often fp16 training overflow); use another version of it")
        g = groups.setdefault((target, stem), {})
        if role in g:
            raise LoraError(f"LoRA {path.name} has two tensors for '{role}' of module {stem}", where=path,
                            fix="the file mixes two naming styles for one module; re-export it")
        g[role] = value
        info.setdefault((target, stem), (dotted, set()))[1].add(fmt)
    if unsupported:
        kind, keys = next(iter(unsupported.items()))
        raise LoraError(f"LoRA {path.name} uses {kind} ({len(keys)} keys, e.g. {keys[0]}), which mlsd cannot merge",
                        where=path, fix="use a plain LoRA/LoCon/LoHa/LoKr file, or re-export it without that option")
    if unknown:
        raise LoraError(f"LoRA {path.name} has {len(unknown)} keys in no known LoRA layout: "
                        f"{list_examples(unknown)}", where=path,
                        fix="mlsd reads kohya LoRA/LoCon, LyCORIS LoHa/LoKr and diffusers/PEFT LoRAs")
    peft_md = _peft_metadata(metadata)
    modules = []
    for (target, stem), g in groups.items():
        dotted, hints = info[(target, stem)]
        fmt = _detect_format(stem, g, hints, path)
        alpha = float(_scalar(g.pop("alpha"), stem, path)) if "alpha" in g else None
        if alpha is None and dotted:
            alpha = _peft_alpha(peft_md, target, stem, g)
        if alpha == 0:  # kohya and LyCORIS both read alpha 0 as "no scaling"
            alpha = None
        name = stem
        if not dotted:
            name = stem[len(next(p for p in KOHYA_PREFIXES if stem.startswith(p))):]
        modules.append(LoraModule(stem, target, name, dotted, fmt, g, alpha))
    if not modules:
        raise LoraError(f"LoRA {path.name} contains no LoRA weights", where=path, fix="pick another file")
    return LoraFile(path, modules, dict(metadata), ignored)


def _detect_format(stem: str, g: dict[str, torch.Tensor], hints: set[str | None], path: Path) -> str:
    roles = set(g) - {"alpha"}
    if roles and roles <= {"down", "up", "mid"} and {"down", "up"} <= roles:
        fmt = next((h for h in hints if h), None)
        if fmt:
            return fmt
        spatial = "mid" in g or (g["down"].dim() == 4 and g["down"].shape[-1] > 1)
        return LOCON if spatial else LORA
    hada = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    if hada <= roles and roles - hada in (set(), {"hada_t1", "hada_t2"}):
        return LOHA
    has_w1 = ("lokr_w1" in roles) != ({"lokr_w1_a", "lokr_w1_b"} <= roles)
    has_w2 = ("lokr_w2" in roles) != ({"lokr_w2_a", "lokr_w2_b"} <= roles)
    extra = roles - {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    if has_w1 and has_w2 and not extra and ("lokr_t2" not in roles or "lokr_w2_a" in roles):
        return LOKR
    raise LoraError(f"LoRA {path.name}: module {stem} has an incomplete or mixed set of tensors: "
                    f"{', '.join(sorted(roles))}", where=path, fix="the file is damaged or of an unknown variant")


def _scalar(t: torch.Tensor, stem: str, path: Path) -> float:
    if t.numel() != 1:
        raise LoraError(f"LoRA {path.name}: alpha of {stem} is not a single number (shape {tuple(t.shape)})",
                        where=path, fix="the file is damaged; re-download or re-export it")
    return t.float().item()


def _peft_metadata(metadata: dict[str, str]) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _peft_alpha(md: dict, target: str, stem: str, g: dict[str, torch.Tensor]) -> float | None:
    """Alpha from diffusers' saved PEFT config (``lora_alpha`` plus ``alpha_pattern``/rsLoRA), if any."""
    prefix = "" if target == "auto" else target + "."
    alpha = md.get(prefix + "lora_alpha")
    for pattern, value in (md.get(prefix + "alpha_pattern") or {}).items():
        try:  # PEFT treats patterns as regexes matched against the module name's tail
            hit = re.fullmatch(rf"(.*\.)?(?:{pattern})", stem)
        except re.error:
            hit = stem == pattern or stem.endswith("." + pattern)
        if hit:
            alpha = value
    if alpha is None:
        return None
    if md.get(prefix + "use_rslora"):  # PEFT scales rsLoRA by alpha/sqrt(r); fold that into alpha/r
        alpha = float(alpha) * math.sqrt(g["down"].shape[0])
    return float(alpha)


def list_examples(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
