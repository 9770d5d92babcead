"""TEST DOUBLE: ``hf3fs_fuse.io`` answered by ``tests.doubles.usrbio_emulator`` (not 3FS).

The emulator keeps per-process state (registered fds, the fault hook), so this module and the
tests share its one copy, ``tests.doubles.usrbio_emulator``; the repository root goes on the
path when the process (a vLLM worker, a crash-test child) was started without it.
"""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from tests.doubles.usrbio_emulator import (  # noqa: E402,F401
    EMULATOR,
    IorPriority,
    deregister_fd,
    emulate_mount,
    extract_mount_point,
    force_fsync,
    ioring,
    iovec,
    make_ioring,
    make_iovec,
    register_fd,
)
