"""The OCI runtime spec (`config.json`) of a read-only container: image config + options -> dict.

Why a module of its own: the rules (podman's default capabilities, its seccomp profile translated to
the runtime spec, its masked and read-only paths, the standard mounts, users resolved from the image's
/etc/passwd and /etc/group) are the contract with the runtime, and must be the same for `bundle`,
`run` and the tests that check them.  Nothing here executes anything from the image: users and
groups are read as text, every path inside the image is opened without following symlinks.

Sources, as podman reads them: capabilities from `default_capabilities` of
/usr/share/containers/containers.conf (or /etc/containers/containers.conf), else the list below (podman
4's own default); seccomp from /usr/share/containers/seccomp.json, filtered for this architecture and
the capability set as podman does (`includes`/`excludes` of arches, caps and minimum kernel).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from flatmount.errors import FlatmountError
from flatmount.record import field, record
from flatmount.safepath import open_parent_below, read_file_below

CONTAINERS_CONF = ("/etc/containers/containers.conf", "/usr/share/containers/containers.conf")
SECCOMP_JSON = ("/etc/containers/seccomp.json", "/usr/share/containers/seccomp.json")

# podman 4's default_capabilities, used when no containers.conf says otherwise
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETFCAP",
                "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT")

# podman 4 (c/common pkg/config + libpod) masked and read-only paths
MASKED_PATHS = ("/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/fs/selinux", "/sys/dev/block")
READONLY_PATHS = ("/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                  "/proc/sysrq-trigger")

def valid_hostname(name: str) -> bool:
    """`[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62}[A-Za-z0-9])?`: letters, digits, `-` and `.`, at most 64,
    starting and ending with a letter or digit (without `re`: a container's start-up)."""
    return (0 < len(name) <= 64 and name.isascii() and name[0].isalnum() and name[-1].isalnum()
            and all(c.isalnum() or c in ".-" for c in name))
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NET_MODES = ("none", "loopback", "host")
# files flatmount writes in the bundle and bind-mounts read-only into the container
ETC_FILES = ("hostname", "hosts", "resolv.conf")


class RunSpecError(FlatmountError):
    """Options or an image config that cannot make a container (bad -v, unknown user, no command)."""


@record
class Volume:
    """`-v HOST:CTR[:ro]`: a bind mount of a host path into the container."""

    host: str
    container: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> Volume:
        parts = text.split(":")
        ro = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            ro = parts[2] == "ro"
            parts = parts[:2]
        if len(parts) != 2 or not parts[0] or not parts[1].startswith("/"):
            raise RunSpecError(f"bad volume {text!r}: expected HOST:CONTAINER[:ro] with an absolute "
                               "container path")
        host = os.path.abspath(parts[0])
        if not os.path.exists(host):
            raise RunSpecError(f"volume source {host} does not exist")
        return cls(host, os.path.normpath(parts[1]), ro)


@record
class RunOptions:
    """What `bundle` and `run` take besides the image: overrides of the image config and the mounts."""

    command: tuple[str, ...] = ()          # replaces the image's Cmd (Entrypoint kept, as podman does)
    entrypoint: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()              # K=V, override the image's Env
    workdir: str | None = None
    user: str | None = None                # UID[:GID] or NAME[:GROUP], resolved in the image
    net: str = "loopback"
    volumes: tuple[Volume, ...] = ()
    tmpfs: tuple[str, ...] = ()
    hostname: str | None = None
    terminal: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.net not in NET_MODES:
            raise RunSpecError(f"unknown network mode {self.net!r}: use one of {', '.join(NET_MODES)}")
        for e in self.env:
            if "=" not in e or e.startswith("="):
                raise RunSpecError(f"bad environment variable {e!r}: expected KEY=VALUE")
        for t in self.tmpfs:
            if not t.startswith("/"):
                raise RunSpecError(f"bad --tmpfs {t!r}: expected an absolute path")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise RunSpecError(f"bad working directory {self.workdir!r}: expected an absolute path")
        if self.hostname is not None and not valid_hostname(self.hostname):
            # it is written into the container's /etc/hosts: a newline there would add entries
            raise RunSpecError(f"bad hostname {self.hostname!r}: letters, digits, '-' and '.', at most "
                               "64 characters")
        for what, items in (("command", self.command), ("entrypoint", self.entrypoint or ()),
                            ("environment variable", self.env), ("--tmpfs", self.tmpfs),
                            ("working directory", (self.workdir or "",)), ("user", (self.user or "",))):
            for item in items:
                if "\0" in item:
                    raise RunSpecError(f"bad {what} {item!r}: contains a NUL character")


# --- reading files of the image without following symlinks ------------------------------------------

def image_path_kind(root: str, path: str) -> str | None:
    """'dir', 'file', 'other' or None (absent, or reached through a symlink) for `path` in `root`."""
    import stat

    parts = [p for p in path.split("/") if p and p != "."]
    if not parts:
        return "dir"
    fd = open_parent_below(root, parts)
    if fd is None:
        return None
    try:
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError:
        return None
    finally:
        os.close(fd)
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"


RUNTIME_MOUNTS = ("/proc", "/dev", "/sys", "/tmp", "/run")   # what standard_mounts() puts over the image


def resolve_in_image(root: str, path: str, max_links: int = 40) -> tuple[str, str | None]:
    """(resolved path, kind) of `path` as a process inside the container would reach it: symlinks
    followed within the image (an absolute target starts at the image root, `..` stops there), at
    most `max_links` of them.  kind: 'file', 'dir', 'other' (FIFO, device, socket), 'runtime' (in a
    file system the runtime mounts: /proc, /dev, ...), 'loop' (too many links) or None (absent)."""
    import stat

    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/" + "/".join([*done, part])
        if any(here == m or here.startswith(m + "/") for m in RUNTIME_MOUNTS):
            return here, "runtime"
        try:
            st = os.lstat(root + here)
        except OSError:
            return here, None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                return here, "loop"
            target = os.readlink(root + here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
        if todo and not stat.S_ISDIR(st.st_mode):
            return here, None
    here = "/" + "/".join(done)
    if not done:
        return here, "dir"
    st = os.lstat(root + here)
    return here, "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"


def check_user_db(root: str) -> None:
    """The runtime itself reads the container's /etc/passwd and /etc/group (following symlinks, in
    the container) to set up the process: one that is a FIFO would block it forever, a device or a
    file of /proc feed it unbounded or foreign content.  Absent or regular files only."""
    for path in ("/etc/passwd", "/etc/group"):
        resolved, kind = resolve_in_image(root, path)
        if kind not in (None, "file"):
            what = {"other": "a FIFO, device or socket", "dir": "a directory", "loop": "a symlink loop",
                    "runtime": "in a runtime file system"}[kind]
            via = f" (through symlinks: {resolved})" if resolved != path else ""
            raise RunSpecError(f"the image's {path} is {what}{via}: the runtime would read it as the "
                               "user database; refusing to run this image")


def _db(text: bytes | None) -> list[list[str]]:
    if not text:
        return []
    out = []
    for line in text.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            out.append(line.split(":"))
    return out


@record
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]
    home: str | None


MAX_ID = 0xFFFFFFFE   # uid_t/gid_t range; (uid_t)-1 means "no change" to the kernel


def _is_id(text: str) -> bool:
    """A uid/gid as the runtime takes it: ASCII decimal digits in uid_t's range (str.isdigit alone
    also accepts '²' and other Unicode digits that int() refuses)."""
    return text.isascii() and text.isdigit() and int(text) <= MAX_ID


def resolve_user(root: str, spec: str | None) -> User:
    """`USER` of an image config or `-u`: UID, NAME, UID:GID, NAME:GROUP... resolved through the image's
    /etc/passwd and /etc/group (read as text); supplementary groups from /etc/group, as podman does."""
    spec = (spec or "").strip() or "0"
    if "\0" in spec:
        raise RunSpecError(f"bad user {spec!r}: contains a NUL character")
    name, _, group = spec.partition(":")
    passwd = _db(read_file_below(root, "/etc/passwd"))
    groups = _db(read_file_below(root, "/etc/group"))
    entry = None
    if _is_id(name):
        uid = int(name)
        entry = next((e for e in passwd if len(e) >= 7 and e[2] == name), None)
    else:
        entry = next((e for e in passwd if len(e) >= 7 and e[0] == name), None)
        if entry is None:
            raise RunSpecError(f"user {name!r} is not in the image's /etc/passwd")
        if not _is_id(entry[2]):
            raise RunSpecError(f"user {name!r} has a bad uid in the image's /etc/passwd")
        uid = int(entry[2])
    if group:
        if _is_id(group):
            gid = int(group)
        else:
            g = next((e for e in groups if len(e) >= 3 and e[0] == group), None)
            if g is None:
                raise RunSpecError(f"group {group!r} is not in the image's /etc/group")
            if not _is_id(g[2]):
                raise RunSpecError(f"group {group!r} has a bad gid in the image's /etc/group")
            gid = int(g[2])
    elif entry is not None and _is_id(entry[3]):
        gid = int(entry[3])
    else:
        gid = 0   # a uid the image does not know: group root, as podman and runc do
    extra: list[int] = []
    uname = entry[0] if entry is not None else None
    if uname is not None and not group:
        for g in groups:
            if len(g) >= 4 and uname in g[3].split(",") and _is_id(g[2]) and int(g[2]) != gid:
                extra.append(int(g[2]))
    return User(uid, gid, tuple(sorted(set(extra))), entry[5] if entry is not None else None)


# --- capabilities and seccomp ---------------------------------------------------------------------

def _containers_confs() -> list[dict]:
    """The `[containers]` tables of the containers.conf files that exist, most specific first."""
    import tomllib

    out = []
    for path in CONTAINERS_CONF:
        try:
            with open(path, "rb") as f:
                conf = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            continue
        table = conf.get("containers")
        if isinstance(table, dict):
            out.append(table)
    return out


def default_capabilities(confs: list[dict] | None = None) -> list[str]:
    """`CAP_*` names podman gives a container: containers.conf's default_capabilities, else podman 4's."""
    for conf in _containers_confs() if confs is None else confs:
        caps = conf.get("default_capabilities")
        if isinstance(caps, list) and all(isinstance(c, str) for c in caps):
            return [c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper() for c in caps]
    return ["CAP_" + c for c in DEFAULT_CAPS]


def default_sysctls(confs: list[dict] | None = None) -> dict[str, str]:
    """containers.conf's default_sysctls (podman: `net.ipv4.ping_group_range=0 0`, so ping works
    without CAP_NET_RAW)."""
    for conf in _containers_confs() if confs is None else confs:
        items = conf.get("default_sysctls")
        if isinstance(items, list):
            return dict(str(i).split("=", 1) for i in items if "=" in str(i))
    return {"net.ipv4.ping_group_range": "0 0"}


_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "i386": "386", "armv7l": "arm",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_SCMP_ARCH = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "386": "SCMP_ARCH_X86",
              "arm": "SCMP_ARCH_ARM", "ppc64le": "SCMP_ARCH_PPC64LE", "s390x": "SCMP_ARCH_S390X",
              "riscv64": "SCMP_ARCH_RISCV64"}


def _kernel_at_least(want: str) -> bool:
    def nums(s: str) -> tuple[int, ...]:
        out = []
        for part in s.split("-")[0].split(".")[:3]:
            digits = "".join(ch for ch in part if ch.isdigit())
            out.append(int(digits or 0))
        return tuple(out)

    return nums(os.uname().release) >= nums(want)


def seccomp_profile(caps: Sequence[str], path: str | None = None) -> dict:
    """podman's seccomp.json translated to the runtime spec's `linux.seccomp` for this architecture
    and capability set (its `includes`/`excludes` rules applied, as c/common's seccomp package does)."""
    import json

    paths = (path,) if path else SECCOMP_JSON
    prof = None
    for p in paths:
        try:
            with open(p) as f:
                prof = json.load(f)
            break
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise RunSpecError(f"cannot read seccomp profile {p}: {e}") from None
    if prof is None:
        raise RunSpecError(f"no seccomp profile found (looked at {', '.join(paths)}): install podman's "
                           "containers-common, which ships /usr/share/containers/seccomp.json")
    goarch = _GOARCH.get(os.uname().machine, os.uname().machine)
    native = _SCMP_ARCH.get(goarch)
    arches: list[str] = []
    for m in prof.get("archMap") or []:
        if m.get("architecture") == native:
            arches = [native, *m.get("subArchitectures", [])]
    capset = {c.upper() for c in caps}

    def has(c: str) -> bool:
        c = c.upper()
        return (c if c.startswith("CAP_") else "CAP_" + c) in capset

    syscalls = []
    for call in prof.get("syscalls") or []:
        inc, exc = call.get("includes") or {}, call.get("excludes") or {}
        if inc.get("arches") and goarch not in inc["arches"]:
            continue
        if inc.get("caps") and not all(has(c) for c in inc["caps"]):
            continue
        if inc.get("minKernel") and not _kernel_at_least(inc["minKernel"]):
            continue
        if exc.get("arches") and goarch in exc["arches"]:
            continue
        if exc.get("caps") and any(has(c) for c in exc["caps"]):
            continue
        names = list(call.get("names") or ([call["name"]] if call.get("name") else []))
        if not names:
            continue
        out: dict = {"names": names, "action": call["action"]}
        if call.get("errnoRet") is not None:
            out["errnoRet"] = call["errnoRet"]
        if call.get("args"):
            out["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a}
                           for a in call["args"]]
        syscalls.append(out)
    spec: dict = {"defaultAction": prof.get("defaultAction", "SCMP_ACT_ERRNO"), "syscalls": syscalls}
    if prof.get("defaultErrnoRet") is not None:
        spec["defaultErrnoRet"] = prof["defaultErrnoRet"]
    if arches:
        spec["architectures"] = arches
    return spec


def _confinement_key() -> list:
    """What the confinement is computed from: the source files' identities, kernel and machine."""
    key: list = [os.uname().release, os.uname().machine]
    for p in (*CONTAINERS_CONF, *SECCOMP_JSON):
        try:
            st = os.stat(p)
            key.append([p, st.st_ino, st.st_size, st.st_mtime_ns])
        except OSError:
            key.append([p, None])
    return key


def confinement(cache_dir: str | None = None) -> dict:
    """podman's confinement for this machine: {"caps", "sysctls", "seccomp"} (see above).

    Computing it parses a 24 KB TOML file and a 16 KB JSON profile; with `cache_dir` (flatmount's
    runroot, root's own) the result is kept in `confinement.json` and reused while the sources,
    the kernel and the machine are unchanged."""
    import json

    key = _confinement_key()
    path = os.path.join(cache_dir, "confinement.json") if cache_dir else None
    if path is not None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                cached = json.load(f)
            if cached.get("key") == json.loads(json.dumps(key)):
                return cached
        except (OSError, ValueError, AttributeError):
            pass
    confs = _containers_confs()
    caps = default_capabilities(confs)
    out = {"key": key, "caps": caps, "sysctls": default_sysctls(confs), "seccomp": seccomp_profile(caps)}
    if path is not None:
        try:
            from flatmount.atomic import AtomicFile

            os.makedirs(cache_dir, 0o700, exist_ok=True)
            with AtomicFile(cache_dir, mode=0o600, durable=False) as af:
                af.file.write(json.dumps(out).encode())
                af.commit(path)
        except OSError:
            pass   # a cache: computed again next time
    return out


# --- the spec -------------------------------------------------------------------------------------

def _nofile_limit() -> dict:
    """podman raises the open-files limit to its own hard limit; more than that is refused."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 1048576 if hard == resource.RLIM_INFINITY else hard
    return {"type": "RLIMIT_NOFILE", "hard": hard, "soft": hard}


def _merge_env(image_env: Sequence[str], overrides: Sequence[str], user: User, terminal: bool,
               hostname: str) -> list[str]:
    env: dict[str, str] = {}
    for e in list(image_env) + list(overrides):
        k, sep, v = e.partition("=")
        if sep:
            env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    if terminal:
        env.setdefault("TERM", "xterm")
    env.setdefault("container", "flatmount")
    env.setdefault("HOSTNAME", hostname)
    if user.home:
        env.setdefault("HOME", user.home)
    else:
        env.setdefault("HOME", "/root" if user.uid == 0 else "/")
    return [f"{k}={v}" for k, v in env.items()]


def standard_mounts(bundle_dir: str) -> list[dict]:
    """podman's default mounts, plus /tmp and /run as tmpfs and the bundle's /etc files read-only."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["rprivate", "nosuid", "noexec", "nodev", "relatime", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
    ]
    for name in ETC_FILES:
        mounts.append({"destination": f"/etc/{name}", "type": "bind",
                       "source": os.path.join(bundle_dir, name),
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec", "rprivate"]})
    return mounts


def mount_targets(opts: RunOptions) -> list[tuple[str, bool]]:
    """(path, is_dir) of every mount destination the root must already hold (it is read-only).

    Targets below a tmpfs or a kernel file system that another mount puts there are left out."""
    out = [("/proc", True), ("/dev", True), ("/sys", True), ("/tmp", True), ("/run", True)]
    out += [(f"/etc/{n}", False) for n in ETC_FILES]
    covered = ("/proc", "/dev", "/sys", "/tmp", "/run")
    for v in opts.volumes:
        out.append((v.container, os.path.isdir(v.host)))
    for t in opts.tmpfs:
        out.append((os.path.normpath(t), True))
    return [(p, d) for p, d in out
            if not any(p != c and p.startswith(c + "/") for c in covered)]


def _bad_config(field: str, why: str, option: bool = True) -> RunSpecError:
    fix = "give it on the command line instead, or fix the image" if option else "fix the image"
    return RunSpecError(f"the image config's {field} {why}: {fix}")


def image_run_config(image_config: Mapping | None, opts: RunOptions | None = None) -> dict:
    """The `config` member of an image config, checked where `opts` does not replace it: the image is
    untrusted input, and a wrong type or a NUL would otherwise crash the spec builder or reach the
    runtime as a garbled spec.

    Entrypoint/Cmd/Env are lists of strings (a lone string counts as a one-element list, as docker
    reads it), User/WorkingDir strings (WorkingDir absolute, under PATH_MAX), Labels a string map."""
    opts = opts or RunOptions()
    if image_config is None:
        return {}
    if not isinstance(image_config, Mapping):
        raise _bad_config("document", "is not a JSON object", option=False)
    cfg = image_config.get("config")
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise _bad_config("`config` member", "is not a JSON object", option=False)
    out = dict(cfg)
    overridden = {"Entrypoint": opts.entrypoint is not None, "Cmd": bool(opts.command),
                  "User": opts.user is not None, "WorkingDir": bool(opts.workdir)}
    for key in ("Entrypoint", "Cmd", "Env", "User", "WorkingDir"):
        v = cfg.get(key)
        if overridden.get(key) or v is None:
            out.pop(key, None)
            continue
        if key in ("User", "WorkingDir"):
            if not isinstance(v, str):
                raise _bad_config(key, "is not a string")
            items = [v]
        else:
            items = [v] if isinstance(v, str) else v
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise _bad_config(key, "is not a list of strings")
            out[key] = items
        if any("\0" in x for x in items):
            raise _bad_config(key, "contains a NUL character")
    wd = out.get("WorkingDir")
    if wd and (not wd.startswith("/") or len(wd.encode("utf-8", "surrogatepass")) >= 4096):
        raise _bad_config("WorkingDir", "is not an absolute path shorter than 4096 bytes")
    for e in out.get("Env") or []:
        if e.startswith("="):
            raise _bad_config("Env", f"has an entry without a name ({e[:40]!r})")
    labels = cfg.get("Labels")
    if labels is not None and not (isinstance(labels, Mapping)
                                   and all(isinstance(v, str) for v in labels.values())):
        raise _bad_config("Labels", "is not a map of strings", option=False)
    return out


def build_spec(root_path: str, bundle_dir: str, image_config: Mapping | None, opts: RunOptions,
               container_id: str, *, image_root: str | None = None, cache_dir: str | None = None,
               netns_path: str | None = None) -> dict:
    """config.json for a container of the image (config `image_config`, tree at `image_root`, default
    `root_path`) rooted read-only at `root_path`."""
    cfg = image_run_config(image_config, opts)
    image_root = image_root or root_path
    entry = list(opts.entrypoint) if opts.entrypoint is not None else list(cfg.get("Entrypoint") or [])
    cmd = list(opts.command) if opts.command else list(cfg.get("Cmd") or [])
    if opts.entrypoint is not None and not opts.command:
        cmd = []
    args = entry + cmd
    if not args:
        raise RunSpecError("no command: the image sets neither Entrypoint nor Cmd; give one after `--`")
    check_user_db(image_root)
    user = resolve_user(image_root, opts.user if opts.user is not None else cfg.get("User"))
    hostname = opts.hostname or container_id[:12]
    conf = confinement(cache_dir)
    caps = conf["caps"]
    cwd = opts.workdir or cfg.get("WorkingDir") or "/"
    process: dict = {
        "terminal": bool(opts.terminal),
        "user": {"uid": user.uid, "gid": user.gid},
        "args": args,
        "env": _merge_env(cfg.get("Env") or [], opts.env, user, opts.terminal, hostname),
        "cwd": cwd,
        "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
        "rlimits": [_nofile_limit()],
        "noNewPrivileges": True,
    }
    if user.additional_gids:
        process["user"]["additionalGids"] = list(user.additional_gids)
    mounts = standard_mounts(bundle_dir)
    for t in opts.tmpfs:
        mounts.append({"destination": os.path.normpath(t), "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=1777"]})
    for v in opts.volumes:
        mounts.append({"destination": v.container, "type": "bind", "source": v.host,
                       "options": ["rbind", "rprivate", "ro" if v.readonly else "rw"]})
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    sysctl: dict[str, str] = {}
    if opts.net != "host":
        namespaces.append({"type": "network", "path": netns_path} if netns_path else {"type": "network"})
        sysctl.update(conf["sysctls"])   # per-namespace settings: not for the host's namespace
    annotations = {str(k): str(v) for k, v in (cfg.get("Labels") or {}).items()}
    annotations.update({str(k): str(v) for k, v in opts.annotations.items()})
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": root_path, "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "annotations": annotations,
        "linux": {
            "namespaces": namespaces,
            "sysctl": sysctl,
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": conf["seccomp"],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }


def etc_files(hostname: str, net: str) -> dict[str, bytes]:
    """Content of /etc/hostname, /etc/hosts and /etc/resolv.conf for the container."""
    hosts = f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    if net == "host":
        try:
            with open("/etc/resolv.conf", "rb") as f:
                resolv = f.read(1 << 16)
        except OSError:
            resolv = b""
    else:
        resolv = b"# no network outside this container (flatmount --net " + net.encode() + b")\n"
    return {"hostname": (hostname + "\n").encode(), "hosts": hosts.encode(), "resolv.conf": resolv}
