"""Reading /proc for the tests: who listens where, which processes a server left, whether one lives."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ... (None if gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _processes():
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                try:
                    name = Path(entry, "stat").read_text().split("(", 1)[1].rsplit(")", 1)[0]
                except (OSError, IndexError):
                    continue
                yield int(entry.name), name, fields


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (a server and its backend stubs)."""
    return [pid for pid, _, fields in _processes() if int(fields[2]) == pgid]


def children(pid: int, name: str | None = None) -> list[int]:
    """Live children of ``pid``, optionally only those whose command is ``name``."""
    return [
        child for child, command, fields in _processes() if int(fields[1]) == pid and name in (None, command)
    ]


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port``, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(_decode_address(address))
    return found


def _decode_address(hex_address: str) -> str:
    # /proc lists each 32-bit word in host (little-endian) order.
    raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        raw = raw[12:]
    return ".".join(str(b) for b in raw) if len(raw) == 4 else raw.hex()
