"""Local process helpers."""

from __future__ import annotations

from pathlib import Path

from promptpipe.localproc import free_port


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= p < low for p in ports)
