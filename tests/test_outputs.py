"""`es3_jax.outputs`: a failed write as TensorStore reports it is read as the system's error."""

import errno

from es3_jax.data.embedding_store import StoreError
from es3_jax.outputs import system_error

# What `es3 embed` into a full 700 kB tmpfs raised (TensorStore's ValueError, verbatim).
FULL_TMPFS = (
    'RESOURCE_EXHAUSTED: Error writing local file "/mnt/x/store/syn_000002/features.zarr/c/0/0/0/0": '
    'Failed writing: "/mnt/x/store/syn_000002/features.zarr/c/0/0/0/0.__lock": Failed to write 147763 '
    "bytes to file 4: No space left on device [os_error_code='28']"
)


def test_tensorstore_full_disk_is_enospc():
    error = system_error(ValueError(FULL_TMPFS))
    assert error is not None and error.errno == errno.ENOSPC and error.strerror == "No space left on device"
    assert system_error(ValueError("INVALID_ARGUMENT: shape mismatch")) is None
    assert system_error(StoreError(f"reading video 'a': {FULL_TMPFS}")) is None  # already explained
