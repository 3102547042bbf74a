"""The `mlsd` command line. Each subcommand is a small function; errors print once, cleanly."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable

from mlsd.errors import MlsdError

Handler = Callable[[argparse.Namespace], int]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", metavar="DIR",
                   help="models root in the A1111 layout (default: $MLSD_MODELS_DIR, the settings file, ./models)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_inspect(args: argparse.Namespace) -> int:
    from mlsd.describe import describe, format_description
    from mlsd.paths import models_dir

    root = models_dir(args.models_dir)
    path = _resolve_any(root, args.file)
    info = describe(path, with_hash=not args.no_hash)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _resolve_any(root, name):
    from mlsd.errors import ModelNotFoundError

    for kind in ("checkpoint", "lora", "vae"):
        try:
            return root.resolve(name, kind)
        except ModelNotFoundError:
            continue
    return root.resolve(name, "checkpoint")  # raises with the checkpoint folder's listing


def cmd_models(args: argparse.Namespace) -> int:
    from mlsd.coreml.layouts import describe_folder, summary_line
    from mlsd.describe import describe
    from mlsd.paths import models_dir

    root = models_dir(args.models_dir)
    listing: dict[str, list] = {}
    for kind in ("checkpoint", "lora", "vae", "coreml"):
        entries = []
        for path in root.list(kind):
            entry = {"name": path.name, "path": str(path)}
            if kind == "coreml":
                try:
                    entry |= describe_folder(path)
                except MlsdError as e:
                    entry["error"] = e.what
            else:
                try:
                    info = describe(path, with_hash=False)
                    entry |= {k: info[k] for k in ("family", "kind", "prediction_type", "size_bytes",
                                                    "format", "inpainting") if k in info}
                except MlsdError as e:
                    entry["error"] = e.what
            entries.append(entry)
        listing[kind] = entries
    if args.json:
        print(json.dumps({"models_dir": str(root.root), "source": root.source, **listing}, indent=2))
        return 0
    print(f"models directory: {root.root} (from {root.source})")
    for kind, entries in listing.items():
        print(f"\n{kind} ({', '.join(str(f) for f in root.folders(kind))}):")
        if not entries:
            print("  (none)")
        for e in entries:
            detail = e.get("error") or (summary_line(e) if kind == "coreml" else " ".join(
                str(e[k]) for k in ("family", "kind", "format", "prediction_type") if e.get(k)))
            print(f"  {e['name']:<48} {detail}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mlsd.devices import describe_environment

    report = describe_environment()
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in report.items()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from mlsd.errors import InputFileError
    from mlsd.infotext import GenerationParams, read_image_parameters

    found = read_image_parameters(args.image)
    if found.source == "none":
        raise InputFileError("The image carries no generation parameters.", where=args.image,
                             fix="metadata may have been stripped (screenshots, re-saves, most uploads)")
    if args.json:
        out: dict = {"file": args.image, "source": found.source, "fields": found.fields}
        if found.source == "a1111":
            out |= {"parameters": found.raw, "params": asdict(GenerationParams.from_infotext(found.raw))}
        else:
            out["note"] = found.note
        print(json.dumps(out, indent=2, ensure_ascii=False))
    elif found.source == "a1111":
        print(found.raw)
    else:  # ComfyUI keeps a node graph, not text: show what could be read out of it
        print(found.note)
        for key, value in found.fields.items():
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsd", description="Stable Diffusion checkpoints and LoRAs on Core ML (Apple Silicon) or PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint, LoRA or VAE file")
    p.add_argument("file", help="path, or a name in the models directory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 (slow on multi-GB files)")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("models", help="list the models directory")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("doctor", help="what this machine can run, and why mlsd picks what it picks")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("info", help="show the generation parameters stored in a PNG, JPEG or WebP")
    p.add_argument("image", help="image file (mlsd, A1111, Civitai or ComfyUI)")
    p.add_argument("--json", action="store_true", help="print the parsed fields as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_info)

    from mlsd import cli_generate
    from mlsd.demo import run as demo

    cli_generate.add_parsers(sub, _common)
    demo.add_parser(sub, _common)
    try:
        from converters import cli as convert_cli
    except ImportError:  # an install without the converters package still runs everything else
        convert_cli = None
    if convert_cli is not None:
        convert_cli.add_parser(sub, _common)
    # importlib, not an import statement: the core never imports the TUI layer (import-contract test);
    # tui.cli itself loads no textual until `mlsd tui` runs.
    try:
        tui_cli = importlib.import_module("tui.cli")
    except ImportError:
        tui_cli = None
    if tui_cli is not None:
        tui_cli.add_parser(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    # mlsd reports its own progress; coremltools' per-pass bars would bury it. tqdm reads this at import.
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MlsdError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e.title}: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the one place that turns bugs into a readable exit
        if args.debug:
            traceback.print_exc()
        else:
            exc = sys.exc_info()[1]
            print(f"internal error: {type(exc).__name__}: {exc}\n  rerun with --debug for the traceback",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
