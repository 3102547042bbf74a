"""What an image's PNG cannot say: the form that made it in the TUI (backend, compute unit, the bundle...).

Images are written exactly as `mlsd generate` writes them, and A1111's parameters text has no place for
where a model ran, so the TUI keeps a small record beside its settings file: image path -> the form
fields the PNG lacks, with a hash of the image's parameters text so a record never applies to another
image saved later under the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from pathlib import Path

from tui.settings import FormValues

MAX_RECORDS = 2000  # the oldest are dropped; a record is only a convenience for "reuse"
# The form fields a PNG's parameters do not carry (or carry only as a name that may be ambiguous).
# Not the batch: reusing one image means making that image again.
RECORDED = ("model", "family", "backend", "compute_unit", "device", "vae", "init_image", "mask")
_LOCK = threading.Lock()


def _digest(infotext: str) -> str:
    return hashlib.sha256(infotext.encode("utf-8")).hexdigest()[:16]


class History:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or unreadable: reuse falls back to the PNG alone
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, images: list[tuple[Path, str]], form: FormValues, ran_on: str = "") -> None:
        """(image path, its parameters text) for each saved image (and grid), made with ``form``;
        ``ran_on``: the backend that actually ran (the form may say "auto")."""
        fields = {name: getattr(form, name) for name in RECORDED} | {"ran_on": ran_on}
        with _LOCK:
            data = self._read()
            for path, infotext in images:
                data.pop(str(Path(path).resolve()), None)  # re-inserted last: the dict's order is the age
                data[str(Path(path).resolve())] = {"parameters": _digest(infotext), "form": fields}
            while len(data) > MAX_RECORDS:
                data.pop(next(iter(data)))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(4)}")
            try:
                tmp.write_text(json.dumps(data), encoding="utf-8")
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def lookup(self, path: Path, infotext: str) -> dict | None:
        """The recorded form fields for this image, when the record is for these very parameters."""
        with _LOCK:
            entry = self._read().get(str(Path(path).resolve()))
        if not isinstance(entry, dict) or entry.get("parameters") != _digest(infotext):
            return None
        form = entry.get("form")
        return {k: v for k, v in form.items() if k in (*RECORDED, "ran_on")} if isinstance(form, dict) else None
