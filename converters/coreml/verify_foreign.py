"""`mlsd verify` for Core ML models converted elsewhere (Apple's folders, HF repos, Resources folders, or one
package): the parts are shown to `verify_bundle` as an mlsd bundle would hold them, through a temporary folder
of links and a manifest inferred from the specs, so one comparison serves both and nothing is written into
the user's folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mlsd.errors import UsageError

_NAMES = {"text_encoder": "TextEncoder.mlpackage", "vae_decoder": "VAEDecoder.mlpackage",
          "vae_encoder": "VAEEncoder.mlpackage"}


def verify_foreign(path: str | Path, against: str | Path | None, *, family: str | None = None,
                   prediction_type: str | None = None) -> list:
    from converters.coreml.verify import verify_bundle
    from mlsd.coreml.layouts import read_layout

    path = Path(path)
    if against is None:
        raise UsageError("Core ML models converted elsewhere record no source checkpoint to compare with.",
                         where="--against", fix="pass --against MODEL: the checkpoint they were converted from")
    layout = read_layout(path, family=family, prediction_type=prediction_type, compiled_ok=False,
                         require_complete=False)
    unet = layout.manifest.get("components", {}).get("unet", {})
    if unet.get("residual_inputs"):
        raise UsageError("verify cannot feed a ControlNet-ready UNet's residual inputs yet.", where=path,
                         fix="verify the plain UNet of the same model, or generate and compare images")
    if layout.unet and not {"sample"} <= set(_inputs(layout.unet[0])):
        raise UsageError("This UNet part is a later chunk: it runs only after the chunks before it.", where=path,
                         fix="verify the folder that holds every chunk")
    with tempfile.TemporaryDirectory(prefix="mlsd-verify-") as tmp:
        view = Path(tmp)
        components = {}
        for role, name in _NAMES.items():
            part = getattr(layout, role)
            if part is not None:
                os.symlink(part.resolve(), view / name, target_is_directory=True)
                components[role] = {"files": [name]}
        if layout.unet:
            names = ["Unet.mlpackage"] if len(layout.unet) == 1 else [
                f"UnetChunk{i}.mlpackage" for i in range(1, len(layout.unet) + 1)]
            for part, name in zip(layout.unet, names, strict=True):
                os.symlink(part.resolve(), view / name, target_is_directory=True)
            components["unet"] = {"files": names, "attention": unet.get("attention", "split_einsum")}
        manifest = {"source": {"path": str(against)}, "family": layout.manifest["family"],
                    "prediction_type": layout.manifest["prediction_type"], "clip_skip": 1, "loras": [],
                    "vae": None, "ema": False, "components": components,
                    # The bit width is not recorded in a LUT package's I/O; verify only asks whether it is palettized.
                    "options": {"quantize_bits": 6 if unet.get("palettized") else None,
                                "attention": unet.get("attention")}}
        (view / "mlsd.json").write_text(json.dumps(manifest), encoding="utf-8")
        return verify_bundle(view, against, write=False)


def _inputs(package: Path) -> dict:
    from mlsd.coreml.package_info import read_package

    return read_package(package).inputs
