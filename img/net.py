"""Local network helpers.

    from img.net import free_port
    port = free_port()          # a TCP port nothing listens on right now (local rendezvous, test servers)
"""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it; another process may take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
