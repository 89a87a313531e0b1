"""The base of every error a user can act on: `es3` prints its message and exits with status 2."""


class Es3Error(ValueError):
    """Bad input, a mismatched checkpoint or store, a refused configuration: the message names the
    file, key or shape at fault."""


# What a user without torch installs to read or write PyTorch checkpoints.
TORCH_EXTRA = "pip install 'es3-jax[torch]'"
