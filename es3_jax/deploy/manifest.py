"""What an ONNX export folder holds, and the names of every graph's inputs and outputs.

```
<folder>/
  es3_onnx.json        this manifest: geometry, bank layout, memory path, graph files
  config.yaml          the es3 config the graphs were traced from
  image_encoder.onnx   image [1, S, S, 3] (normalised) -> the frame's features
  mask_prompt.onnx     frame features + mask [1, 16g, 16g] -> pointer, object score, IoU
  click_prompt.onnx    frame features + P clicks -> low-res logits, pointer, object score, IoU
  prompt_memory.onnx   frame features + the prompted objects' logits + bank -> bank with their memories
  track_step.onnx      frame features + bank + read tables -> masks, scores, pointers, next bank
```
(with `<graph>.onnx.data` beside a graph whose weights are stored as external data).

Plain JSON and no jax: the driver reads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from es3_jax.errors import Es3Error
from es3_jax.memory.schedule import SELECTION_FIELDS, BankLayout

MANIFEST = "es3_onnx.json"
CONFIG = "config.yaml"
FORMAT_VERSION = 1

FRAME = ("feat", "pos", "high_res_0", "high_res_1")
BANK = ("bank_tokens", "bank_tokens_pos", "bank_pointers")
NEXT_BANK = tuple(f"next_{name}" for name in BANK)
HEADS = ("low_res_masks", "obj_ptr", "object_score_logits", "iou_score")

INPUTS: dict[str, tuple[str, ...]] = {
    "image_encoder": ("image",),
    "mask_prompt": (*FRAME, "mask"),
    "click_prompt": (*FRAME, "point_coords", "point_labels"),
    "prompt_memory": (
        *FRAME,
        "low_res_masks",
        "object_score_logits",
        "obj_ptr",
        "prompted",
        "cond_slot",
        *BANK,
    ),
    "track_step": (*FRAME, *BANK, *SELECTION_FIELDS),
}
OUTPUTS: dict[str, tuple[str, ...]] = {
    "image_encoder": FRAME,
    "mask_prompt": HEADS[1:],
    "click_prompt": HEADS,
    "prompt_memory": NEXT_BANK,
    "track_step": (*HEADS, "presence", *NEXT_BANK),
}
GRAPHS = tuple(INPUTS)


class ManifestError(Es3Error):
    """An export folder that is not one, or not whole."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The static geometry every graph of one export shares (the bank is float32 throughout)."""

    memory: str  # "teacher" or "student": whose memory attention and memory path the graphs run
    image_size: int  # S
    grid: int  # g = S / 14
    objects: int  # O: rows of the bank, objects tracked together
    points: int  # P: clicks (a box is 2) the click graph takes
    opset: int
    layout: BankLayout
    tokens: tuple[int, int]  # (N, Cm): one memory frame's tokens as the bank stores them
    pointer_dim: int  # C
    source: str  # the weights the graphs were traced from
    graphs: dict[str, str]  # graph -> file name

    @property
    def bank_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each BANK tensor (float32): tokens `[O, slots, N, Cm]`, their positions
        `[N, Cm]`, pointers `[O, pointer slots, C]`."""
        n, cm = self.tokens
        return {
            "bank_tokens": (self.objects, self.layout.slots, n, cm),
            "bank_tokens_pos": (n, cm),
            "bank_pointers": (self.objects, self.layout.pointer_slots, self.pointer_dim),
        }

    def save(self, folder: Path) -> None:
        record = dataclasses.asdict(self)
        record["format_version"] = FORMAT_VERSION
        (folder / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")

    @staticmethod
    def load(folder: str | Path) -> Manifest:
        """The manifest of an export folder; each graph file it names must be there."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ManifestError(
                f"{folder}: not an ONNX export of es3 (no {MANIFEST}); write one with es3 export --format onnx"
            )
        try:
            record: dict[str, Any] = json.loads(path.read_text())
            version = record.pop("format_version")
            if version != FORMAT_VERSION:
                raise ManifestError(f"{path}: format version {version}, this es3 reads {FORMAT_VERSION}")
            record["layout"] = BankLayout(**record["layout"])
            record["tokens"] = tuple(record["tokens"])
            manifest = Manifest(**record)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ManifestError(f"{path}: not a manifest es3 can read ({type(e).__name__}: {e})") from e
        missing = [name for name in GRAPHS if name not in manifest.graphs]
        missing += [f for f in manifest.graphs.values() if not (folder / f).is_file()]
        if missing or not (folder / CONFIG).is_file():
            raise ManifestError(f"{folder}: incomplete ONNX export, missing {', '.join(missing) or CONFIG}")
        return manifest
