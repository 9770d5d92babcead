"""TEST DOUBLE: ``hf3fs_fuse.io`` answered by ``store.usrbio_emulator`` (not 3FS)."""
from store.usrbio_emulator import (  # noqa: F401
    EMULATOR, IorPriority, deregister_fd, emulate_mount, extract_mount_point, force_fsync,
    iovec, ioring, make_iovec, make_ioring, register_fd,
)
