"""GPU memory for the shm transport (``shm_memory: gpu``): an arena whose values live in its
producer's GPU memory, read by other processes of the host through CUDA IPC.

The arena file stays what it is for host memory (slot headers with their seq stamps, the
index links, the allocator, eviction: ``transport/arena.py``, ``transport/shm_owner.py``), but
it is sparse: only the pages holding slot headers are ever touched. A slot's value lives at the
same offset in one device buffer of the arena's size, allocated by the producer on its GPU
when it creates the arena. Page 0 of the file describes that buffer and is never a slot:

    magic 8s ("PDKVGPU1") | json length I | json (the fields of torch's ``_share_cuda_``: the
    producer's device, the cudaIpcMemHandle, sizes, the ref-counter and event handles; bytes
    as hex)

A reader maps the buffer once per arena (``torch.UntypedStorage._new_shared_cuda``, which opens
the handle with ``cudaIpcMemLazyEnablePeerAccess`` on the reader's own device: the same GPU, or
another GPU of the host with peer access) and copies from views of it, device to device. The
guards are the host arena's: a reader checks the slot's stamp before and after it copies, and
the chunk header (key digest, layout fingerprint) sits at the start of the value, on the device.

Ordering: the producer synchronizes its gather into a slot before it commits the slot's stamp;
a reader synchronizes its copy out of a slot before ``release`` re-reads the stamp, so a slot the
producer reuses is never reported as read intact.

A reader in the producer's own process cannot open its IPC handle (CUDA refuses); it gets the
producer's buffer from a registry of this process's GPU arenas instead (benchmarks and tests
that run both ends in one process).
"""
from __future__ import annotations

import json
import struct
import threading
from typing import Any

MAGIC = b"PDKVGPU1"
_LEN = struct.Struct("<8sI")
_FIELDS = ("device", "handle", "size", "offset", "ref_handle", "ref_offset", "event", "event_sync")
_own: dict[str, Any] = {}  # arena name -> device buffer, this process's GPU arenas
_own_lock = threading.Lock()


class GpuArenaError(OSError):
    """A GPU arena that cannot be made or mapped here (no CUDA, no peer access, ...)."""


def is_gpu_arena(head: bytes) -> bool:
    """Whether the first bytes of an arena file say its values live on a GPU."""
    return head[:8] == MAGIC


def create(name: str, size: int, device: Any) -> tuple[Any, bytes]:
    """A device buffer of ``size`` bytes on ``device`` for arena ``name`` and the page 0 that
    describes it (GpuArenaError if the buffer cannot be made or shared)."""
    import torch

    try:
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        shared = buf.untyped_storage()._share_cuda_()
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        raise GpuArenaError(f"cannot allocate a {size >> 20} MiB GPU arena on {device} and share it: {e}") from e
    desc = {f: (v.hex() if isinstance(v, bytes) else v) for f, v in zip(_FIELDS, shared)}
    body = json.dumps(desc).encode()
    with _own_lock:
        _own[name] = buf
    return buf, _LEN.pack(MAGIC, len(body)) + body


def forget(name: str) -> None:
    """The producer closed arena ``name``: same-process readers stop finding its buffer."""
    with _own_lock:
        _own.pop(name, None)


def open_buffer(name: str, head: bytes, size: int, device: Any) -> Any:
    """The device buffer of arena ``name`` (page 0 ``head``) mapped on this reader's ``device``
    (GpuArenaError if this process has no CUDA device or cannot map it)."""
    with _own_lock:
        buf = _own.get(name)
    if buf is not None:
        return buf
    if device is None:
        raise GpuArenaError(f"arena {name} keeps its values in GPU memory and this reader has no CUDA device")
    import torch

    try:
        _, n = _LEN.unpack_from(head, 0)
        desc = json.loads(head[_LEN.size:_LEN.size + n])
        args = [bytes.fromhex(desc[f]) if f in ("handle", "ref_handle", "event") else desc[f] for f in _FIELDS]
        if args[2] < size:
            raise ValueError(f"its buffer is {args[2]} bytes, the arena {size}")
        args[0] = torch.device(device).index or 0  # opened in this reader's context (peer access)
        with torch.cuda.device(args[0]):
            storage = torch.UntypedStorage._new_shared_cuda(*args)
        return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (size,), (1,))
    except (RuntimeError, ValueError, KeyError, struct.error) as e:
        raise GpuArenaError(f"cannot map the GPU memory of arena {name} on {device}: {e} (GPUs without peer "
                            "access between them: use connector.transport.shm_memory host)") from e


def copy(dst: Any, src: Any) -> None:
    """Copy ``src`` into ``dst`` (each a byte memoryview or a uint8 tensor, one of them on a
    GPU) and wait for the copy: the copy API of a GPU arena (``put``/``get``)."""
    import torch

    as_t = [x if isinstance(x, torch.Tensor) else torch.frombuffer(x, dtype=torch.uint8) for x in (dst, src)]
    as_t[0].copy_(as_t[1])
    dev = as_t[0].device if as_t[0].device.type == "cuda" else as_t[1].device
    torch.cuda.synchronize(dev)
