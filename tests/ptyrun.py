"""Run the CLI with stderr on a pseudo-terminal, as a person at a terminal would see it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_on_tty(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """`python3 -m flatmount ARGV` with stderr on a pty: (exit code, stdout, what the terminal got)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "flatmount", *argv], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:   # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        rc = proc.wait(timeout=timeout)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return rc, out, b"".join(chunks).decode(errors="replace")
