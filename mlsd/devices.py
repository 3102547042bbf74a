"""Which device and precision to run on, and why."""

from __future__ import annotations

import platform
import sys

from mlsd.errors import UsageError

DEVICES = ("auto", "cuda", "mps", "cpu")


def pick_device(requested: str = "auto") -> tuple[str, str]:
    """Returns (device, reason). auto: CUDA > MPS > CPU."""
    import torch

    if requested not in DEVICES:
        raise UsageError(f"Unknown device '{requested}'.", fix=f"use one of: {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "cuda" and not cuda:
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU.",
                         fix="use --device auto, or install a CUDA build of torch")
    if requested == "mps" and not mps:
        raise UsageError("--device mps was asked for, but MPS is not available.",
                         fix="MPS needs Apple Silicon and macOS 12.3+; use --device auto")
    if requested != "auto":
        return requested, "asked for"
    if cuda:
        return "cuda", f"CUDA GPU found: {torch.cuda.get_device_name(0)}"
    if mps:
        return "mps", "Apple GPU (MPS) found"
    return "cpu", "no CUDA GPU and no MPS"


def coreml_available() -> tuple[bool, str]:
    if sys.platform != "darwin":
        return False, f"Core ML runs on macOS only (this is {platform.system()})"
    try:
        import coremltools  # noqa: F401
    except ImportError as e:
        return False, f"coremltools is not importable ({e})"
    return True, f"macOS {platform.mac_ver()[0]} on {platform.machine()}"


def describe_environment() -> dict:
    import torch

    device, reason = pick_device("auto")
    coreml, coreml_reason = coreml_available()
    return {
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "device (auto)": f"{device} ({reason})",
        "core ml": f"{'yes' if coreml else 'no'} ({coreml_reason})",
        "cpu threads": torch.get_num_threads(),
    }
