"""Recognise Core ML Stable Diffusion folders, whoever converted them, and say what they hold.

Layouts, told apart by file names (and by the packages' inputs/outputs where names say nothing):

- ``mlsd bundle``: mlsd's own folder; ``mlsd.json`` holds the manifest.
- ``apple-packages``: Apple's torch2coreml output, ``<prefix>_{text_encoder,unet,unet_chunk1,...}.mlpackage``
  with ``<prefix>`` = ``Stable_Diffusion_version_<model>``.
- ``apple-hf-repo``: a Hugging Face ``apple/coreml-*`` download: ``original|split_einsum / packages|compiled``.
- ``mochi-resources``: Apple's Swift pipeline / MochiDiffusion ``Resources``: ``TextEncoder``, ``Unet`` or
  ``UnetChunk1..2``, ``VAEDecoder``, ``VAEEncoder`` (``.mlmodelc``, or ``.mlpackage`` stand-ins), vocab, merges.
- ``packages-by-io``: any other folder of ``.mlpackage`` files, each part told by its inputs and outputs.

Without ``mlsd.json`` the manifest is inferred from the specs alone (no weights are read): family from the
text encoder's width, inpainting and size from the UNet's ``sample``, attention from its ops.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mlsd.coreml.package_info import PackageInfo, read_package, role_by_io
from mlsd.errors import InputFileError, UnsupportedModelError, UsageError

__all__ = ["Layout", "PackageInfo", "describe_folder", "read_layout", "read_package", "recognise",
           "role_by_io"]

MLSD, APPLE, HF_REPO, RESOURCES, BY_IO, SINGLE = (
    "mlsd bundle", "apple-packages", "apple-hf-repo", "mochi-resources", "packages-by-io", "single package")
SUFFIXES = (".mlpackage", ".mlmodelc")
# Swift pipeline resource names -> the roles of Apple's converter (its `submodule_name`s).
RESOURCE_ROLES = {
    "TextEncoder": "text_encoder", "TextEncoder2": "text_encoder_2", "Unet": "unet", "UnetChunk1": "unet_chunk1",
    "UnetChunk2": "unet_chunk2", "ControlledUnet": "control-unet", "ControlledUnetChunk1": "control-unet_chunk1",
    "ControlledUnetChunk2": "control-unet_chunk2", "VAEDecoder": "vae_decoder", "VAEEncoder": "vae_encoder",
    "SafetyChecker": "safety_checker", "UnetRefiner": "refiner", "ImageEncoder": "image_encoder",
    "MultilingualTextEncoderProjection": "multilingual_projection",
}
_APPLE_NAME = re.compile(
    r"^(?P<prefix>.+?)_(?P<role>text_encoder_2|text_encoder|control-unet(?:_chunk\d+)?|unet(?:_chunk\d+)?|"
    r"vae_decoder|vae_encoder|safety_checker|refiner|controlnet|image_encoder)$")
_UNSUPPORTED = {"text_encoder_2": "a second text encoder (Stable Diffusion XL)",
                "refiner": "an SDXL refiner UNet"}
_IGNORED = ("safety_checker", "controlnet", "image_encoder", "multilingual_projection")
_WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}
COMPILED_ONLY_ON_MACOS = "Compiled Core ML models (.mlmodelc) load only through Core ML, which exists only on macOS"


@dataclass
class Layout:
    root: Path
    kind: str
    text_encoder: Path | None
    unet: list[Path]  # one package, or the chunks in the order they run
    vae_decoder: Path | None
    vae_encoder: Path | None
    tokenizer: Path | None  # folder with vocab.json and merges.txt; None: mlsd's shipped CLIP tokenizer
    ignored: dict[str, Path] = field(default_factory=dict)  # e.g. the safety checker: listed, never run
    manifest: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was inferred or assumed, worth telling the user
    variants: list[str] = field(default_factory=list)  # an HF repo's other attention/format folders
    parts_kind: str = ""  # the naming the parts follow (an HF repo's folders use Apple's or the Swift names)
    parts_folder: Path | None = None
    refused: list[Path] = field(default_factory=list)  # compiled-only parts this OS cannot load

    @property
    def packages(self) -> list[Path]:
        return [p for p in (self.text_encoder, *self.unet, self.vae_decoder, self.vae_encoder) if p is not None]

    def summary(self) -> dict:
        """For `mlsd models`: layout, family, size, attention, and which compute unit suits it."""
        m = self.manifest
        options = m.get("options", {})
        attention = options.get("attention")
        unet = m.get("components", {}).get("unet", {})
        if self.kind == MLSD:  # mlsd.json records what a foreign folder's specs only imply
            unet = unet | {"palettized": bool(options.get("quantize_bits"))}
            m = m | {"target": options.get("min_target")}
        out = {"layout": self.kind, "family": m.get("family"), "size": ",".join(options.get("sizes", [])),
               "attention": attention, "compute_unit": compute_unit_advice(attention),
               "inpainting": bool(m.get("inpainting")), "prediction_type": m.get("prediction_type"),
               "chunks": len(self.unet), "palettized": bool(unet.get("palettized")),
               "controlnet_ready": bool(unet.get("residual_inputs")), "target": m.get("target"),
               "ignored": sorted(self.ignored), "compiled": any(p.suffix == ".mlmodelc" for p in self.packages)}
        if self.variants:
            out["variants"] = self.variants
        if self.notes:
            out["notes"] = self.notes
        return out


def describe_folder(path: str | Path) -> dict:
    """`mlsd models`: a Core ML folder described whatever the OS (compiled parts are read, not loaded)."""
    layout = read_layout(path, compiled_ok=True)
    out = layout.summary()
    if out["compiled"] and sys.platform != "darwin":
        out["runs_here"] = False
        out.setdefault("notes", []).append(f"{COMPILED_ONLY_ON_MACOS}: needs a Mac, or the .mlpackage version")
    return out


def summary_line(summary: dict, *, family: bool = True) -> str:
    """A `describe_folder` summary in one line: layout, (family,) size, attention, compute-unit advice,
    and what runs or is skipped - as `mlsd models` and the TUI's Models screen show it."""
    kind = (summary.get("family") or "") + (" inpainting" if summary.get("inpainting") else "")
    words = [summary.get("layout"), kind if family else None, summary.get("size"), summary.get("attention"),
             f"compute unit {summary.get('compute_unit')}"]
    if summary.get("chunks", 1) > 1:
        words.append(f"{summary['chunks']} UNet chunks")
    if summary.get("palettized"):
        words.append("palettized")
    if summary.get("controlnet_ready"):
        words.append("ControlNet-ready UNet")
    if summary.get("ignored"):
        words.append(f"ignored: {', '.join(summary['ignored'])}")
    if summary.get("runs_here") is False:
        words.append("(compiled: macOS only)")
    return " ".join(str(w) for w in words if w)


def compute_unit_advice(attention: str | None) -> str:
    # Apple's split_einsum kernels are laid out for the Neural Engine; the original attention runs best on GPU.
    return {"original": "gpu"}.get(attention or "", "ane")


# --------------------------------------------------------------------------- names only (cheap)
def _role_of(name: str) -> tuple[str | None, str | None]:
    """(layout kind, role) from a package's file name."""
    stem = name.rsplit(".", 1)[0]
    if stem in RESOURCE_ROLES:
        return RESOURCES, RESOURCE_ROLES[stem]
    m = _APPLE_NAME.match(stem)
    return (APPLE, m["role"]) if m else (None, None)


def _packages_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _hf_variants(folder: Path) -> dict[tuple[str, str], Path]:
    return {(a, f): folder / a / f for a in ("split_einsum", "original") for f in ("packages", "compiled")
            if (folder / a / f).is_dir() and _packages_in(folder / a / f)}


def recognise(path: str | Path) -> str | None:
    """The layout kind of a folder (or a single package) from file names alone; None if it is no Core ML model."""
    path = Path(path)
    if not path.is_dir():
        return None
    if path.suffix in SUFFIXES:
        return SINGLE
    if (path / "mlsd.json").is_file():
        return MLSD
    if _hf_variants(path):
        return HF_REPO
    packages = _packages_in(path)
    kinds = {_role_of(p.name)[0] for p in packages}
    if APPLE in kinds:
        return APPLE
    if RESOURCES in kinds:
        return RESOURCES
    if (path / "Resources").is_dir() and _packages_in(path / "Resources"):
        return RESOURCES
    return BY_IO if any(p.suffix == ".mlpackage" for p in packages) else None


# --------------------------------------------------------------------------- reading a folder
def read_layout(path: str | Path, *, family: str | None = None, prediction_type: str | None = None,
                attention: str | None = None, compiled_ok: bool | None = None,
                require_complete: bool = True) -> Layout:
    """Recognise `path` and return its parts and manifest. `attention` picks an HF repo's variant;
    `compiled_ok` (default: on macOS) allows .mlmodelc parts where no .mlpackage sibling exists."""
    path = Path(path)
    compiled_ok = sys.platform == "darwin" if compiled_ok is None else compiled_ok
    kind = recognise(path)
    if kind is None:
        raise InputFileError("No Core ML model here: no mlsd.json, and no .mlpackage or .mlmodelc parts.",
                             where=path, fix="pass an mlsd bundle, Apple's converted folder or a Resources folder"
                             + _zip_hint(path))
    if kind == MLSD:
        return _mlsd_layout(path)
    if kind == SINGLE:
        layout = _single(path)
    elif kind == HF_REPO:
        layout = _hf_repo(path, attention, compiled_ok)
    else:
        root = path / "Resources" if kind == RESOURCES and not _named_parts(path) else path
        layout = _folder(root, kind, compiled_ok)
        packages = root.parent / "packages"
        if layout.refused and root.name == "compiled" and recognise(packages) == APPLE:
            # An HF repo's compiled/ folder, given directly where Core ML cannot load it: its packages/ sibling.
            layout = _folder(packages, APPLE, compiled_ok)
            layout.notes.append(f"{COMPILED_ONLY_ON_MACOS}: running the .mlpackage siblings in {packages}")
            layout.tokenizer = layout.tokenizer or _tokenizer_folder(root)
        layout.root = path
    _infer_manifest(layout, family, prediction_type, require_complete)
    return layout


def _zip_hint(path: Path) -> str:
    zips = sorted(p.name for p in path.glob("*.zip")) if path.is_dir() else []
    return f"; unzip {', '.join(zips)} first" if zips else ""


def _named_parts(folder: Path) -> dict[str, dict[str, Path]]:
    """role -> {suffix: path} for packages named after Apple's or the Swift pipeline's conventions."""
    found: dict[str, dict[str, Path]] = {}
    prefixes = set()
    for p in _packages_in(folder):
        kind, role = _role_of(p.name)
        if role is None:
            continue
        if kind == APPLE:
            prefixes.add(_APPLE_NAME.match(p.name.rsplit(".", 1)[0])["prefix"])
        found.setdefault(role, {})[p.suffix] = p
    if len(prefixes) > 1:
        raise InputFileError(f"This folder holds the parts of several models: {', '.join(sorted(prefixes))}.",
                             where=folder, fix="move each model's packages into a folder of its own")
    return found


def _by_io(folder: Path) -> dict[str, dict[str, Path]]:
    """Unknown names: each .mlpackage's role read from its inputs and outputs; UNet parts get chunk numbers."""
    found: dict[str, dict[str, Path]] = {}
    unet_parts = []
    for p in _packages_in(folder):
        if p.suffix != ".mlpackage":
            continue
        info = read_package(p)
        role = role_by_io(info)
        if role == "unet":
            unet_parts.append(info)
        elif role is not None:
            found.setdefault(role, {})[".mlpackage"] = p
    ordered = _order_chunks(unet_parts, folder)
    if len(ordered) == 1:
        found["unet"] = {".mlpackage": ordered[0].path}
    for i, info in enumerate(ordered if len(ordered) > 1 else [], start=1):
        found[f"unet_chunk{i}"] = {".mlpackage": info.path}
    return found


def _order_chunks(parts: list[PackageInfo], folder: Path) -> list[PackageInfo]:
    """Chunks run in the order their tensors flow: each one's inputs are earlier outputs or the UNet's inputs."""
    available = {"sample", "timestep", "encoder_hidden_states"}
    ordered, left = [], list(parts)
    while left:
        ready = [p for p in left if set(p.inputs) <= available | {n for n in p.inputs
                                                                  if n.startswith("additional_residual_")}]
        if len(ready) != 1:
            raise InputFileError("Cannot tell the order of the UNet parts from their inputs and outputs.",
                                 where=folder, fix="name them as Apple's converter does (..._unet_chunk1, ...)")
        ordered.append(ready[0])
        left.remove(ready[0])
        available |= set(ready[0].outputs)
    return ordered


def _pick(role: str, variants: dict[str, Path], compiled_ok: bool) -> tuple[Path | None, bool]:
    """(path, refused): the .mlpackage when there is one, else the .mlmodelc where Core ML can load it."""
    if ".mlpackage" in variants:
        return variants[".mlpackage"], False
    if ".mlmodelc" in variants:
        return (variants[".mlmodelc"], False) if compiled_ok else (None, True)
    return None, False


def _folder(folder: Path, kind: str, compiled_ok: bool) -> Layout:
    found = _named_parts(folder) if kind in (APPLE, RESOURCES) else _by_io(folder)
    for role, what in _UNSUPPORTED.items():
        if role in found:
            raise UnsupportedModelError(f"This folder holds {what}, which mlsd does not run (SD 1.x and 2.x only).",
                                        where=folder, fix="use a Stable Diffusion 1.x or 2.x model")
    chosen: dict[str, Path] = {}
    refused: list[Path] = []
    for role, variants in found.items():
        picked, was_refused = _pick(role, variants, compiled_ok)
        if picked is not None:
            chosen[role] = picked
        elif was_refused:
            refused.append(variants[".mlmodelc"])
    layout = Layout(folder, kind, chosen.get("text_encoder"), [], chosen.get("vae_decoder"),
                    chosen.get("vae_encoder"), _tokenizer_folder(folder))
    layout.ignored = {r: p for r, p in chosen.items() if r in _IGNORED}
    layout.ignored |= {r: v[".mlmodelc"] for r, v in found.items()
                       if r in _IGNORED and r not in chosen and ".mlmodelc" in v}
    refused = [p for p in refused if _role_of(p.name)[1] not in _IGNORED]
    layout.parts_kind, layout.parts_folder = kind, folder
    if any(".mlmodelc" in v and ".mlpackage" in v for v in found.values()):
        layout.notes.append("compiled .mlmodelc parts skipped: their .mlpackage siblings run instead")
    layout.unet, unet_note = _unet_parts(chosen, found, kind, folder, refused)
    if unet_note:
        layout.notes.append(unet_note)
    layout.refused = refused
    return layout


def _unet_parts(chosen: dict[str, Path], found: dict, kind: str, folder: Path,
                refused: list[Path]) -> tuple[list[Path], str | None]:
    """Chunks when all of them are there (as Apple's Swift pipeline prefers), else the single UNet; plain
    before ControlNet-ready ones."""
    for base in ("unet", "control-unet"):
        numbers = sorted(int(r.rsplit("chunk", 1)[1]) for r in found if r.startswith(f"{base}_chunk"))
        chunks = [chosen.get(f"{base}_chunk{i}") for i in range(1, max(numbers, default=0) + 1)]
        if numbers and len(chunks) >= 2 and all(chunks):
            return chunks, None
        if base in chosen:
            note = f"incomplete {base} chunks ignored; the single {base} package runs" if numbers else None
            return [chosen[base]], note
        if numbers and not any(_role_of(p.name)[1].startswith(base) for p in refused):
            have = {int(r.rsplit("chunk", 1)[1]) for r in found if r.startswith(f"{base}_chunk")}
            want = set(range(1, max(max(have), 2) + 1))
            missing = [_part_name(kind, f"{base}_chunk{i}", folder) for i in sorted(want - have)]
            raise InputFileError(f"This {kind} folder is incomplete: {', '.join(missing)} is missing "
                                 "(its UNet is split into chunks, and each one is needed).", where=folder,
                                 fix="download or copy the missing chunk into the folder")
    return [], None


def _part_name(kind: str, role: str, folder: Path) -> str:
    if kind == RESOURCES:
        names = {v: k for k, v in RESOURCE_ROLES.items()}
        return f"{names[role]}.mlmodelc (or .mlpackage)"
    if kind == APPLE:
        prefixes = {_APPLE_NAME.match(p.name.rsplit('.', 1)[0])["prefix"] for p in _packages_in(folder)
                    if _role_of(p.name)[0] == APPLE}
        prefix = next(iter(prefixes), "Stable_Diffusion_version_<model>")
        return f"{prefix}_{role}.mlpackage"
    return role.replace("_", " ")


def _tokenizer_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "Resources", folder.parent / "compiled"):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    return None


def _hf_repo(path: Path, attention: str | None, compiled_ok: bool) -> Layout:
    variants = _hf_variants(path)
    names = [f"{a}/{f}" for a, f in variants]
    attentions = [a for a in ("split_einsum", "original") if any(k[0] == a for k in variants)]
    if attention is not None and attention not in attentions:
        raise UsageError(f"This repository has no {attention} models (it has: {', '.join(names)}).", where=path,
                         fix="pick another compute unit, or download that variant")
    wanted = attention or attentions[0]
    formats = [f for f in ("packages", "compiled") if (wanted, f) in variants]
    usable = [f for f in formats if f == "packages" or compiled_ok]
    if not usable:
        others = [n for n in names if n.endswith("packages")]
        raise UsageError(f"{COMPILED_ONLY_ON_MACOS}; this repository holds {wanted} only as {wanted}/compiled, "
                         f"and this machine runs {sys.platform}.", where=path / wanted / "compiled",
                         fix=f"use {', '.join(others)}" if others else f"download {wanted}/packages, or run on a Mac")
    folder = variants[(wanted, usable[0])]
    kind = recognise(folder)
    layout = _folder(folder, kind if kind in (APPLE, RESOURCES) else BY_IO, compiled_ok)
    layout.kind, layout.root = HF_REPO, path
    layout.variants = names
    layout.notes.append(f"runs {wanted}/{usable[0]} (the repository has {', '.join(names)})")
    if layout.tokenizer is None and (path / wanted / "compiled" / "vocab.json").is_file():
        layout.tokenizer = path / wanted / "compiled"
    return layout


def _single(path: Path) -> Layout:
    info = read_package(path)
    role = role_by_io(info)
    if role is None:
        raise InputFileError("This package is not a Stable Diffusion part: its inputs and outputs follow none of "
                             f"Apple's (it takes {', '.join(info.inputs) or 'nothing'}).", where=path,
                             fix="pass the folder holding the model's packages")
    layout = Layout(path.parent, SINGLE, None, [], None, None, None)
    setattr(layout, role, path) if role != "unet" else layout.unet.append(path)
    return layout


def _mlsd_layout(path: Path) -> Layout:
    manifest = json.loads((path / "mlsd.json").read_text(encoding="utf-8"))
    components = manifest.get("components", {})

    def first(name: str) -> Path | None:
        files = components.get(name, {}).get("files")
        return path / files[0] if files else None

    return Layout(path, MLSD, first("text_encoder"), [path / f for f in components.get("unet", {}).get("files", [])],
                  first("vae_decoder"), first("vae_encoder"), path if (path / "vocab.json").is_file() else None,
                  manifest=manifest)


# --------------------------------------------------------------------------- the inferred manifest
def _infer_manifest(layout: Layout, family: str | None, prediction_type: str | None, complete: bool) -> None:
    refused = layout.refused
    where = layout.root
    if complete:
        if layout.kind == SINGLE:
            raise UsageError("A single package cannot make images: generation needs the text encoder, UNet and "
                             "VAE decoder together.", where=layout.packages[0],
                             fix="pass the folder that holds all the parts")
        if refused:
            raise UsageError(f"{COMPILED_ONLY_ON_MACOS}, and this machine runs {sys.platform}: "
                             f"{', '.join(p.name for p in refused)} has no .mlpackage sibling here.", where=where,
                             fix="use the .mlpackage version of this model (Apple's repositories ship "
                                 "packages/ beside compiled/), or run on a Mac")
        missing = [r for r, p in (("text_encoder", layout.text_encoder), ("unet", layout.unet),
                                  ("vae_decoder", layout.vae_decoder)) if not p]
        if missing:
            names = ", ".join(_part_name(layout.parts_kind, r, layout.parts_folder or where) for r in missing)
            raise InputFileError(f"This {layout.kind} folder is incomplete: {names} is missing.", where=where,
                                 fix="download or copy the missing part into the folder")
    infos = {p: read_package(p) for p in layout.packages}
    te = infos.get(layout.text_encoder)
    unets = [infos[p] for p in layout.unet]
    dec = infos.get(layout.vae_decoder)
    # A lone UNet package may be one chunk of several: what it must take or give depends on its place.
    _check_contract(te, unets if layout.kind != SINGLE else [], dec, infos.get(layout.vae_encoder), where)
    hidden = te.outputs.get("last_hidden_state", ((), ""))[0] if te else ()
    width = hidden[-1] if hidden else None
    if unets and "encoder_hidden_states" in unets[0].inputs:
        context = unets[0].inputs["encoder_hidden_states"][0][1]
        if width and context != width:
            raise InputFileError(f"The text encoder gives {width}-wide states and the UNet takes {context}: these "
                                 "parts come from different models.", where=where, fix="use one model's parts")
        width = width or context
    if family is None:
        family = _WIDTH_FAMILY.get(width)
        if family is None:
            family = "sd1"
            layout.notes.append(f"text width {width} is neither SD1's 768 nor SD2's 1024: SD1 settings assumed "
                                "(set --family to change)" if width else "no text width to tell the family by: "
                                "SD1 settings assumed (set --family to change)")
    sample = unets[0].inputs.get("sample", ((), ""))[0] if unets else ()
    scale = 8
    if dec and dec.inputs.get("z", ((),))[0] and dec.outputs.get("image", ((),))[0]:
        scale = dec.outputs["image"][0][2] // max(1, dec.inputs["z"][0][2])
        if len(sample) == 4 and tuple(dec.inputs["z"][0][2:]) != tuple(sample[2:]):
            raise InputFileError(f"The VAE decoder takes {tuple(dec.inputs['z'][0][2:])} latents and the UNet makes "
                                 f"{tuple(sample[2:])}: these parts were converted for different sizes.",
                                 where=where, fix="use parts converted for one size")
    size = f"{sample[3] * scale}x{sample[2] * scale}" if len(sample) == 4 else None
    ops = frozenset().union(*(u.op_types for u in unets)) if unets else frozenset()
    axes = frozenset().union(*(u.softmax_axes for u in unets)) if unets else frozenset()
    # Per-head einsums with the softmax over the key axis 1 are the ANE layout; mlsd's own "original"
    # kernel also uses einsum, but with the softmax over the last axis.
    attention = "split_einsum" if "einsum" in ops and (not axes or axes & {1, -3}) else "original"
    prediction_type, source = _prediction(family, sample, prediction_type)
    if source != "--prediction-type":
        layout.notes.append(f"prediction type {prediction_type} {source}; set --prediction-type to change")
    residuals = sorted(n for u in unets for n in u.inputs if n.startswith("additional_residual_"))
    if residuals:
        layout.notes.append(f"ControlNet-ready UNet: its {len(residuals)} residual inputs get zeros (no ControlNet)")
    if layout.ignored.get("safety_checker"):
        layout.notes.append("safety checker listed and ignored (mlsd does not filter images)")
    root = layout.root

    def rel(p: Path | None) -> list[str]:
        return [str(p.relative_to(root)) if p.is_relative_to(root) else str(p)] if p else []

    components = {}
    if te:
        components["text_encoder"] = {"files": rel(layout.text_encoder)}
    if unets:
        components["unet"] = {"files": [f for p in layout.unet for f in rel(p)], "functions": ["main"],
                              "sizes": [{"size": size}] if size else [], "attention": attention,
                              "residual_inputs": residuals, "palettized": "constexpr_lut_to_dense" in ops}
    for name, info, path in (("vae_decoder", dec, layout.vae_decoder),
                             ("vae_encoder", infos.get(layout.vae_encoder), layout.vae_encoder)):
        if info:
            components[name] = {"files": rel(path), "io": {
                key: {n: {"shape": list(s), "dtype": d} for n, (s, d) in getattr(info, key).items()}
                for key in ("inputs", "outputs")}}
    targets = sorted({i.target for i in infos.values() if i.target})
    layout.manifest = {
        "layout": layout.kind, "family": family, "inpainting": len(sample) == 4 and sample[1] == 9,
        "prediction_type": prediction_type, "prediction_source": source, "clip_skip": 1,
        "vae_scaling_factor": 0.18215, "source": None, "target": targets[0] if targets else None,
        "options": {"attention": attention, "sizes": [size] if size else [], "chunks": len(layout.unet)},
        "components": components, "ignored": {k: str(v) for k, v in layout.ignored.items()},
    }


def _prediction(family: str, sample: tuple, given: str | None) -> tuple[str, str]:
    if given:
        return given, "--prediction-type"
    if family == "sd2":
        # Apple publishes SD2 "base" (512, epsilon) models; 768 px SD2 models are the v-prediction ones.
        if len(sample) == 4 and sample[2] * 8 >= 768:
            return "v_prediction", "assumed from the 768 px SD2 size (cannot be read from Core ML packages)"
        return "epsilon", "assumed for an SD2 base-size model (cannot be read from Core ML packages)"
    return "epsilon", "assumed for SD1 (cannot be read from Core ML packages)"


def _check_contract(te, unets, dec, enc, where: Path) -> None:
    """Apple's I/O names are what the backend feeds; say which part breaks them, and how."""
    rules = [(te, {"input_ids"}, {"last_hidden_state"}, "text encoder"), (dec, {"z"}, {"image"}, "VAE decoder"),
             (enc, {"x"}, {"latent"}, "VAE encoder")]
    if unets:
        rules.append((unets[0], {"sample", "timestep", "encoder_hidden_states"}, set(), "UNet"))
        rules.append((unets[-1], set(), {"noise_pred"}, "UNet (last part)"))
    for info, ins, outs, what in rules:
        if info is None or info.compiled and not info.inputs:
            continue  # a compiled model without readable metadata: Core ML will say
        lacking = sorted((ins - set(info.inputs)) | (outs - set(info.outputs)))
        if lacking:
            raise InputFileError(
                f"The {what} does not follow Apple's I/O contract: it lacks {', '.join(lacking)} (it has inputs "
                f"{', '.join(info.inputs)}; outputs {', '.join(info.outputs)}).", where=info.path,
                fix="use packages converted by Apple's ml-stable-diffusion, MochiDiffusion's tools or mlsd convert")
