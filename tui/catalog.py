"""What the models directory holds, with the facts the UI shows next to each name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlsd.errors import MlsdError
from mlsd.paths import ModelsDir

_FAMILY_BADGES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
MLSD = "mlsd bundle"  # mlsd.coreml.layouts.MLSD; importing that module would load torch at startup


@dataclass
class ModelEntry:
    kind: str  # "checkpoint" | "coreml" | "lora" | "vae"
    path: Path
    family: str | None = None  # a short badge such as "SD 1.x inpaint"
    error: str | None = None  # why the file could not be described
    coreml: list[Path] = field(default_factory=list)  # Core ML bundles converted from this checkpoint
    layout: dict | None = None  # a Core ML folder's summary, as `mlsd models` lists it (mlsd.coreml.layouts)

    @property
    def name(self) -> str:
        return display_name(self.path)

    @property
    def badge(self) -> str:
        if self.kind == "coreml":
            return " · ".join(w for w in (self._coreml_kind, "unreadable" if self.error else self.family) if w)
        if self.error:
            return "unreadable"
        return self.family or ""

    @property
    def _coreml_kind(self) -> str:
        if self.layout is None:
            return "Core ML"  # not described yet (or unreadable)
        if self.layout["layout"] == MLSD:
            return "Core ML bundle"
        return f"Core ML {self.layout['layout']}"  # converted elsewhere: which tool's folder it is

    @property
    def coreml_detail(self) -> str:
        """A Core ML folder in one line: what `mlsd models` says after the family."""
        s = self.layout
        if not s:
            return ""
        from mlsd.coreml.layouts import summary_line

        return summary_line(s, family=False)

    @property
    def label(self) -> str:
        return f"{self.name} · {self.badge}" if self.badge else self.name


def display_name(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def bundles_for(checkpoint: Path, bundles: list[Path]) -> list[Path]:
    # The converter names bundles "<checkpoint stem>[-<lora stems>]-<options>".
    stem = display_name(checkpoint)
    return [b for b in bundles if b.name.startswith(stem)]


def list_models(root: ModelsDir, extra: list[Path] = ()) -> list[ModelEntry]:
    """Directory listing only (fast): checkpoints then Core ML folders (mlsd's bundles and those converted
    elsewhere), no file is opened.

    ``extra``: paths outside the folder (a --model PATH) that are not listed there already.
    """
    bundles = root.list("coreml")
    checkpoints = root.list("checkpoint")
    known = {str(p) for p in [*checkpoints, *bundles]}
    outside = [Path(p) for p in extra if str(p) not in known and Path(p).exists()]
    entries = [ModelEntry("coreml" if _is_bundle(p) else "checkpoint", p, coreml=bundles_for(p, bundles))
               for p in [*outside, *checkpoints]]
    return entries + [ModelEntry("coreml", b) for b in bundles]


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and not (path / "model_index.json").is_file()


def describe_entry(entry: ModelEntry) -> ModelEntry:
    """Fill in the family (reads the file's tensor names and shapes, or a Core ML folder's package specs;
    no hashing, no weights)."""
    from mlsd.describe import describe
    from tui.workers import warm_imports

    warm_imports()
    try:
        if entry.kind == "coreml":
            return _describe_coreml(entry)
        info = describe(entry.path, with_hash=False)
    except MlsdError as e:
        entry.error = e.what
        return entry
    except Exception as e:  # noqa: BLE001 - one odd file must not hide the rest of the listing
        entry.error = f"{type(e).__name__}: {e}"
        return entry
    family = _FAMILY_BADGES.get(str(info.get("family")), info.get("family"))
    if entry.kind == "checkpoint":
        entry.family = f"{family} inpaint" if info.get("inpainting") else family
    else:
        entry.family = info.get("kind")
    return entry


def _describe_coreml(entry: ModelEntry) -> ModelEntry:
    from mlsd.coreml.layouts import describe_folder

    entry.layout = describe_folder(entry.path)
    family = _FAMILY_BADGES.get(str(entry.layout.get("family")), entry.layout.get("family"))
    size = entry.layout.get("size")
    words = [family, "inpaint" if entry.layout.get("inpainting") else "", size]
    if any("--family" in note for note in entry.layout.get("notes", [])):
        words.append("(family assumed)")  # its text width names no family; the Family field sets it
    entry.family = " ".join(w for w in words if w)
    return entry


def scan(root: ModelsDir, extra: list[Path] = ()) -> list[ModelEntry]:
    from tui.workers import warm_imports

    warm_imports()
    try:
        entries = list_models(root, extra)
    except OSError:  # an unreadable folder lists as empty; the models screen says where it looked
        return []
    return [describe_entry(e) for e in entries]
