"""Where an IPC channel lives, and whether that place can be trusted.

Whoever can enter the socket's directory can replace the socket (and then receive token
ids and hidden states) or connect to it, so both ends refuse a directory that is not a
real directory owned by this user with no group or other access. A directory another user
made first (``/tmp/lie-detector-<uid>`` with mode 0777, say) is refused, never repaired.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint; None for other transports."""
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def private_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot hold a channel socket, or None if it can."""
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return f"{directory} does not exist"
    except OSError as exc:
        return f"{directory} cannot be inspected: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{directory} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != os.geteuid():
        return (f"{directory} belongs to uid {st.st_uid}, not to this user (uid "
                f"{os.geteuid()}): another user could replace the socket")
    if st.st_mode & 0o077:
        return (f"{directory} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can "
                "enter it (it must be 0700)")
    return None


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` owner-only if it is missing; refuse it if it is not private."""
    if not directory.exists() and not directory.is_symlink():
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:  # made meanwhile, by us or by someone else: judged below
            pass
    problem = private_dir_problem(directory)
    if problem is not None:
        raise PermissionError(f"channel directory refused: {problem}")
