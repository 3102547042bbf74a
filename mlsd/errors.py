"""One exception family for everything a user can get wrong.

Every error carries three parts a user can act on: what went wrong, where (the
file or option), and how to fix it. The CLI prints them and exits non-zero; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

from pathlib import Path


class MlsdError(Exception):
    """Base of every error mlsd raises on purpose."""

    exit_code = 2
    title = "mlsd error"

    def __init__(self, what: str, *, where: str | Path | None = None, fix: str | None = None):
        self.what = what
        self.where = str(where) if where is not None else None
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


class InputFileError(MlsdError):
    """A file is missing, empty, truncated, corrupt or of an unknown type."""

    title = "Cannot read file"


class UnsafePickleError(MlsdError):
    """A pickle asked for a global outside the allow-list; nothing was executed."""

    title = "Refused unsafe pickle"


class UnknownModelError(MlsdError):
    """The tensors match no architecture mlsd knows."""

    title = "Unknown model architecture"


class UnsupportedModelError(MlsdError):
    """A known architecture that mlsd does not run yet (SDXL, SD3, Flux...)."""

    title = "Model not supported yet"


class LoraError(MlsdError):
    """A LoRA that cannot be applied to the model it was given."""

    title = "Cannot apply LoRA"


class ModelNotFoundError(MlsdError):
    """A model name that resolves to nothing in the models directory."""

    title = "Model not found"


class UsageError(MlsdError):
    """An invalid option value or combination."""

    title = "Invalid option"
