"""Moving chunks between processes and hosts."""
from transport.base import Transport, TransportError, make_transport

__all__ = ["Transport", "TransportError", "make_transport"]
