"""Who acts: the one identity type of the project.

Every operation that needs a role is given a ``Caller``: the peer of a control-socket connection
(pid, uid and gid as the kernel reported them at connect(), never as the request claims) or the
local user of a CLI command run without the daemon. Roles are granted by user and group name in
the config, so a caller carries its names, looked up once.

Names: a uid without a passwd entry (a container's user, say) is called ``uid:N`` and has no
groups — roles by group need an account the config can name; a group without a name is left
out, as nothing can be granted to it by name.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass

_PEERCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}

# name lookups (passwd, group, possibly NSS over the network) for every connection made a flood
# fill the control socket's listen backlog: a uid's names are reused for a few seconds
_NAMES_TTL = 10.0
_NAMES: dict[tuple[int, int | None], tuple[float, str, frozenset[str]]] = {}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who acts: from SO_PEERCRED through the control socket, or the local user."""

    uid: int
    user: str  # the passwd name, or ``uid:N`` when the uid has none
    groups: frozenset[str] = frozenset()  # names of the user's groups, primary included
    pid: int | None = None  # the peer process (None: not known, e.g. made in-process)
    gid: int | None = None  # the peer's gid at connect()
    # acting through a gateway (the web console): its name, the person's client address and
    # the session's id (a digest of the token, never the token)
    via: str | None = None
    client: str | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        # callers made by hand may pass any collection of names: one type inside
        object.__setattr__(self, "groups", frozenset(self.groups))

    @property
    def name(self) -> str:
        """The name in messages and audit entries (the same as ``user``)."""
        return self.user

    def describe(self) -> str:
        """``alice (uid 1000, pid 4242)``, for log lines (``via web from ADDR`` when so)."""
        if self.via is not None:
            return f"{self.name} (uid {self.uid}, via {self.via} from {self.client})"
        return f"{self.name} (uid {self.uid}, pid {self.pid})"

    @classmethod
    def local(cls) -> Caller:
        """The user running this process."""
        user, groups = _names(os.getuid(), None)
        return cls(os.getuid(), user, groups, pid=os.getpid(), gid=os.getgid())

    @classmethod
    def from_uid(cls, uid: int, gid: int | None = None) -> Caller:
        """The account ``uid``; its groups from ``gid`` (default: its passwd primary group)."""
        user, groups = _names(uid, gid)
        return cls(uid, user, groups, gid=gid)

    @classmethod
    def acting_for(cls, user: str, via: str, client: str, session: str) -> Caller:
        """The account named ``user`` acting through gateway ``via`` (its groups looked up now).

        Raises KeyError when there is no such account (any more)."""
        pw = pwd.getpwnam(user)
        name, groups = _names(pw.pw_uid, pw.pw_gid)
        return cls(pw.pw_uid, name, groups, gid=pw.pw_gid, via=via, client=client, session=session)

    @classmethod
    def from_ids(cls, pid: int, uid: int, gid: int) -> Caller:
        """The peer ``pid``/``uid``/``gid``, its names cached for a few seconds per (uid, gid)."""
        now = time.monotonic()
        hit = _NAMES.get((uid, gid))
        if hit is not None and now - hit[0] < _NAMES_TTL:
            return cls(uid, hit[1], hit[2], pid=pid, gid=gid)
        user, groups = _names(uid, gid)
        if len(_NAMES) > 4096:
            _NAMES.clear()
        _NAMES[(uid, gid)] = (now, user, groups)
        return cls(uid, user, groups, pid=pid, gid=gid)

    def refreshed(self) -> Caller:
        """The same peer with its names looked up now (and the cache renewed): roles are
        judged on the groups the user has at the moment of the command, so a revoked group
        stops working at once, not when a cached lookup expires."""
        user, groups = _names(self.uid, self.gid)
        if self.gid is not None:
            _NAMES[(self.uid, self.gid)] = (time.monotonic(), user, groups)
        return Caller(
            self.uid,
            user,
            groups,
            pid=self.pid,
            gid=self.gid,
            via=self.via,
            client=self.client,
            session=self.session,
        )

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Caller:
        """The peer of a connected Unix socket, as the kernel reports it (SO_PEERCRED)."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(raw)
        return cls.from_ids(pid, uid, gid)


def _names(uid: int, gid: int | None) -> tuple[str, frozenset[str]]:
    """The user name of ``uid`` and the names of its groups (with ``gid`` as the primary)."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return f"uid:{uid}", frozenset()
    primary = pw.pw_gid if gid is None else gid
    gids = {primary}
    with contextlib.suppress(OSError):
        gids.update(os.getgrouplist(pw.pw_name, primary))
    names: set[str] = set()
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue  # a gid without a name can be granted nothing by name
    return pw.pw_name, frozenset(names)
