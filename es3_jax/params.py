"""Parameter trees of NNX modules as plain nested dicts, and strict binding of loaded values.

Checkpoints and key tables speak of parameters by dotted path
(`memory_attention.layers.0.norm1.scale`); NNX modules hold them as `nnx.Param`s. `bind`
builds a module abstractly and fills every parameter from a nested dict, refusing (in one
error that lists them all) missing, unexpected and mis-shaped entries; `check_shapes` is that
check, shared by every strict loader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from es3_jax.errors import Es3Error

M = TypeVar("M", bound=nnx.Module)


class ParamMismatchError(Es3Error):
    """Parameters that do not fit what they are loaded into: every missing, unexpected and mis-shaped
    entry, in one message. Every strict check (binding a module, porting a checkpoint, merging an
    export, loading one in PyTorch) reports through it."""

    def __init__(self, what: str, mismatch: Mismatch, describe: Callable[[str], str] = str):
        self.mismatch = mismatch
        lines = [f"{what}:"]
        lines += [f"  missing key: {describe(k)}, expected shape {want}" for k, want in mismatch.missing]
        lines += [f"  unexpected key: {describe(k)}, shape {got}" for k, got in mismatch.unexpected]
        lines += [
            f"  shape mismatch: {describe(k)}: shape {got}, expected {want}"
            for k, got, want in mismatch.mismatched
        ]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Mismatch:
    """How a set of named shapes differs from the expected one (each list sorted by name)."""

    missing: tuple[tuple[str, tuple[int, ...]], ...]  # (name, expected shape)
    unexpected: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape found)
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, found, expected)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def compare_shapes(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]) -> Mismatch:
    """The difference between `{name: shape}` found and expected."""
    return Mismatch(
        tuple((k, tuple(expected[k])) for k in sorted(set(expected) - set(found))),
        tuple((k, tuple(found[k])) for k in sorted(set(found) - set(expected))),
        tuple(
            (k, tuple(found[k]), tuple(expected[k]))
            for k in sorted(set(found) & set(expected))
            if tuple(found[k]) != tuple(expected[k])
        ),
    )


def check_shapes(
    found: Mapping[str, Sequence[int]],
    expected: Mapping[str, Sequence[int]],
    what: str,
    describe: Callable[[str], str] = str,
) -> None:
    """Raise `ParamMismatchError` (titled `what`) unless `found` has exactly the expected names and
    shapes; `describe(name)` renders a name in the message (e.g. with its torch key)."""
    mismatch = compare_shapes(found, expected)
    if mismatch:
        raise ParamMismatchError(what, mismatch, describe)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dict -> `{dotted path: leaf}`."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    """`{dotted path: leaf}` -> nested dict; purely numeric segments become int keys (list indices)."""
    tree: dict = {}
    for path, value in flat.items():
        parts = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def param_dict(module: nnx.Module) -> dict:
    """The module's `nnx.Param` values as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def abstract_shapes(factory: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
    """`{dotted path: shape}` of every `nnx.Param` the factory's module has, without allocating it."""
    abstract = nnx.eval_shape(factory)
    return {p: tuple(v.shape) for p, v in flatten(param_dict(abstract)).items()}


def bind(factory: Callable[[], M], params: Mapping, source: str = "") -> M:
    """Build the factory's module with its parameters taken from `params` (nested dict), strictly.

    Values are cast to each parameter's dtype (float32). Modules hold nothing but
    parameters: tables such as position encodings are recomputed, never stored.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, param_state, rest = nnx.split(abstract, nnx.Param, ...)
    expected_tree = nnx.to_pure_dict(param_state)
    expected = {p: tuple(v.shape) for p, v in flatten(expected_tree).items()}
    flat = flatten(params)
    what = f"parameters do not match the module{f' ({source})' if source else ''}"
    check_shapes({p: np.shape(v) for p, v in flat.items()}, expected, what)
    dtypes = {p: v.dtype for p, v in flatten(expected_tree).items()}
    filled = unflatten({p: jnp.asarray(np.asarray(v), dtype=dtypes[p]) for p, v in flat.items()})
    nnx.replace_by_pure_dict(param_state, filled)
    if jax.tree.leaves(rest):
        raise TypeError(f"{type(abstract).__name__} holds state other than nnx.Param; bind() cannot fill it")
    return nnx.merge(graphdef, param_state, rest)


class ModuleTemplate:
    """A module's structure without its values: rebuilds the module around any parameter dict.

    Used inside `jax.jit` / `jax.grad`, where parameters arrive as plain nested dicts (the form
    optax, orbax and the porting tables use) and the module must be re-formed around them.
    """

    def __init__(self, factory: Callable[[], nnx.Module]):
        self.graphdef, self._state = nnx.split(nnx.eval_shape(factory))

    def __call__(self, params: Mapping) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self._state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)
