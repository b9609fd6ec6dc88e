"""A free TCP port on 127.0.0.1, for the tests that start `accelerate launch` (its main process port)
or a server: the operating system picks one, the probe socket releases it."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
