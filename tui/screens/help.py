"""F1: every key, and what the screens are for."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# mlsd — keys

| Key | Where | Does |
|---|---|---|
| **ctrl+g** | Generate | make the image(s) with the current prompt and parameters |
| **escape** | Generate | cancel the running generation (within one step; nothing is saved) |
| **ctrl+g** | Convert | convert the checkpoint to a Core ML bundle, then verify every package |
| **escape** | Convert | cancel the conversion at the end of the current stage (nothing is published) |
| **tab / shift+tab** | everywhere | next / previous field (prompt, negative prompt, buttons, parameters) |
| **F1** | everywhere | this help (escape closes it) |
| **F2** | everywhere | Generate screen |
| **F3** | everywhere | Gallery: outputs newest first, with their parameters |
| **F4** | everywhere | Models: family, hash, Core ML bundles |
| **F5** | everywhere | Convert a checkpoint to a Core ML bundle |
| **r / enter** | Gallery | reuse the image's parameters (prompt, seed, sampler, size, model, VAE...; backend and compute unit when this TUI made it) |
| **ctrl+r** | Gallery, Models | read the folder again |
| **ctrl+q** | everywhere | quit |

Prompts use A1111 syntax: `(word:1.2)`, `[word]`, `BREAK`, `<lora:name:0.8>`. The counter above
each prompt shows tokens used / capacity; every 75 tokens start a new chunk.

Images are saved exactly as `mlsd generate` saves them: `outputs/txt2img-images/DATE/NNNNN-SEED.png`
with A1111's parameters text. The mouse works too: click fields, buttons and list items.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("f1", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(HELP, id="help-text")
