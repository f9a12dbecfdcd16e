"""Benchmark: container start to exit, `flatmount run --rm IMAGE -- /bin/true`, beside its baselines.

Warm (image already pulled and flattened), interleaved run by run so machine noise hits all alike:
- `flatmount run --rm [--net none] IMAGE -- /bin/true` (the CLI: interpreter start included);
- `podman --runtime runc run --rm --network none IMAGE /bin/true` on the same image in podman's own
  c/storage overlay store (crun, podman's default, refuses this machine's hybrid cgroups);
- `runc run` of a ready bundle (`flatmount bundle`, made once): the floor for any runc-based start;
- `store.run(...)` from this (long-lived) process: the same work without interpreter start-up.
Each flatmount run's `--json` timings give the breakdown; "startup_exit" is the wall time not in
any phase (interpreter start, imports, argument parsing, exit).

Cold (an OCI layout never seen before, fresh stores each trial): `flatmount pull` + `run` against
`podman pull` + `podman run` of the same layout.

    python3 tools/bench_run.py [--quick]      # prints JSON; needs root, runc, podman
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

from busybox_image import write_oci  # noqa: E402

PHASES = ("mount", "bundle", "create", "netlink", "start", "wait", "cleanup")


def _pct(xs: list[float]) -> dict:
    s = sorted(xs)
    return {"p50_ms": round(statistics.median(s) * 1e3, 1),
            "p95_ms": round(s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))] * 1e3, 1),
            "min_ms": round(s[0] * 1e3, 1)}


class _Env:
    def __init__(self, base: Path):
        self.base = base
        self.root, self.runroot = base / "fstore", base / "frun"
        (base / "pm").mkdir()
        (base / "pm" / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{base / "pm/graph"}"\nrunroot = "{base / "pm/run"}"\n')
        (base / "pm" / "containers.conf").write_text(
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'tmp_dir = "{base / "pm/tmp"}"\n[containers]\ndefault_ulimits = []\n')
        self.env = {**os.environ, "PYTHONPATH": str(ROOT),
                    "CONTAINERS_STORAGE_CONF": str(base / "pm" / "storage.conf"),
                    "CONTAINERS_CONF": str(base / "pm" / "containers.conf")}

    def fm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(self.root), "--runroot",
                            str(self.runroot), *args], capture_output=True, text=True, env=self.env,
                           cwd=str(ROOT), stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"flatmount {' '.join(args)}: {p.stderr}")
        return p

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True,
                           env=self.env, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {p.stderr}")
        return p

    def close(self) -> None:
        subprocess.run(["podman", "--runtime", "runc", "rm", "-a", "-f"], env=self.env, capture_output=True)
        subprocess.run(["podman", "system", "reset", "-f"], env=self.env, capture_output=True)
        self.fm("cleanup", check=False)


def _unmount_below(path: Path) -> None:
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
    for mp in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def warm(quick: bool, base: Path) -> dict:
    n = 5 if quick else 20
    e = _Env(base)
    try:
        layout = write_oci(base / "oci", "bb")
        e.fm("pull", layout, "--name", "bb")
        e.fm("flatten", "bb")
        podman_ref = e.podman("pull", "-q", layout).stdout.strip()
        bundle = base / "bundle"
        e.fm("bundle", "bb", str(bundle), "--net", "loopback", "--", "/bin/true")   # no hook: runc alone
        runc_root = base / "runc-baseline"
        walls: dict[str, list[float]] = {"flatmount": [], "flatmount_net_none": [], "podman": [],
                                         "runc_ready_bundle": [], "api_store_run": []}
        from flatmount.api import open_store
        from flatmount.run.runspec import RunOptions

        api_store = open_store(str(e.root), runroot=str(e.runroot))
        phases: dict[str, list[float]] = {p: [] for p in (*PHASES, "startup_exit")}
        for i in range(n + 1):   # the first round warms caches and is not counted
            t = time.perf_counter()
            p = e.fm("--json", "run", "--rm", "bb", "--", "/bin/true")
            w = time.perf_counter() - t
            res = json.loads(p.stdout)
            if i:
                walls["flatmount"].append(w)
                for k in PHASES:
                    phases[k].append(res["timings"].get(k, 0.0))
                phases["startup_exit"].append(w - sum(res["timings"].get(k, 0.0) for k in PHASES))
            t = time.perf_counter()
            e.fm("run", "--rm", "--net", "none", "bb", "--", "/bin/true")
            if i:
                walls["flatmount_net_none"].append(time.perf_counter() - t)
            t = time.perf_counter()
            e.podman("run", "--rm", "--network", "none", podman_ref, "/bin/true")
            if i:
                walls["podman"].append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(["runc", "--root", str(runc_root), "run", "-b", str(bundle), f"b{i}"], check=True,
                           stdin=subprocess.DEVNULL, capture_output=True)
            if i:
                walls["runc_ready_bundle"].append(time.perf_counter() - t)
            t = time.perf_counter()
            res = api_store.run("bb", RunOptions(command=("/bin/true",)), rm=True, stdin=subprocess.DEVNULL)
            if i:
                walls["api_store_run"].append(time.perf_counter() - t)
            assert res.exit_status == 0
        api_store.close()
        e.fm("bundle", "--remove", str(bundle))
        out = {k: _pct(v) for k, v in walls.items()}
        fm50, pm50, rc50 = (out[k]["p50_ms"] for k in ("flatmount", "podman", "runc_ready_bundle"))
        out["runs"] = n
        out["speedup_vs_podman_p50"] = round(pm50 / fm50, 2)
        out["over_runc_ready_bundle_p50_ms"] = round(fm50 - rc50, 1)
        out["api_over_runc_ready_bundle_p50_ms"] = round(out["api_store_run"]["p50_ms"] - rc50, 1)
        out["targets"] = {"speedup_vs_podman": ">= 4", "over_runc_ready_bundle_ms": "<= 40"}
        out["breakdown_p50_ms"] = {k: round(statistics.median(v) * 1e3, 1) for k, v in phases.items()}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out["python_c_pass_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        return out
    finally:
        e.close()
        _unmount_below(base)


def cold(quick: bool, base: Path) -> dict:
    trials = 1 if quick else 3
    fm_t, pm_t = [], []
    for i in range(trials):
        d = base / f"cold{i}"
        d.mkdir()
        e = _Env(d)
        try:
            layout = write_oci(d / "oci", "bb")
            t = time.perf_counter()
            e.fm("pull", layout, "--name", "bb")
            e.fm("run", "--rm", "bb", "--", "/bin/true")
            fm_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = e.podman("pull", "-q", layout).stdout.strip()
            e.podman("run", "--rm", "--network", "none", ref, "/bin/true")
            pm_t.append(time.perf_counter() - t)
        finally:
            e.close()
            _unmount_below(d)
    return {"trials": trials, "flatmount_pull_run_ms": [round(x * 1e3) for x in fm_t],
            "podman_pull_run_ms": [round(x * 1e3) for x in pm_t],
            "ratio_podman_over_flatmount_median": round(statistics.median(pm_t) / statistics.median(fm_t), 2)}


def run(quick: bool) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("bench_run needs root (mounts, runc)")
    for tool in ("runc", "podman", "busybox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_run needs {tool}")
    base = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        (base / "warm").mkdir()
        return {"warm": warm(quick, base / "warm"), "cold": cold(quick, base)}
    finally:
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run("--quick" in sys.argv), indent=2, sort_keys=True))
