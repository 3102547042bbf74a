"""A bundle folder: the Core ML packages of one model plus tokenizer files and the mlsd.json manifest.

A bundle only ever appears complete: everything is written into a temporary
sibling folder and renamed into place; an existing bundle is swapped out only
once the new one is finished. Components whose recorded recipe (source hash,
LoRAs, options) matches are carried over instead of converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlsd.errors import MlsdError

MANIFEST = "mlsd.json"
PACKAGE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
                 "vae_encoder": "VAEEncoder"}
FORMAT_VERSION = 1


class BundleError(MlsdError):
    title = "Cannot write bundle"


def unet_package_names(chunks: int) -> list[str]:
    return ["Unet.mlpackage"] if chunks == 1 else [f"UnetChunk{i}.mlpackage" for i in range(1, chunks + 1)]


def recipe_hash(recipe: dict) -> str:
    """Stable digest of everything that determines a component's bytes."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(bundle: Path) -> dict | None:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


@dataclass
class BundleWriter:
    """Writes into `<target>.partial-<pid>` and publishes atomically with `commit()`."""

    target: Path
    manifest: dict = field(default_factory=dict)
    previous: dict | None = None

    def __post_init__(self):
        self.target = Path(self.target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.target.parent.glob(f".{self.target.name}.partial-*"):
            if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
                shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
        self.work = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        self.previous = read_manifest(self.target)
        self.manifest.setdefault("components", {})

    def reusable(self, component: str, recipe: str) -> bool:
        """True when the published bundle already holds this component built from the same recipe."""
        old = (self.previous or {}).get("components", {}).get(component)
        if not old or old.get("recipe") != recipe:
            return False
        return all((self.target / name).exists() for name in old.get("files", []))

    def carry_over(self, component: str) -> dict:
        old = self.previous["components"][component]
        for name in old["files"]:
            src, dst = self.target / name, self.work / name
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
        entry = dict(old, reused=True)
        self.manifest["components"][component] = entry
        return entry

    def record(self, component: str, recipe: str, files: list[str], seconds: float, **extra) -> dict:
        entry = {"recipe": recipe, "files": files, "seconds": round(seconds, 3), "reused": False, **extra}
        self.manifest["components"][component] = entry
        return entry

    def path(self, name: str) -> Path:
        return self.work / name

    def commit(self) -> Path:
        self.manifest["format_version"] = FORMAT_VERSION
        self.manifest["written_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp = self.work / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, self.work / MANIFEST)
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
        try:
            os.replace(self.work, self.target)
        except OSError:
            if old is not None:
                os.replace(old, self.target)  # put the previous bundle back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def _link_or_copy(src, dst, *, follow_symlinks=True):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def check_free_space(folder: Path, needed_bytes: int) -> None:
    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise BundleError(
            f"Not enough free disk space: about {needed_bytes / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free.", where=probe, fix="free some space or write the bundle elsewhere (-o)")
