"""`es3 export --format onnx`: the tracker as five static-shape ONNX graphs (see `manifest`).

Each graph traces, with jax2onnx and the weights as constants, the tracker methods the predictor's
jitted functions call, on the predictor's own modules (`SAM3Tracker.frame_features` after the
trunk, `mask_prompt`, `click_prompt`, `prompt_top` + `prompt_memory` + the bank write,
`track_step`), so onnxruntime runs what es3 runs. Every shape is fixed by the export: the image size, the objects tracked together (the bank's
rows), the clicks of a click prompt, and the bank layout (conditioning slots and reads), which is
what lets a bank that upstream keeps as growing Python lists be a graph input at all.

The bank is float32 (the predictor's `storage_dtype=float32`): onnxruntime has no bfloat16 select
on CPU, and a bfloat16 bank would turn the ~1e-6 by which two runtimes' sums differ into whole
bfloat16 steps wherever a value sits near a rounding boundary (~1e-4 of the logits after ten
frames, against ~1e-6 in float32).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from es3_jax import config as config_lib
from es3_jax.deploy.manifest import CONFIG, GRAPHS, INPUTS, MANIFEST, OUTPUTS, Manifest
from es3_jax.errors import Es3Error
from es3_jax.memory.bank import MemoryBank, Selection
from es3_jax.memory.path import memory_tokens
from es3_jax.memory.schedule import BankLayout
from es3_jax.models.tracker import FrameFeatures, SAM3Tracker
from es3_jax.outputs import open_permissions, staged_folder
from es3_jax.predictor.video_predictor import VideoPredictor

# The lowest opset whose ReduceMean takes its axes as an input, as jax2onnx writes it.
OPSET = 18
JAX2ONNX = "pip install --no-deps jax2onnx==0.17.1"


class OnnxExportError(Es3Error):
    """An export es3 cannot write, or a graph that came out other than static and standard."""


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """What the written graph is: read back from its file."""

    name: str
    nodes: int
    ops: tuple[str, ...]
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    bytes: int  # the .onnx file and its external data
    seconds: float  # to trace and write


@dataclasses.dataclass(frozen=True)
class ExportResult:
    folder: Path
    manifest: Manifest
    graphs: list[GraphInfo]

    def lines(self) -> list[str]:
        m = self.manifest
        lines = [
            f"{m.memory} memory, {m.image_size} px ({m.grid}x{m.grid} grid), {m.objects} objects, "
            f"{m.points}-point click graph, {m.layout.cond} conditioning slots, "
            f"opset {m.opset}"
        ]
        for g in self.graphs:
            lines.append(f"  {g.name:<14} {g.bytes / 1e6:9.1f} MB  {g.nodes:6d} nodes  ({g.seconds:.0f} s)")
        return lines


def _frame(feat: jax.Array, pos: jax.Array, high_res_0: jax.Array, high_res_1: jax.Array) -> FrameFeatures:
    return FrameFeatures(feat, pos, (high_res_0, high_res_1))


def _graph_functions(
    tracker: SAM3Tracker, memory: nnx.Module, trunk: nnx.Module, points: int
) -> dict[str, Callable]:
    """The function each graph traces, arguments and results in the manifest's order."""

    def image_encoder(image):
        frame = tracker.frame_features(trunk(image))
        return (frame.feat, frame.pos, *frame.high_res)

    def mask_prompt(feat, pos, high_res_0, high_res_1, mask):
        out = tracker.mask_prompt(_frame(feat, pos, high_res_0, high_res_1), mask[..., None])
        return out.obj_ptr, out.object_score_logits, out.iou_score

    def click_prompt(feat, pos, high_res_0, high_res_1, point_coords, point_labels):
        frame = _frame(feat, pos, high_res_0, high_res_1)
        out = tracker.click_prompt(frame, point_coords, point_labels, None, multimask_output=points <= 1)
        return out.low_res_masks, out.obj_ptr, out.object_score_logits, out.iou_score

    def prompt_memory(feat, pos, high_res_0, high_res_1, low_res, scores, obj_ptr, prompted, slot, *bank):
        frame = _frame(feat, pos, high_res_0, high_res_1)
        _, top = tracker.prompt_top(low_res, prompted)
        tokens, tokens_pos = tracker.prompt_memory(memory, frame, low_res, scores, prompted, top)
        return MemoryBank(*bank).write(tokens, tokens_pos, obj_ptr, slot, slot, prompted)

    def track_step(feat, pos, high_res_0, high_res_1, *rest):
        frame = _frame(feat, pos, high_res_0, high_res_1)
        out, bank = tracker.track_step(memory, frame, MemoryBank(*rest[:3]), Selection(*rest[3:]))
        return (*out, *bank)

    return {
        "image_encoder": image_encoder,
        "mask_prompt": mask_prompt,
        "click_prompt": click_prompt,
        "prompt_memory": prompt_memory,
        "track_step": track_step,
    }


def _input_specs(manifest: Manifest, image_encoder: Callable) -> dict[str, list[jax.ShapeDtypeStruct]]:
    s, g, o, d = manifest.image_size, manifest.grid, manifest.objects, manifest.pointer_dim
    lay = manifest.layout
    f32, i32, b = jnp.float32, jnp.int32, jnp.bool_

    def spec(shape, dtype=f32):
        return jax.ShapeDtypeStruct(tuple(shape), dtype)

    image = spec((1, s, s, 3))
    frame = list(jax.eval_shape(image_encoder, image))
    bank = [spec(shape) for shape in manifest.bank_shapes.values()]
    low = spec((o, 4 * g, 4 * g))
    sel = [
        spec((o, lay.spatial_reads), i32),
        spec((o, lay.spatial_reads), i32),
        spec((o, lay.spatial_reads), b),
        spec((o, lay.pointer_reads), i32),
        spec((o, lay.pointer_reads)),
        spec((o, lay.pointer_reads), b),
        spec(()),
        spec((o,), i32),
        spec((o,), i32),
        spec((o,), b),
    ]
    return {
        "image_encoder": [image],
        "mask_prompt": [*frame, spec((1, 16 * g, 16 * g))],
        "click_prompt": [*frame, spec((1, manifest.points, 2)), spec((1, manifest.points), i32)],
        "prompt_memory": [*frame, low, spec((o,)), spec((o, d)), spec((o,), b), spec((o,), i32), *bank],
        "track_step": [*frame, *bank, *sel],
    }


def read_graph(path: Path, seconds: float = 0.0) -> GraphInfo:
    """A written graph's nodes, operators and input/output shapes; refused when a shape is not
    static or an operator is outside the standard ONNX domain."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[str] = set()
    nodes = 0
    custom: set[str] = set()

    def walk(graph) -> None:
        nonlocal nodes
        for node in graph.node:
            nodes += 1
            ops.add(node.op_type)
            if node.domain not in ("", "ai.onnx"):
                custom.add(f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)

    def shapes(values) -> dict[str, tuple[int, ...]]:
        out = {}
        for v in values:
            dims = v.type.tensor_type.shape.dim
            if any(not dim.HasField("dim_value") for dim in dims):
                raise OnnxExportError(f"{path}: {v.name} has a dynamic shape ({dims})")
            out[v.name] = tuple(dim.dim_value for dim in dims)
        return out

    if custom:
        raise OnnxExportError(f"{path}: operators outside the standard ONNX domain: {sorted(custom)}")
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(f"{path.name}.data"))
    return GraphInfo(
        path.stem,
        nodes,
        tuple(sorted(ops)),
        shapes(model.graph.input),
        shapes(model.graph.output),
        size,
        seconds,
    )


def export_onnx(
    predictor: VideoPredictor,
    output_dir: str | Path,
    *,
    objects: int = 1,
    points: int = 1,
    cond_frames: int = 1,
    opset: int = OPSET,
    source: str = "",
    graphs: Sequence[str] = GRAPHS,
    overwrite: bool = False,
) -> ExportResult:
    """Write `predictor`'s tracker as ONNX graphs for `objects` objects, `points`-click prompts and
    `cond_frames` prompted frames per object (the conditioning slots, rounded up to a multiple of 4
    and to `max_cond_frames_in_attn`) to the folder `output_dir`, whole or not at all.

    The memory path is the predictor's own (teacher, or the student it was built with). `graphs`:
    a subset, for a check that needs one; the driver needs all of them.
    """
    # jax2onnx imports its example plugins too and logs a traceback for each whose library
    # (equinox, dm-pix) is absent; the export uses none of them.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    # onnx_ir warns of each intermediate value whose type jax2onnx left unset, which it then leaves
    # out of the graph's optional value_info: shapes of inputs, outputs and nodes are all there.
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    try:
        import jax2onnx
        import onnx
    except ImportError as e:
        raise OnnxExportError(
            f"es3 export --format onnx needs jax2onnx and onnx ({e.name} is missing): {JAX2ONNX}"
        ) from e
    if objects < 1 or points < 1 or cond_frames < 1:
        raise OnnxExportError(
            f"objects, points and cond_frames must be at least 1, got {objects}, {points}, {cond_frames}"
        )
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown:
        raise OnnxExportError(f"unknown graphs {unknown}: the graphs are {list(GRAPHS)}")
    output_dir = Path(output_dir)
    occupied = output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir()))
    if occupied and not overwrite:
        raise OnnxExportError(
            f"{output_dir} exists and is not empty: choose another folder or pass --overwrite"
        )
    if occupied and not (output_dir / MANIFEST).is_file():
        raise OnnxExportError(
            f"{output_dir} is not an ONNX export of es3 (no {MANIFEST}): es3 replaces only its own"
        )
    cfg = predictor.cfg
    t = cfg.MODEL.TEACHER
    tracker, memory, trunk = predictor.modules()
    layout = BankLayout.for_video(t, cond_frames)
    layout = layout.reading(t, layout.cond)
    manifest = Manifest(
        memory=predictor.memory,
        image_size=t.IMAGE_SIZE,
        grid=t.grid,
        objects=objects,
        points=points,
        opset=opset,
        layout=layout,
        tokens=memory_tokens(memory, t),
        pointer_dim=t.D_MODEL,
        source=source,
        graphs={name: f"{name}.onnx" for name in graphs},
    )
    functions = _graph_functions(tracker, memory, trunk, points)
    specs = _input_specs(manifest, functions["image_encoder"])
    infos = []
    holds = {MANIFEST, CONFIG, *manifest.graphs.values(), *(f"{f}.data" for f in manifest.graphs.values())}
    with staged_folder(output_dir, holds) as folder:
        for name in graphs:
            start = time.perf_counter()
            path = folder / manifest.graphs[name]
            jax2onnx.to_onnx(
                functions[name],
                specs[name],
                model_name=f"es3_{name}",
                opset=opset,
                return_mode="file",
                output_path=os.fspath(path),
                input_names=list(INPUTS[name]),
                output_names=list(OUTPUTS[name]),
            )
            onnx.checker.check_model(os.fspath(path))
            for written in folder.glob(f"{path.name}*"):
                open_permissions(written)  # onnx writes external data through tempfile
            infos.append(read_graph(path, time.perf_counter() - start))
        config_lib.save(cfg, folder / CONFIG)
        manifest.save(folder)
        if occupied:
            shutil.rmtree(output_dir)  # the export it replaces goes only once this one is whole
    return ExportResult(output_dir, manifest, infos)
