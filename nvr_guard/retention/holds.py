"""Legal holds: footage kept past its rule because someone must be able to see it later.

A manual hold is placed and released by an admin or security lead with a reason; a request's hold
comes and goes with its request (``workflow``). This module is the adapter between the commands
and the catalog's holds: it resolves which site's camera a hold protects (a camera id is unique
only within a site), records each hold and release in the same commit as its audit entry, shows
a request's hold only to those who may see the request, and refuses a config that would leave an
active hold protecting nothing. The policy reads the holds from the catalog; nothing here deletes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from nvr_guard.config import Config
from nvr_guard.context import Context, site_roots
from nvr_guard.errors import InvalidInput, PolicyRefused
from nvr_guard.identity import Caller
from nvr_guard.model import Hold, show_path
from nvr_guard.times import iso, parse_time

# roles that may place and release manual legal holds
HOLD_ROLES = frozenset({"admin", "security_lead"})

# (caller, request id or None) -> may the caller see that request (the rule of `request show`)
# which of these requests (None: a hold naming none) the caller may see, asked once per view
MayView = Callable[[Caller, list[int | None]], set[int | None]]


def hold_problems(config: Config, holds: Iterable[Hold]) -> list[tuple[str, int, str]]:
    """(file, line, message) for each active hold that ``config`` would leave protecting no
    footage: its site is gone and none of the roots it was placed on is a root any more.

    Such a config is refused (reload, ``config check``): a hold that still shows as active while
    its footage is deleted is worse than no hold at all."""
    roots = {r for rs in site_roots(config).values() for r in rs}
    line = config.line_of(("sites",))
    out = []
    for h in holds:
        if h.site is None or h.site in config.sites or roots.intersection(h.roots):
            continue
        release = (
            f"release it first (`nvr-guard hold release {h.id} --reason ...`)"
            if h.kind == "manual"
            else f"close its {h.kind} first"
        )
        where = ", ".join(os.fsdecode(r) for r in h.roots) or "unknown roots"
        out.append(
            (
                str(config.source_path),
                line,
                f"sites: hold {h.id} ({h.kind}: {h.reason}) protects camera "
                f"{h.camera or '*'} of site {h.site} ({where}), which this config no longer "
                f"has; keep the site or one of those roots, or {release}",
            )
        )
    return out


class Holds:
    """Manual holds and the holds views, on the instance's context. ``may_view`` is the
    workflow's rule for who sees a request (given by the engine: retention does not import the
    workflow)."""

    def __init__(self, ctx: Context, may_view: MayView) -> None:
        self.ctx = ctx
        self.may_view = may_view

    def hold_problems(self, config: Config) -> list[tuple[str, int, str]]:
        """What ``config`` would do to the active holds (see :func:`hold_problems`)."""
        with self.ctx.lock:
            # holds placed since the last fill (the workflow's) learn the roots of their site
            # under the config in force, before it is compared with the new one
            self.ctx.catalog.fill_hold_roots(site_roots(self.ctx.config))
            return hold_problems(config, self.ctx.catalog.active_holds(self.ctx.now()))

    def resolve_camera(self, camera: str, site: str | None = None) -> tuple[str, str]:
        """(site, camera) of ``--camera C [--site S]`` or ``--camera S/C``.

        A camera id is only unique within a site: two sites may both have a ``ch01``. An id
        found at more than one site is refused with the sites named, never given to the first
        one in alphabetical order (the hold would protect the wrong footage)."""
        if "/" in camera:
            own_site, _, camera = camera.partition("/")
            if site is not None and site != own_site:
                raise InvalidInput(
                    f"--camera {own_site + '/' + camera!r} and --site {site!r} disagree"
                )
            site = own_site
        sites = sorted(self.ctx.config.sites)
        if site is not None:
            if site not in self.ctx.config.sites:
                raise InvalidInput(f"unknown site {site!r}; sites: {', '.join(sites)}")
            if (
                not self.ctx.catalog.has_camera(site, camera)
                and camera not in self.ctx.config.cameras
            ):
                raise InvalidInput(
                    f"unknown camera {camera!r} at site {site}: it has no footage there in the "
                    "catalog and is not in `cameras:`"
                )
            return site, camera
        found = [s for s in sites if self.ctx.catalog.has_camera(s, camera)]
        if len(found) == 1:
            return found[0], camera
        if len(found) > 1:
            raise InvalidInput(
                f"camera {camera!r} is at sites {', '.join(found)}; say which with --site SITE "
                f"(or --camera SITE/{camera})"
            )
        if camera not in self.ctx.config.cameras:
            raise InvalidInput(
                f"unknown camera {camera!r}: it has no footage in the catalog"
                " and is not in `cameras:`"
            )
        if len(sites) == 1:
            return sites[0], camera
        raise InvalidInput(
            f"camera {camera!r} has no footage yet and sites {', '.join(sites)} are configured; "
            f"say which with --site SITE (or --camera SITE/{camera})"
        )

    def hold_add(
        self,
        caller: Caller,
        camera: str,
        start: str,
        end: str,
        reason: str,
        until: str | None = None,
        site: str | None = None,
        request_id: int | None = None,
    ) -> Hold:
        """Place a manual hold (admin or security lead), audited in the same commit;
        ``request_id``: the hold names that request (its exported package is kept too)."""
        self.ctx.require(caller, HOLD_ROLES, "place a hold")
        reason = reason.strip()
        if not reason or any(not c.isprintable() for c in reason):
            raise InvalidInput("--reason is required and must be printable text")
        site, camera = self.resolve_camera(camera, site)
        tz = self.ctx.config.site_tz(site) if site else self.ctx.config.tz
        wall = self.ctx.clock().wall
        t0 = parse_time(start, tz, "--from", now=wall)
        t1 = parse_time(end, tz, "--to", now=wall)
        if t0 >= t1:
            raise InvalidInput(f"--from {start} is not before --to {end}")
        t_until = parse_time(until, tz, "--until", now=wall) if until else None
        with self.ctx.lock:
            now = self.ctx.clock().wall
            if t_until is not None and t_until <= now:
                raise InvalidInput(f"--until {until} is already past")
            # the hold and its audit entry commit together: a kill -9 between two commits
            # would leave a hold nobody can account for
            with self.ctx.audit.transaction():
                hold = self.ctx.catalog.add_hold(
                    kind="manual",
                    site=site,
                    camera=camera,
                    start=t0,
                    end=t1,
                    until=t_until,
                    reason=reason,
                    owner=caller.user,
                    created=now,
                    roots=self.ctx.roots_of(site),
                    request_id=request_id,
                )
                self.ctx.audit.append_in(
                    caller.user,
                    "hold.add",
                    f"hold:{hold.id}",
                    {
                        "camera": camera,
                        "site": site,
                        "roots": [show_path(r) for r in hold.roots],
                        "from": iso(t0, tz),
                        "to": iso(t1, tz),
                        "until": iso(t_until, tz),
                        "reason": reason,
                        **({"request": request_id} if request_id is not None else {}),
                    },
                )
            return hold

    def hold_release(self, caller: Caller, hold_id: int, reason: str) -> Hold:
        """Release a manual hold with a reason; a request's hold ends only with its request."""
        self.ctx.require(caller, HOLD_ROLES, f"release hold {hold_id}")
        if not reason.strip():
            raise InvalidInput("--reason is required to release a hold")
        with self.ctx.lock:
            holds = {h.id: h for h in self.ctx.catalog.list_holds(include_released=True)}
            h = holds.get(hold_id)
            if h is None:
                raise InvalidInput(f"no hold {hold_id}; see `nvr-guard hold list`")
            if h.released is not None:
                raise InvalidInput(f"hold {hold_id} was already released")
            if h.kind != "manual":
                raise PolicyRefused(f"hold {hold_id} belongs to a {h.kind}; it ends with it")
            # one commit: a released hold (its footage deletable) always has its audit entry
            with self.ctx.audit.transaction():
                released = self.ctx.catalog.release_hold(
                    hold_id, caller.user, reason.strip(), now=self.ctx.clock().wall
                )
                self.ctx.audit.append_in(
                    caller.user, "hold.release", f"hold:{hold_id}", {"reason": reason.strip()}
                )
            return released

    def hold_json(self, hold_id: int) -> dict[str, Any]:
        """One hold (released or not) as ``hold list`` shows it."""
        return next(h for h in self.holds_json(include_released=True) if h["id"] == hold_id)

    def holds_json(self, include_released: bool = False) -> list[dict[str, Any]]:
        """Every active hold (or every hold) as ``hold list`` shows it, unfiltered."""
        tz = self.ctx.config.tz
        out = []
        for h in self.ctx.catalog.list_holds(include_released=include_released):
            out.append(
                {
                    "id": h.id,
                    "kind": h.kind,
                    "site": h.site,
                    "camera": h.camera,
                    "from": iso(h.start, tz),
                    "to": iso(h.end, tz),
                    "until": iso(h.until, tz),
                    "reason": h.reason,
                    "owner": h.owner,
                    "created": iso(h.created, tz),
                    "released": iso(h.released, tz),
                    "roots": [show_path(r) for r in h.roots],
                }
            )
        return out

    def holds_view(self, caller: Caller | None, include_released: bool = False) -> dict[str, Any]:
        """The holds as ``caller`` may see them (None: everything, for root acting locally).

        Manual holds are shown in full to every caller (admins and security leads place them,
        their reasons say why footage outlives its rule). A request's hold names the request, its
        reason, requester, camera and range: shown only to those who may see that request
        (``may_view``, the rule of ``request show``); the others learn only how many
        requests hold footage on a site (``holds_not_shown``)."""
        holds = self.holds_json(include_released)
        if caller is None:
            return {"holds": holds, "holds_not_shown": []}
        of_request = self.ctx.catalog.hold_requests()
        asked = list(dict.fromkeys(of_request[h["id"]] for h in holds if h["id"] in of_request))
        visible = self.may_view(caller, asked) if asked else set()
        return shown_holds(holds, of_request, visible)


def shown_holds(
    holds: list[dict[str, Any]],
    of_request: dict[int, int | None],
    visible: set[int | None] | None,
) -> dict[str, Any]:
    """``holds`` (``holds_json``) as ``holds_view`` shows them to someone who may see the
    requests ``visible`` (None: every request): the holds of the other requests are counted
    per site only. ``of_request``: hold id -> its request (``Catalog.hold_requests``)."""
    shown: list[dict[str, Any]] = []
    hidden: dict[str, set[int | None]] = {}
    for h in holds:
        if h["id"] in of_request and visible is not None:
            rid = of_request[h["id"]]
            if rid not in visible:
                hidden.setdefault(h["site"] or "*", set()).add(rid if rid else -h["id"])
                continue
        shown.append(h)
    return {
        "holds": shown,
        "holds_not_shown": [
            {"site": site, "requests": len(rids)} for site, rids in sorted(hidden.items())
        ],
    }
