"""systemd's readiness protocol (sd_notify), without libsystemd: one datagram per state."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` ("READY=1", "RELOADING=1", "STOPPING=1", ...) if NOTIFY_SOCKET is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
