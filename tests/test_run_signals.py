"""Signals passed on to a container's init (flatmount.run.container._Forwarder), without a runtime:
a child process plays the init, naming itself as runc's init does before its `exec`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from flatmount.run.container import _Forwarder

_INIT = textwrap.dedent("""
    import signal, sys, time
    phase = 1
    def term(*_):
        sys.exit(9 if phase == 2 else 5)   # 5: the runtime's init got it (runc would lose or die of it)
    signal.signal(signal.SIGTERM, term)
    with open("/proc/self/comm", "w") as f:
        f.write("runc:[2:INIT]")
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(0.3)
    with open("/proc/self/comm", "w") as f:
        f.write("sh")
    phase = 2
    while True:
        time.sleep(0.01)
""")


def test_a_signal_for_runcs_init_waits_for_the_containers_program():
    """SIGTERM while the init is still `runc:[2:INIT]` (its Go runtime catches every signal but
    passes none on) is kept, and sent once the container's own program runs and catches it."""
    p = subprocess.Popen([sys.executable, "-c", _INIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fw = _Forwarder(p.pid, timeout=20)
    try:
        assert p.stdout.readline().strip() == "ready"
        fw.started()
        fw.handler(signal.SIGTERM, None)
        p.stdin.write("go\n")
        p.stdin.flush()
        status = fw.wait()
    finally:
        fw.close()
        if p.poll() is None:
            p.kill()
        p.wait()
    assert os.waitstatus_to_exitcode(status) == 9
