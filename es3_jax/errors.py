"""The base of every error a user can act on: `es3` prints its message and exits with status 2."""

import importlib.util


class Es3Error(ValueError):
    """Bad input, a mismatched checkpoint or store, a refused configuration: the message names the
    file, key or shape at fault."""


def installed(module: str) -> bool:
    """Whether `module` (dotted) is importable, without importing it; a missing parent package (a
    namespace such as JAX's `jax_plugins`, absent until a plugin is installed) means no."""
    parts = module.split(".")
    return all(importlib.util.find_spec(".".join(parts[: i + 1])) is not None for i in range(len(parts)))


# What a user without torch installs to read or write PyTorch checkpoints.
TORCH_EXTRA = "pip install 'es3-jax[torch]'"


def require_torch(what: str, error: type[Es3Error] = Es3Error) -> None:
    """Raise `error` ("<what> needs torch: <the extra to install>") where torch is not installed:
    porting/ and every PyTorch file need it, the rest of es3 does not."""
    if not installed("torch"):
        raise error(f"{what} needs torch: {TORCH_EXTRA}")
