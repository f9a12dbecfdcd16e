"""gc under load and under kill -9: nothing referenced is ever lost, and what is garbage goes.

- test_gc_under_load: 3 processes import, flatten and mount random images (reading and checking every
  file of each mount, sometimes after removing the image while it is mounted) while a 4th runs gc in a
  loop (and every 5th round an fsck, which must report no error while the others write), for
  FLATMOUNT_GC_LOAD_SECONDS (default 20).  Afterwards fsck finds nothing missing, no reader saw an
  error, and a final gc leaves exactly the referenced objects.
- test_kill9_anywhere: FLATMOUNT_CRASH_TRIALS (default 20) trials, each running one of import, flatten,
  gc, umount in a child that is killed with SIGKILL at a random moment of its operation; after each,
  `flatmount.mount.cleanup` + fsck must be clean and every recorded image must still have its objects.

Both need root (real mounts); every mount is unmounted in teardown even on failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from flatmount.store import reftable
from tests.conftest import require_root
from tests.maint_helpers import content, oci_image, primary_objects, unmount_all_under

ROOT = Path(__file__).resolve().parent.parent
LOAD_SECONDS = float(os.environ.get("FLATMOUNT_GC_LOAD_SECONDS", "20"))
CRASH_TRIALS = int(os.environ.get("FLATMOUNT_CRASH_TRIALS", "20"))
WORKERS = 3


# --- image definitions -----------------------------------------------------------------------------

def content_pool(n: int = 48) -> list[bytes]:
    """Contents shared by every worker's layers (so objects are shared across layers and images)."""
    rng = random.Random(1)
    return [content(f"pool{i}", rng.choice((65, 100, 1000, 4096, 5000, 20000, 70000))) for i in range(n)]


def image_defs(worker: int, pool: list[bytes], n_images: int = 4) -> dict[str, list[dict[str, bytes]]]:
    """Per worker: images of 1-3 layers drawn from the worker's own layer pool (layer ids differ per
    worker, so one worker's rmi never races another's import), file contents from the shared pool."""
    rng = random.Random(100 + worker)
    layers = []
    for k in range(5):
        files = {f"w{worker}/l{k}/f{i}": rng.choice(pool) for i in range(rng.randint(3, 12))}
        files[f"w{worker}/l{k}/own"] = content(f"own-{worker}-{k}", 200)
        if k and rng.random() < 0.5:  # override a lower layer's file
            files[f"w{worker}/l0/f0"] = rng.choice(pool)
        layers.append(files)
    out = {}
    for i in range(n_images):
        chain = [layers[0]] + rng.sample(layers[1:], rng.randint(0, 2))
        out[f"w{worker}-i{i}"] = chain
    return out


def expected_files(chain: list[dict[str, bytes]]) -> dict[str, bytes]:
    merged: dict[str, bytes] = {}
    for layer in chain:
        merged.update(layer)
    return merged


def check_mount(merged: str, want: dict[str, bytes]) -> int:
    """Read every file of a mount; AssertionError unless it holds exactly `want`."""
    seen = {}
    for dirpath, _dirs, files in os.walk(merged):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                seen[os.path.relpath(p, merged)] = fh.read()
    if seen != want:
        bad = sorted(k for k in set(seen) | set(want) if seen.get(k) != want.get(k))
        raise AssertionError(f"mount {merged} differs from its image at {bad[:5]}")
    return len(seen)


# --- processes (run as `python -c`, so they are plain processes with their own imports) -------------

def _child_main(argv_json: str) -> None:
    args = json.loads(argv_json)
    fn = {"worker": _worker, "gcloop": _gc_loop, "crash": _crash_child}[args["role"]]
    fn(args)


def _open(args):
    from flatmount.api import open_store

    return open_store(args["root"], runroot=args["runroot"])


def _worker(args) -> None:
    from flatmount.flatten import flatten_image
    from flatmount.mount import mount
    from flatmount.pull import pull

    store = _open(args)
    defs = image_defs(args["worker"], content_pool())
    rng = random.Random(args["worker"])
    stats = {"pulls": 0, "flattens": 0, "mounts": 0, "files": 0, "rmi": 0, "rmi_while_mounted": 0}
    errors: list[str] = []
    names = sorted(defs)
    while time.time() < args["deadline"]:
        name = rng.choice(names)
        want = expected_files(defs[name])
        try:
            pull(store, f"oci:{args['layouts']}/{name}:t", name)
            stats["pulls"] += 1
            flatten_image(store, name)
            stats["flattens"] += 1
            with mount(store, name) as merged:
                stats["mounts"] += 1
                removed = False
                if rng.random() < 0.3:  # the lease alone must now keep the objects alive
                    store.remove_image(name)
                    stats["rmi_while_mounted"] += 1
                    removed = True
                    time.sleep(0.05)
                stats["files"] += check_mount(merged, want)
            if not removed and rng.random() < 0.4:
                store.remove_image(name)
                stats["rmi"] += 1
        except Exception:  # noqa: BLE001 - every failure is reported to the test
            errors.append(traceback.format_exc())
    Path(args["out"]).write_text(json.dumps({"stats": stats, "errors": errors}))


def _gc_loop(args) -> None:
    """gc in a loop; every 5th round an fsck too, which must see no error while the others write."""
    from flatmount.fsck import fsck
    from flatmount.gc import gc

    store = _open(args)
    stats = {"runs": 0, "objects_removed": 0, "images_removed": 0, "fsck_runs": 0}
    errors: list[str] = []
    while time.time() < args["deadline"]:
        try:
            res = gc(store, grace_s=0)
            stats["runs"] += 1
            stats["objects_removed"] += res.objects_removed
            stats["images_removed"] += len(res.images_removed)
            errors.extend(res.errors)
            if stats["runs"] % 5 == 0:
                check = fsck(store, sample=20)
                stats["fsck_runs"] += 1
                errors.extend(f"concurrent fsck: {p}" for p in check.problems if p.severity == "error")
        except Exception:  # noqa: BLE001
            errors.append(traceback.format_exc())
        time.sleep(0.01)
    Path(args["out"]).write_text(json.dumps({"stats": stats, "errors": errors}))


def spawn(args: dict) -> subprocess.Popen:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_gc_load import _child_main; " \
           f"_child_main({json.dumps(json.dumps(args))})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.fixture
def no_mounts_left(tmp_path):
    yield
    left = unmount_all_under(tmp_path)
    assert not left, f"mounts left behind: {left}"


# --- the load test ---------------------------------------------------------------------------------

def test_gc_under_load(tmp_path, no_mounts_left):
    require_root()
    from flatmount.api import open_store
    from flatmount.fsck import fsck
    from flatmount.gc import gc

    root, runroot = str(tmp_path / "store"), str(tmp_path / "run")
    layouts = tmp_path / "oci"
    pool = content_pool()
    for w in range(WORKERS):
        for name, chain in image_defs(w, pool).items():
            oci_image(layouts / name, chain)
    deadline = time.time() + LOAD_SECONDS
    common = {"root": root, "runroot": runroot, "deadline": deadline, "layouts": str(layouts)}
    procs = [spawn({**common, "role": "worker", "worker": w, "out": str(tmp_path / f"w{w}.json")})
             for w in range(WORKERS)]
    procs.append(spawn({**common, "role": "gcloop", "out": str(tmp_path / "gc.json")}))
    try:
        for p in procs:
            p.wait(timeout=LOAD_SECONDS + 120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {f: json.loads((tmp_path / f).read_text()) for f in [*(f"w{w}.json" for w in range(WORKERS)), "gc.json"]}
    errors = [e for r in results.values() for e in r["errors"]]
    assert not errors, "\n".join(errors[:3])
    stats = {f: r["stats"] for f, r in results.items()}
    print(json.dumps(stats, sort_keys=True))
    assert stats["gc.json"]["runs"] >= 3 and all(stats[f"w{w}.json"]["mounts"] >= 1 for w in range(WORKERS))
    assert stats["gc.json"]["objects_removed"] > 0, "gc never had anything to free: the test proves little"

    store = open_store(root, runroot=runroot)
    try:
        res = fsck(store)
        assert res.ok, [p for p in res.problems if p.severity == "error"]
        assert "missing-object" not in res.counts and "corrupt-object" not in res.counts
        gc(store, grace_s=0)
        refs = reftable.referenced(store.connect())
        assert primary_objects(store) == refs
        for img in store.images():
            store.remove_image(img.id)
        res = gc(store, grace_s=0)
        assert primary_objects(store) == set()
        assert os.listdir(store.root / "images") == [] and os.listdir(store.layers_dir) == []
        assert fsck(store).problems == ()
    finally:
        store.close()


# --- kill -9 at random points ----------------------------------------------------------------------

def _crash_child(args) -> None:
    """One operation, announced on stdout ("go" when imports are done, then "done <seconds>")."""
    from flatmount.flatten import flatten_image
    from flatmount.gc import gc
    from flatmount.mount import umount
    from flatmount.pull import pull

    store = _open(args)
    store.ensure_writable()
    op, arg = args["op"], args["arg"]
    print("go", flush=True)
    t0 = time.monotonic()
    if op == "import":
        pull(store, f"oci:{arg['layout']}:t", arg["name"])
    elif op == "flatten":
        if arg.get("helper"):   # the two-process writer, whatever the size: killed with its helper
            from flatmount import flatten
            flatten.helper._helper_pays = lambda prefix, chain: True
        flatten_image(store, arg["name"])
    elif op == "gc":
        gc(store, grace_s=0)
    elif op == "umount":
        umount(store, arg["lease"])
    print(f"done {time.monotonic() - t0:.4f}", flush=True)


def crash_image(t: int, pool: list[bytes]) -> list[dict[str, bytes]]:
    """A new image per trial: a shared base layer plus a layer with fresh and pooled content."""
    rng = random.Random(10_000 + t)
    base = {f"base/f{i}": pool[i] for i in range(8)}
    top = {f"t{t}/p{i}": rng.choice(pool) for i in range(rng.randint(20, 60))}
    top.update({f"t{t}/n{i}": content(f"trial{t}-{i}", rng.choice((100, 3000, 30000))) for i in range(40)})
    return [base, top]


def test_kill9_anywhere(tmp_path, no_mounts_left):
    require_root()
    from flatmount.api import open_store
    from flatmount.fsck import fsck
    from flatmount.gc import gc
    from flatmount.mount import cleanup, list_mounts, mount, mount_image_ref, umount
    from flatmount.pull import pull

    root, runroot = str(tmp_path / "store"), str(tmp_path / "run")
    store = open_store(root, runroot=runroot)
    pool = content_pool()
    rng = random.Random(int(os.environ.get("FLATMOUNT_CRASH_SEED", "7")))
    defs: dict[str, list[dict[str, bytes]]] = {}

    def add_image(t: int) -> str:
        name = f"c{t}"
        defs[name] = crash_image(t, pool)
        oci_image(tmp_path / "oci" / name, defs[name])
        return name

    for t in range(3):
        pull(store, f"oci:{tmp_path / 'oci' / add_image(t)}:t", f"c{t}")
    est = {"import": 0.05, "flatten": 0.05, "gc": 0.05, "umount": 0.05}  # learnt from finished runs
    outcome = {op: {"killed": 0, "finished": 0} for op in est}
    try:
        for t in range(3, 3 + CRASH_TRIALS):
            op = rng.choice(sorted(est))
            recorded = [img.names[0].split(":")[0] for img in store.images()]
            if op == "import":
                name = add_image(t)
                arg = {"layout": str(tmp_path / "oci" / name), "name": name}
            elif op == "flatten":
                name = add_image(t)
                pull(store, f"oci:{tmp_path / 'oci' / name}:t", name)
                arg = {"name": name, "helper": t % 2 == 0}
            elif op == "gc":
                if len(recorded) > 2:
                    store.remove_image(rng.choice(recorded))
                arg = {}
            else:
                lease = mount_image_ref(store, rng.choice(recorded))
                arg = {"lease": lease.id}
            p = spawn({"role": "crash", "root": root, "runroot": runroot, "op": op, "arg": arg})
            try:
                assert p.stdout.readline().strip() == "go"
                time.sleep(rng.uniform(0, est[op]))
                p.send_signal(signal.SIGKILL)
                rest = p.stdout.read()
            finally:
                p.kill()
                p.wait()
            if "done" in rest:
                outcome[op]["finished"] += 1
                # kill within ~its duration (a little less: waking up to kill takes time too, and these
                # operations take milliseconds)
                est[op] = 0.6 * est[op] + 0.4 * 0.7 * float(rest.split()[-1])
            else:
                outcome[op]["killed"] += 1
            # the operator's recovery: cleanup, then fsck must be clean (notices allowed)
            cleanup(store)
            for lease in list_mounts(store):  # a kill before the unmount leaves a live mount: ours
                umount(store, lease.id)
            res = fsck(store, sample=64)
            errs = [p for p in res.problems if p.severity == "error"]
            assert not errs, f"trial {t} ({op}): {errs}"
            if t % 5 == 0:
                name = rng.choice([img.names[0].split(":")[0] for img in store.images()])
                with mount(store, name) as merged:
                    check_mount(merged, expected_files(defs[name]))
        print(json.dumps(outcome, sort_keys=True))
        # (operations of a few milliseconds often finish before the kill lands: a quarter is plenty)
        assert sum(o["killed"] for o in outcome.values()) >= CRASH_TRIALS // 4, outcome
        # afterwards: gc frees all garbage, and every image is whole
        cleanup(store)
        gc(store, grace_s=0)
        res = fsck(store, repair=True)
        assert res.ok and set(res.counts) <= {"temp-leftover"}, res.problems
        for img in store.images():
            name = img.names[0].split(":")[0]
            with mount(store, name) as merged:
                check_mount(merged, expected_files(defs[name]))
    finally:
        store.close()
