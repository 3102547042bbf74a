"""`mlsd tui`: the subcommand's arguments. Textual is imported only when the command runs, so
registering it costs the rest of the CLI nothing."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

EXIT_GRACE_S = 1.5  # enough for a save in progress (PNG encode + rename) to complete


def add_parser(sub, common) -> None:
    p = sub.add_parser("tui", help="terminal UI: prompt, parameters, live preview, gallery, models")
    p.add_argument("--model", "-m", help="checkpoint (or Core ML bundle) to select: name or path")
    p.add_argument("--output-dir", type=Path, help="outputs root in the A1111 layout (default: last used, else ./outputs)")
    common(p)
    p.set_defaults(func=cmd_tui)


def cmd_tui(args) -> int:
    # tqdm reads this when it is first imported: coremltools' and diffusers' bars would draw over the screen.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # tui.app imports textual-image, which must ask the terminal about graphics before Textual starts.
    from tui.app import create_app

    app = create_app(models_dir=args.models_dir, output_dir=args.output_dir, model=args.model)
    # Our own loop: asyncio.run would wait for every worker thread, and an import or a model load
    # cannot be interrupted, so quitting could hang for many seconds after the screen is gone.
    loop = asyncio.new_event_loop()
    try:
        app.run(loop=loop)
    finally:
        loop.close()
    return leave(app.return_code or 0)


def leave(code: int, grace: float = EXIT_GRACE_S) -> int:
    """Give background threads a moment (a save in progress completes), then exit without joining them."""
    deadline = time.monotonic() + grace
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    for thread in others:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in others):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # what is left only reads (imports, model loads); every write mlsd makes is atomic
    return code
