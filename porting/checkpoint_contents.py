"""What a PyTorch checkpoint holds, told once from its keys: `read_contents(path)`.

The kinds of file:

| kind | what it is |
|---|---|
| `sam3` | Meta's `sam3.pt` layout (`tracker.*`, `detector.*`), with SAM3's ViT trunk or without a trunk |
| `stage1` | the same layout with an EfficientSAM3 stage-1 trunk (RepViT, TinyViT or EfficientViT) |
| `transformers` | a transformers `Sam3TrackerVideoModel` state dict |
| `merged_export` | an es3 merged export (`es3 export`, `save_efficient_sam3`): the sam3.pt layout, its record, and the student's memory path unless the record says the teacher's |

Every key of the file lies in one part: the tracker with its neck (in the sam3.pt layout, ready for
`TRACKER_TABLE`), the student's memory path (a merged export's), the trunk, or the rest, which es3
does not use (by where it comes from: the detector's neck, the text encoder, ...). The trunk is
named in the config's words (`MODEL.TRUNK.KIND`: `sam3_vit` or a stage-1 kind), or `none` /
`unknown` (`es3_jax.config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from es3_jax.config import NO_TRUNK, SAM3_VIT, STAGE1_TRUNK_KINDS, UNKNOWN_TRUNK
from porting.checkpoint_file import CheckpointError, read_checkpoint, record_of
from porting.keymap import TRACKER_TABLE, TRANSFORMERS_TRUNK_PREFIXES, TRUNK_TABLE
from porting.sam3_checkpoint import STUDENT_PREFIXES, TRUNK_PREFIX, PortResult, transformers_to_sam3
from porting.stage1_checkpoint import detect_kind, stage1_keys

STUDENT_MEMORY = "student"
TEACHER_MEMORY = "teacher"
TRUNK_GROUP = "trunk"
# Where the keys es3 does not use come from, for the report (the first matching prefix names it).
_UNUSED_GROUPS = (
    (TRUNK_PREFIX, TRUNK_GROUP),
    ("detector.backbone.vision_backbone.convs.", "detector neck"),
    ("detector.backbone.language_backbone.", "text encoder"),
    ("detector.", "detector heads"),
)


@dataclass(frozen=True)
class CheckpointContents:
    """A PyTorch checkpoint and its parts (see the module docstring); values as read (tensors), or
    numpy arrays where a transformers file was renamed into the sam3.pt layout."""

    source: str
    kind: str  # "sam3", "stage1", "transformers" or "merged_export": see the module docstring
    layout: str  # how the file names its keys: "sam3" or "transformers"
    trunk_kind: str  # SAM3_VIT, a stage-1 kind, NO_TRUNK or UNKNOWN_TRUNK
    memory: str  # whose memory attention the file holds: TEACHER_MEMORY or STUDENT_MEMORY
    record: dict | None  # a merged export's es3_config record
    state_dict: Mapping[str, Any]  # every key, as stored
    tracker: Mapping[str, Any]  # the tracker and its neck: the keys in TRACKER_TABLE's namespaces
    student: Mapping[str, Any]  # the student's memory path (STUDENT_PREFIXES); empty unless `memory` is it
    # The trunk: under TRUNK_PREFIX or transformers' trunk prefixes; a stage-1 trunk under its merged prefix.
    trunk: Mapping[str, Any]
    unused: Mapping[str, tuple[str, ...]]  # group -> the keys in none of the parts

    def unused_keys(self, trunk_ported: bool) -> dict[str, int]:
        """`{group: number of keys}` es3 did not use: the rest, and the trunk unless it was ported."""
        counts = {group: len(keys) for group, keys in self.unused.items()}
        if self.trunk and not trunk_ported:
            counts[TRUNK_GROUP] = counts.get(TRUNK_GROUP, 0) + len(self.trunk)
        return dict(sorted(counts.items()))


def read_contents(path: str | Path) -> CheckpointContents:
    """Read a checkpoint file or folder (`porting.checkpoint_file.read_checkpoint`, once) and tell
    what it holds."""
    sd, extras = read_checkpoint(path)
    return classify(sd, record_of(extras), str(path))


def classify(
    sd: Mapping[str, Any], record: Mapping | None = None, source: str = "<state dict>"
) -> CheckpointContents:
    """What a state dict holds (see the module docstring); `record`: the es3 record it came with."""
    layout = _layout(sd, source)
    stage1 = stage1_keys(sd)
    if stage1:
        trunk = {key: sd[original] for key, original in stage1.items()}
        trunk_kind = detect_kind(trunk, source)
        trunk_keys = set(stage1.values())
    else:
        trunk_keys = {k for k in sd if k.startswith((TRUNK_PREFIX, *TRANSFORMERS_TRUNK_PREFIXES))}
        trunk = {k: sd[k] for k in sorted(trunk_keys)}
        trunk_kind = _vit_kind(trunk)
    rest = {k: v for k, v in sd.items() if k not in trunk_keys}
    if layout == "transformers":
        rest = transformers_to_sam3(rest)
    merged = record is not None or any(k.startswith("tracker.spatial_perceiver.") for k in rest)
    memory = (record or {}).get("memory", STUDENT_MEMORY) if merged else TEACHER_MEMORY
    student_prefixes = STUDENT_PREFIXES if memory == STUDENT_MEMORY else ()
    student = {k: v for k, v in rest.items() if k.startswith(student_prefixes)}
    tracker = {k: v for k, v in rest.items() if k not in student and TRACKER_TABLE.consumes(k)}
    unused: dict[str, list[str]] = {}
    for key in sorted(rest):
        if key not in student and key not in tracker:
            group = next((g for prefix, g in _UNUSED_GROUPS if key.startswith(prefix)), "other")
            unused.setdefault(group, []).append(key)
    if merged:
        kind = "merged_export"
    elif layout == "transformers":
        kind = "transformers"
    else:
        kind = "stage1" if trunk_kind in STAGE1_TRUNK_KINDS else "sam3"
    return CheckpointContents(
        source=source,
        kind=kind,
        layout=layout,
        trunk_kind=trunk_kind,
        memory=memory,
        record=None if record is None else dict(record),
        state_dict=sd,
        tracker=tracker,
        student=student,
        trunk=trunk,
        unused={group: tuple(keys) for group, keys in unused.items()},
    )


def format_report(contents: CheckpointContents, tracker: PortResult, trunk_ported: bool) -> str:
    """A person's account of a port: what was read, what the trunk is, what was not used."""
    kind = contents.trunk_kind
    if kind == UNKNOWN_TRUNK:
        trunk = "a trunk es3 does not know: not ported"
    elif kind == NO_TRUNK:
        trunk = "no trunk in this checkpoint"
    else:
        name = "SAM3 ViT" if kind == SAM3_VIT else f"stage-1 {kind}"
        state = "ported: frames can be embedded and tracked" if trunk_ported else "not read"
        trunk = f"{name} trunk ({state})"
    lines = [
        f"source: {contents.source} ({contents.layout} layout)",
        f"ported: {tracker.consumed} tensors (tracker + tracker neck)",
        f"trunk: {trunk}",
    ]
    if tracker.ignored:
        lines.append(f"ignored (unused by the tracker): {', '.join(tracker.ignored)}")
    for group, n in contents.unused_keys(trunk_ported).items():
        lines.append(f"unused: {n} keys of the {group}")
    return "\n".join(lines)


def _layout(sd: Mapping[str, Any], source: str) -> str:
    if any(k.startswith(("tracker.", "detector.")) for k in sd):
        return "sam3"
    if any(k.startswith(("memory_attention.", "mask_decoder.", "memory_encoder.")) for k in sd):
        return "transformers"
    raise CheckpointError(
        f"{source}: unrecognised checkpoint layout: neither sam3.pt (tracker.*) nor transformers keys"
    )


def _vit_kind(trunk: Mapping[str, Any]) -> str:
    """SAM3_VIT when every trunk key is one of SAM3's ViT (at any size) or the trunk is transformers'
    (which holds no other); UNKNOWN_TRUNK for another trunk; NO_TRUNK for none."""
    if not trunk:
        return NO_TRUNK
    if any(k.startswith(TRANSFORMERS_TRUNK_PREFIXES) for k in trunk):
        return SAM3_VIT
    known = all(TRUNK_TABLE.to_jax(k) is not None or TRUNK_TABLE.is_ignored(k) for k in trunk)
    return SAM3_VIT if known else UNKNOWN_TRUNK
