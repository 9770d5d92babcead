"""Page-locking host memory for CUDA (``cudaHostRegister``), shared by transport/ and store/.

Only processes that use CUDA get here (torch is imported inside the functions, an optional heavy
dependency); a failure is a warning and slower copies, never an error.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)


def clear_cuda_error() -> None:
    """Reset CUDA's per-thread last error after a failed register call, so torch's next kernel
    launch check in this thread does not report it (torch exposes no cudaGetLastError)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart.so" in line}
        for lib in libs:
            ctypes.CDLL(lib).cudaGetLastError()
    except Exception:  # noqa: BLE001 - best effort
        pass


def cuda_pin(addr: int, size: int, what: str) -> bool:
    """``cudaHostRegister`` the ``size`` bytes at ``addr`` (portable: every device's context sees
    them pinned); False, with one warning naming ``what``, where it fails or there is no CUDA."""
    try:
        import torch

        rc = int(torch.cuda.cudart().cudaHostRegister(addr, size, 1))
    except Exception as e:  # noqa: BLE001 - no CUDA here
        rc = str(e)
    if rc != 0:
        clear_cuda_error()
        log.warning("%s: memory not CUDA-pinned (%s); GPU copies will be slower", what, rc)
    return rc == 0


def cuda_unpin(addr: int) -> None:
    """Undo ``cuda_pin`` (``cudaHostUnregister``); a failure is only cleared, never raised."""
    import torch  # only pinned memory gets here

    if int(torch.cuda.cudart().cudaHostUnregister(addr)) != 0:
        clear_cuda_error()
