"""Which handler source files changed since a fork server started (for SIGHUP reload).

Owns finding the source file of each preloaded module and of each configured handler's
module the way the import system would, without importing anything (no package
`__init__` runs here: the supervisor never runs user code), and their fingerprints: an
edit, a new file moved in place, or a copy that kept an old modification time (`cp -p`
still changes the inode-change time) all change one. `HandlerCode` remembers the
fingerprint taken just before the current fork server was launched. It never starts or
stops a fork server (that is the loop) and never reads a file's content.
"""

from __future__ import annotations

import os
from importlib.machinery import PathFinder

from supervisor.dbfile import process_start_time

Stamp = dict  # module name -> (path, mtime_ns, ctime_ns, size, inode), or None: no file
START_SLACK_S = 1.0  # a process start time is known to within the boot time's rounding


def module_names(config) -> list[str]:
    """The preloaded modules and the modules of configured handlers, in order, once."""
    names = list(config.supervisor.preload)
    names += [t.handler.split(":", 1)[0] for t in config.types.values() if t.handler]
    return list(dict.fromkeys(names))


def module_file(name: str) -> str | None:
    """The file `import name` would load, found on sys.path without importing anything;
    None for a module that is not found or has no file (builtin, namespace package)."""
    parts = name.split(".")
    search = None  # PathFinder: None means sys.path
    spec = None
    for depth in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[:depth + 1]), search)
        if spec is None:
            return None
        search = spec.submodule_search_locations
        if search is None and depth < len(parts) - 1:
            return None  # a module where a package was expected
    return spec.origin if spec is not None and spec.has_location else None


def stamp(config) -> Stamp:
    """The fingerprint of every handler module's file, now."""
    out: Stamp = {}
    for name in module_names(config):
        path = module_file(name)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        out[name] = None if st is None else (path, st.st_mtime_ns, st.st_ctime_ns,
                                             st.st_size, st.st_ino)
    return out


class HandlerCode:
    """The fingerprint the current fork server's code was loaded at (one per supervisor)."""

    def __init__(self) -> None:
        self.server_pid: int | None = None
        self.loaded: Stamp = {}

    def remember(self, server_pid: int | None, loaded: Stamp) -> None:
        """`loaded` was taken just before fork server `server_pid` was launched."""
        self.server_pid, self.loaded = server_pid, loaded

    def changed(self, now: Stamp, server_pid: int | None) -> list[str]:
        """Files (or module names, for a module whose file appeared or vanished) that
        differ from what fork server `server_pid` loaded. For a server launched without
        a fingerprint (restarted after a crash), files changed after its start time."""
        if server_pid is not None and server_pid == self.server_pid:
            return [(new or old)[0] if (new or old) else name
                    for name, new in now.items()
                    if new != (old := self.loaded.get(name, ()))]
        started = process_start_time(server_pid) if server_pid else None
        return [entry[0] for entry in now.values() if entry is not None and (
            started is None or max(entry[1], entry[2]) / 1e9 > started - START_SLACK_S)]
