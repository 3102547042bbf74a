"""Where models and outputs live: the A1111 folder layout, and name resolution."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mlsd.errors import InputFileError, ModelNotFoundError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
SUBDIRS = {
    "checkpoint": ("Stable-diffusion",),
    "lora": ("Lora", "LyCORIS"),
    "vae": ("VAE",),
    "coreml": ("Core-ML",),
}


def settings_path() -> Path:
    try:
        from platformdirs import user_config_dir

        base = Path(user_config_dir("mlsd"))
    except ImportError:  # platformdirs is a dependency, but settings must never break the CLI
        base = Path.home() / ".config" / "mlsd"
    return Path(os.environ.get("MLSD_SETTINGS", base / "settings.toml"))


def read_settings(path: Path | None = None) -> dict:
    path = path or settings_path()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"The settings file is not valid TOML ({e}).", where=path,
                             fix="fix or delete the settings file") from e


@dataclass(frozen=True)
class ModelsDir:
    root: Path
    source: str  # "option" | "MLSD_MODELS_DIR" | "settings" | "default"

    def folder(self, kind: str) -> Path:
        return self.root / SUBDIRS[kind][0]

    def folders(self, kind: str) -> list[Path]:
        return [self.root / s for s in SUBDIRS[kind]]

    @property
    def embeddings(self) -> Path:
        # A1111 keeps embeddings beside models/, not inside it.
        return self.root.parent / "embeddings" if self.root.name == "models" else self.root / "embeddings"

    def list(self, kind: str) -> list[Path]:
        found: list[Path] = []
        for folder in self.folders(kind):
            if not folder.is_dir():
                continue
            if kind == "coreml":
                found += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
                continue
            for p in sorted(folder.rglob("*")):
                if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES and not p.name.startswith("."):
                    found.append(p)
                elif kind == "checkpoint" and p.is_dir() and (p / "model_index.json").is_file():
                    found.append(p)
        return found

    def resolve(self, name: str | Path, kind: str = "checkpoint") -> Path:
        """A path as given, else a name (with or without suffix, any subfolder) in the models directory."""
        as_path = Path(name).expanduser()
        if as_path.exists():
            return as_path
        stem = as_path.name
        candidates = [p for p in self.list(kind) if p.name == stem or p.stem == stem or _no_suffix(p.name) == stem]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ModelNotFoundError(
                f"The name '{name}' matches several files: {', '.join(str(c) for c in candidates[:5])}.",
                where=self.folder(kind), fix="pass the full file name or path")
        available = ", ".join(_no_suffix(p.name) for p in self.list(kind)[:10]) or "(none)"
        raise ModelNotFoundError(
            f"No {kind} named '{name}' (not a path, and not in the models directory).",
            where=f"{', '.join(str(f) for f in self.folders(kind))} (models directory from {self.source})",
            fix=f"pass a path, or one of: {available}; set the root with --models-dir or MLSD_MODELS_DIR")


def _no_suffix(name: str) -> str:
    for s in CHECKPOINT_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def models_dir(option: str | Path | None = None) -> ModelsDir:
    """--models-dir, else MLSD_MODELS_DIR, else the settings file, else ./models."""
    if option:
        return ModelsDir(Path(option).expanduser(), "option")
    env = os.environ.get("MLSD_MODELS_DIR")
    if env:
        return ModelsDir(Path(env).expanduser(), "MLSD_MODELS_DIR")
    configured = read_settings().get("models_dir")
    if configured:
        return ModelsDir(Path(configured).expanduser(), "settings")
    return ModelsDir(Path("models"), "default")
