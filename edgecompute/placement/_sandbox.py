"""The ``sandbox`` placement: a worker process started inside bubblewrap (``bwrap``).

The worker is the ordinary one (``python -m edgecompute.placement._worker``); only its start
changes. bwrap gives it its own user, pid, ipc, uts, cgroup and mount namespaces (and network,
unless the operator allows it), a file system made of read-only binds of what it needs (``/usr``,
its interpreter and venv, the roots the operator names), a private ``/tmp``, a ``/proc`` of its
own pid namespace, no capabilities, and kills it when the host dies. The kernel caps its memory
(a cgroup v1 memory controller where we may make groups, else ``RLIMIT_AS``) and its CPU (cgroup
v1 ``cpu`` quota, where writable).

What still crosses: the socket to the host and the worker's lifeline (inherited descriptors, which
need no path). Shared memory has no name (memfds passed over the socket), so the sandbox binds no
folder of ``/dev/shm``; the host maps the worker's segments read-only and none larger than the
memory cap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import PluginError

if TYPE_CHECKING:
    from . import Placement

__all__ = ["Sandbox", "memory_cap_kind", "unavailable"]

_CGROUP_V1 = "/sys/fs/cgroup"
#: Files of /etc the interpreter and the C/C++ toolchain read; /etc itself stays hidden (passwd,
#: shadow, the host's keys and configuration).
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "mime.types")
#: ... and, only when the operator gives the sandbox a network, what name resolution and TLS read.
_ETC_NETWORK = ("resolv.conf", "hosts", "nsswitch.conf", "gai.conf", "host.conf", "ssl", "ca-certificates",
                "ca-certificates.conf")
_PROBE = ("import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
          "sys.base_exec_prefix, sys.executable, *sys.path]))")


def _bwrap() -> str | None:
    return shutil.which("bwrap")


def _system_binds() -> list[str]:
    """``/usr`` and the top-level links into it (merged /usr) or the folders themselves."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why no sandbox can start on this machine (no bwrap, or no namespaces), or None."""
    bwrap = _bwrap()
    if bwrap is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    try:
        done = subprocess.run(
            [bwrap, "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", *_system_binds(),
             "--proc", "/proc", "--dev", "/dev", "--", "/bin/true"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not run: {exc}"
    if done.returncode != 0:
        return f"bwrap cannot create namespaces here: {done.stderr.strip() or f'exit code {done.returncode}'}"
    return None


@functools.lru_cache(maxsize=16)
def _python_roots(python: str) -> tuple[str, ...]:
    """What ``python`` needs to see: its prefixes, its executable's folder and its ``sys.path``
    (editable installs add source folders there), asked of the interpreter itself once."""
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, cwd="/")
        found = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise PluginError("sandbox placement", f"cannot ask {python!r} where it lives: {exc}") from exc
    paths = [os.path.dirname(os.path.realpath(python)), os.path.dirname(os.path.abspath(python)), *found]
    return tuple(p for p in paths if isinstance(p, str) and p and p != "/")


def _own_cgroup(controller: str) -> str | None:
    """The folder of this process's cgroup v1 ``controller`` when we may make groups in it."""
    try:
        with open("/proc/self/cgroup") as lines:
            for line in lines:
                _, names, path = line.rstrip("\n").split(":", 2)
                if controller in names.split(","):
                    folder = os.path.join(_CGROUP_V1, controller, path.lstrip("/"))
                    return folder if os.access(folder, os.W_OK) else None
    except (OSError, ValueError):
        pass
    return None


def memory_cap_kind() -> str:
    """How a sandbox's memory is capped here: ``"cgroup"`` (v1 memory controller) or ``"rlimit"``."""
    return "cgroup" if _own_cgroup("memory") is not None else "rlimit"


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _write(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


class Sandbox:
    """One sandboxed worker's surroundings: its cgroups, its command.

    Made just before the worker starts; :meth:`cleanup` (after the worker is reaped) removes what
    it made.
    """

    def __init__(self, name: str, placement: Placement, python: str, tag: str) -> None:
        reason = unavailable()
        if reason is not None:
            raise PluginError(f"placement of {name!r}", f"placement 'sandbox' cannot start: {reason}")
        self.name = name
        self.placement = placement
        self.python = python
        self.memory_bytes = placement.sandbox_memory_mb << 20
        self.cgroups: list[str] = []
        self.memory_cgroup: str | None = None
        self.memory_cap = "none"
        self.oom_killed = False
        self.cpu_cap = "none"
        try:
            self._make_cgroups(tag)
        except BaseException:
            self.cleanup()
            raise

    def _make_cgroups(self, tag: str) -> None:
        memory = _own_cgroup("memory")
        if memory is not None:
            folder = os.path.join(memory, f"edgecompute-{tag}")
            os.mkdir(folder)
            self.cgroups.append(folder)
            _write(os.path.join(folder, "memory.limit_in_bytes"), str(self.memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: the limit above is all there is
                _write(os.path.join(folder, "memory.memsw.limit_in_bytes"), str(self.memory_bytes))
            self.memory_cgroup = folder
            self.memory_cap = f"cgroup v1 memory controller, {self.placement.sandbox_memory_mb} MB"
        else:
            self.memory_cap = f"RLIMIT_AS {self.placement.sandbox_memory_mb} MB"
        cpus = self.placement.sandbox_cpus
        if cpus is not None:
            cpu = _own_cgroup("cpu")
            if cpu is not None:
                folder = os.path.join(cpu, f"edgecompute-{tag}")
                os.mkdir(folder)
                self.cgroups.append(folder)
                period = 100_000
                _write(os.path.join(folder, "cpu.cfs_period_us"), str(period))
                _write(os.path.join(folder, "cpu.cfs_quota_us"), str(max(1000, int(cpus * period))))
                self.cpu_cap = f"cgroup v1 cpu quota, {cpus:g} CPU"
            else:
                self.cpu_cap = "none (no writable cgroup v1 cpu controller)"

    def command(self, argv: Sequence[str]) -> list[str]:
        """The command line that starts ``argv`` (the worker) in this sandbox."""
        bwrap = _bwrap()
        assert bwrap is not None
        placement = self.placement
        args = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--hostname", "edgecompute-sandbox"]
        if not placement.sandbox_network:
            args.append("--unshare-net")
        args += _system_binds()
        bound: list[str] = ["/usr"]
        etc = _ETC + (_ETC_NETWORK if placement.sandbox_network else ())
        for entry in etc:
            path = os.path.join("/etc", entry)
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
        # parents first, so a root inside another one is not bound twice
        roots = sorted({os.path.abspath(p) for p in (*_python_roots(self.python), *placement.sandbox_roots)},
                       key=len)
        for root in roots:
            if not _under(root, bound) and os.path.exists(root):
                args += ["--ro-bind", root, root]
                bound.append(root)
        for path in placement.sandbox_writable:
            path = os.path.abspath(path)
            args += ["--bind", path, path]
            bound.append(path)
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        # `-m` puts the working folder first on sys.path: keep the host's when it is visible inside
        # (an app's modules, pickled by reference, import from there), else the private /tmp
        cwd = os.getcwd()
        args += ["--chdir", cwd if _under(cwd, bound) else "/tmp", "--clearenv"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # its folders are on the probed sys.path
        env.update(placement.sandbox_env)
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += ["--", *argv]
        if self.memory_cgroup is None:
            prlimit = shutil.which("prlimit")
            if prlimit is None:
                raise PluginError(f"placement of {self.name!r}", "no writable cgroup v1 memory controller and no "
                                                                 "prlimit (util-linux) to cap the sandbox's memory")
            args = [prlimit, f"--as={self.memory_bytes}", "--", *args]
        # the groups must hold the sandbox from its first instruction: a tiny shell joins them,
        # then becomes bwrap
        if self.cgroups:
            joins = " && ".join(f'echo $$ > "${index + 1}/cgroup.procs"' for index in range(len(self.cgroups)))
            args = ["/bin/sh", "-c", f'{joins} && shift {len(self.cgroups)} && exec "$@"', "sh",
                    *self.cgroups, *args]
        return args

    def memory_killed(self) -> bool:
        """Whether the kernel's OOM killer has killed something in this sandbox's memory cgroup
        (read before :meth:`cleanup` removes the group, and remembered)."""
        if self.oom_killed or self.memory_cgroup is None:
            return self.oom_killed
        try:
            with open(os.path.join(self.memory_cgroup, "memory.oom_control")) as lines:
                for line in lines:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        self.oom_killed = int(value) > 0
                        return self.oom_killed
        except (OSError, ValueError):
            pass
        return False

    def describe(self) -> dict[str, object]:
        return {"memory_cap": self.memory_cap, "cpu_cap": self.cpu_cap, "network": self.placement.sandbox_network}

    def cleanup(self) -> None:
        """Kill whatever is left in the cgroups and remove them."""
        self.memory_killed()
        for folder in reversed(self.cgroups):
            for _ in range(100):
                try:
                    with open(os.path.join(folder, "cgroup.procs")) as lines:
                        pids = [int(line) for line in lines if line.strip()]
                except (OSError, ValueError):
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: the killed are not gone yet
                    time.sleep(0.01)
        self.cgroups.clear()
        self.memory_cgroup = None

