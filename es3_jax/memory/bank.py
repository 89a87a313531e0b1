"""The fixed-size memory bank a tracking step reads and writes.

The bank stores K memory frames and Kp object pointers per object. Which stored entries a step
reads, in which temporal slot, and where it writes its own memory is decided on the host
(`es3_jax.memory.schedule`) and passed in as small index tables (`Selection`). Every array has
a shape fixed by the configuration and the number of objects, so a step compiles once, whatever
the video length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from es3_jax.nn.layers import Dtype


class Selection(NamedTuple):
    """Which bank entries one step reads and where it writes (built on the host).

    S spatial slots and P pointer slots per object; `frame_tpos` indexes `maskmem_tpos_enc`;
    `pointer_rel` is the pointer's signed temporal distance (divided by `pointer_scale` in the
    step). `write` marks the objects tracked by this step: only they get their new memory
    written, at `write_slot` / `write_pointer_slot`.
    """

    frame_slot: jax.Array  # [O, S] int32
    frame_tpos: jax.Array  # [O, S] int32
    frame_valid: jax.Array  # [O, S] bool
    pointer_slot: jax.Array  # [O, P] int32
    pointer_rel: jax.Array  # [O, P] float32
    pointer_valid: jax.Array  # [O, P] bool
    pointer_scale: jax.Array  # [] float32: min(num_frames, max pointers) - 1
    write_slot: jax.Array  # [O] int32
    write_pointer_slot: jax.Array  # [O] int32
    write: jax.Array  # [O] bool


class MemoryBank(NamedTuple):
    """The stored memories of one inference state or training clip.

    tokens: `[O, K, N, Cm]` in the storage dtype (bfloat16 at inference, as upstream stores
    memories); tokens_pos: `[N, Cm]` float32 (frame independent); pointers: `[O, Kp, C]` float32.
    """

    tokens: jax.Array
    tokens_pos: jax.Array
    pointers: jax.Array

    @staticmethod
    def empty(
        num_objects: int,
        num_slots: int,
        num_pointer_slots: int,
        tokens_shape: tuple[int, int],
        dim: int,
        storage_dtype: Dtype = jnp.bfloat16,
    ) -> MemoryBank:
        """A zeroed bank: `tokens_shape = (N, Cm)` per memory frame, `dim` the pointer width."""
        n, c = tokens_shape
        return MemoryBank(
            jnp.zeros((num_objects, num_slots, n, c), storage_dtype),
            jnp.zeros((n, c), jnp.float32),
            jnp.zeros((num_objects, num_pointer_slots, dim), jnp.float32),
        )

    def write(
        self,
        tokens: jax.Array,
        tokens_pos: jax.Array,
        obj_ptr: jax.Array,
        slot: jax.Array,
        pointer_slot: jax.Array,
        write: jax.Array,
    ) -> MemoryBank:
        """Each object's new memory tokens `[O, N, Cm]` (positions `[O, N, Cm]`) and pointer `[O, C]`
        stored at `slot` / `pointer_slot` `[O]` where `write` `[O]` holds.

        A select over the slots rather than a scatter: the same values, and a graph whose every
        shape is static when exported (a scatter lowers to ONNX through a data-dependent NonZero).
        """
        at = (jnp.arange(self.tokens.shape[1]) == slot[:, None]) & write[:, None]
        at_ptr = (jnp.arange(self.pointers.shape[1]) == pointer_slot[:, None]) & write[:, None]
        return MemoryBank(
            jnp.where(at[:, :, None, None], tokens.astype(self.tokens.dtype)[:, None], self.tokens),
            tokens_pos[0].astype(jnp.float32),
            jnp.where(at_ptr[:, :, None], obj_ptr.astype(self.pointers.dtype)[:, None], self.pointers),
        )

    def read(self, sel: Selection) -> tuple[jax.Array, jax.Array]:
        """The selected frames `[O, S, N, Cm]` (storage dtype) and pointers `[O, P, C]` float32."""
        frames = jnp.take_along_axis(self.tokens, sel.frame_slot[:, :, None, None], axis=1)
        pointers = jnp.take_along_axis(self.pointers, sel.pointer_slot[:, :, None], axis=1)
        return frames, pointers

    def grown(self, num_objects: int, new_slots: int = 0, at: int = 0) -> MemoryBank:
        """This bank with zeroed rows up to `num_objects` objects and `new_slots` zeroed slots
        inserted before slot `at` in both the frame and the pointer slots (a stream's objects that
        join, its extra conditioning slots); the stored entries keep their values."""
        rows = num_objects - self.tokens.shape[0]

        def grow(x: jax.Array) -> jax.Array:
            x = jnp.pad(x, [(0, rows)] + [(0, 0)] * (x.ndim - 1))
            slots = jnp.zeros((x.shape[0], new_slots, *x.shape[2:]), x.dtype)
            return jnp.concatenate([x[:, :at], slots, x[:, at:]], axis=1)

        return MemoryBank(grow(self.tokens), self.tokens_pos, grow(self.pointers))
