"""Who acts: the one identity type of the project.

Every operation that needs a role is given a ``Caller``: the peer of a control-socket connection
(its uid as the kernel reported it) or the local user of a CLI command run without the daemon.
Roles are granted by user and group name in the config, so a caller carries its names.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """Who acts: from SO_PEERCRED through the control socket, or the local user."""

    uid: int
    user: str
    groups: tuple[str, ...] = ()

    @classmethod
    def local(cls) -> Caller:
        uid = os.getuid()
        return cls.from_uid(uid)

    @classmethod
    def from_uid(cls, uid: int, gid: int | None = None) -> Caller:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid, f"uid:{uid}", ())
        gids = os.getgrouplist(pw.pw_name, pw.pw_gid if gid is None else gid)
        names = []
        for g in gids:
            try:
                names.append(grp.getgrgid(g).gr_name)
            except KeyError:
                names.append(f"gid:{g}")
        return cls(uid, pw.pw_name, tuple(sorted(set(names))))
