"""Running an approved export: claim it, build the package, commit it only with its authority.

An export is the one operation of the workflow that runs for minutes, outside the engine lock,
while the request it serves can be denied, cancelled, expire or be judged by a reloaded config. So
it is kept apart from the request bookkeeping (``workflow.requests``): a claim per request taken
under the lock before any ffmpeg starts, re-checks of the authority while it encodes (immediately
after a deny or cancel, every ``RECHECK_EVERY`` seconds otherwise), and a commit gate that checks
once more right before the package becomes visible and holds the lock until it is recorded. What
it needs of the requests is :class:`RequestAccess`; the signing key is re-checked at every export.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from nvr_guard.config import Config
from nvr_guard.context import Context
from nvr_guard.errors import NvrGuardError, PolicyRefused, RuntimeFailure
from nvr_guard.export import export_package
from nvr_guard.export.ffmpeg import stop_when
from nvr_guard.identity import Caller
from nvr_guard.store.requests import RequestStore
from nvr_guard.times import iso
from nvr_guard.workflow import access, protection
from nvr_guard.workflow.record import rules_record

log = logging.getLogger(__name__)

_Paths = list[Path]
_Current = tuple[access.Request, list[access.Approval], access.AccessRules]

# How often a running export re-checks its authority (expiry, a reload) between the immediate
# checks that a deny or cancel triggers.
RECHECK_EVERY = 0.5


@dataclass
class ExportClaim:
    """An export in flight. At most one per request, taken under the engine lock before any
    ffmpeg starts; the export commits only if its authority still holds at commit time."""

    rid: int
    caller: Caller
    target: str
    since: float
    dest: Any
    clips: list[tuple[str, list[Any]]]
    view: dict[str, Any]
    key: Any
    fingerprint: str
    head: tuple[int, str]
    stop: threading.Event = field(default_factory=threading.Event)
    why: str | None = None  # why it is being aborted
    committing: bool = False  # the engine lock is held from the commit check to the record
    last_check: float = 0.0
    seal: Any = None  # export.protect.Seal of a protected export, else None
    raised: str | None = None  # why the policy raised the request's encryption, if it did
    zones: dict[str, list[Any]] = field(default_factory=dict)  # privacy zones per camera
    # whether the person who runs it has gone (would never see the passphrase); None: unknown
    caller_gone: Callable[[], bool] | None = None


class _CommitGate:
    """The destination as the package builder sees it, with the authority check added to its
    commit hook: the builder calls ``before_commit`` right before the rename that makes the
    package visible, and on success the engine lock stays held until the request is recorded
    as exported, so no deny, cancel or reload can land between the check and the record."""

    def __init__(self, dest: Any, check: Callable[[], None]) -> None:
        self._dest = dest
        self._check = check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dest, name)

    def before_commit(self, tmp: Path) -> None:
        hook = getattr(self._dest, "before_commit", None)
        if hook is not None:
            hook(tmp)
        self._check()


class RequestAccess(Protocol):
    """What an export uses of the requests (``workflow.requests.Workflow``): the request as its
    caller may see it, brought up to date, and judged by the rules that apply to it."""

    ctx: Context
    store: RequestStore

    @property
    def config(self) -> Config: ...

    def now(self) -> float: ...

    def actor(self, caller: Caller) -> access.Actor: ...

    def request_json(
        self, r: access.Request, approvals: list[access.Approval] | None = None
    ) -> dict[str, Any]: ...

    def _visible(self, caller: Caller, rid: int) -> _Current: ...

    def _current(self, rid: int) -> _Current: ...

    def _load(self, rid: int) -> _Current: ...

    def _acting(self, r: access.Request, judged: access.AccessRules) -> access.AccessRules: ...

    def _refused(self, caller: Caller, what: str, decision: access.Decision) -> None: ...

    @property
    def copies(self) -> Any: ...


class ExportJobs:
    """The exports of one instance: at most one claim per request, one encode at a time."""

    def __init__(self, wf: RequestAccess, open_destination: Callable[[str, Any], Any]) -> None:
        """``open_destination(target, tz)`` opens the gate in front of an export (the media
        gate's ``destination``: a scanned target directory or an enrolled medium)."""
        self.wf = wf
        self.ctx = wf.ctx
        self.progress: dict[int, float] = {}
        self._export_lock = threading.Lock()
        self.claims: dict[int, ExportClaim] = {}  # under the engine lock
        # the seams of an export (tests put a fast stand-in here): the package builder, and the
        # gate that opens a destination
        self.exporter: Callable[..., Any] = export_package
        self.open_destination = open_destination

    def signing_key(self) -> tuple[Any, str]:
        """The key to sign this export with, checked again at every load: its file (opened
        without following a link: owner, mode) and every directory of its real path; and it
        must be the key whose fingerprint the daemon put on record at its start (status,
        `key show`, the paper records printed since). Anything else refuses the export (exit 3)
        and raises the signing_key attention."""
        from nvr_guard.attention import SIGNING_KEY
        from nvr_guard.export import load_or_create_key
        from nvr_guard.export.keys import key_location_problem

        key_path = Path(self.wf.config.signing_key_path())
        started_with = self.ctx.key_fingerprint

        def refuse(why: str) -> NoReturn:
            self.ctx.attention.raise_(
                SIGNING_KEY, None, str(key_path), f"export signing key unusable: {why}"
            )
            raise PolicyRefused(f"export refused: the export signing key {why}")

        why = key_location_problem(key_path, {0, os.geteuid()})
        if why is not None:
            refuse(why)
        existed = key_path.exists()
        try:
            key, fp = load_or_create_key(Path(self.wf.config.state_dir), key_path)
        except RuntimeFailure as e:
            refuse(str(e).removeprefix("export signing key "))
        if started_with is not None and fp != started_with:
            refuse(
                f"{key_path} is now {fp}, not {started_with} that the daemon started with and "
                "put on record: someone replaced it; investigate, then restart the daemon to "
                "take a new key deliberately"
            )
        if not existed or not any(
            True for _ in self.ctx.audit.entries(action="export.key", obj=fp)
        ):
            self.ctx.audit.append(
                "nvr-guard", "export.key", fp, {"path": str(key_path), "created": not existed}
            )
        return key, fp

    def _export_check(
        self, rid: int, caller: Caller, claim: ExportClaim | None = None
    ) -> access.Decision:
        """May ``caller`` export request ``rid`` now? Under the engine lock. With the export's
        ``claim``: also, does it still meet the protection policy in force (``protection``)?"""
        r, approvals, rules = self.wf._current(rid)
        acting = self.wf._acting(r, rules)
        d = access.check_export(r, approvals, self.wf.actor(caller), acting, self.wf.now())
        if d.allowed and claim is not None:
            d = protection.still_protected(
                self.wf.config, r, approvals, claim.seal is not None, claim.zones
            )
        return d

    def export(
        self,
        caller: Caller,
        rid: int,
        target: str,
        progress: Callable[[float], None] | None = None,
        caller_gone: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Export request ``rid`` onto ``target``: claim, build, commit (see :meth:`export_begin`
        and :meth:`export_finish`)."""
        claim = self.export_begin(caller, rid, target)
        claim.caller_gone = caller_gone
        return self.export_finish(claim, progress)

    def export_begin(self, caller: Caller, rid: int, target: str) -> ExportClaim:
        """Check ``caller`` may export ``rid`` onto ``target`` and claim the request's export,
        in one step under the engine lock: a second export of the same request is refused (exit
        3) until this one has committed or failed."""
        with self.ctx.recording():
            r, approvals, rules = self.wf._visible(caller, rid)
            busy = self.claims.get(rid)
            if busy is not None:
                self.wf._refused(
                    caller,
                    f"request:{rid}",
                    access.Decision(
                        False,
                        f"request {rid} is being exported by {busy.caller.user} onto "
                        f"{busy.target} (since {iso(busy.since, rules.tz)}); one export per "
                        "request — wait for it to finish",
                        3,
                    ),
                )
            d = self._export_check(rid, caller)
            if not d.allowed:
                self.wf._refused(caller, f"request:{rid}", d)
            seal, raised, refusal = protection.seal_at_export(self.wf.config, r, self.wf.now())
            if refusal is None:
                refusal = protection.native_refusal(self.wf.config, r.format, r.cameras)
            if refusal is not None:
                self.wf._refused(caller, f"request:{rid}", refusal)
            try:
                dest = self.open_destination(target, self.wf.config.site_tz(r.site))
            except NvrGuardError as e:
                self.ctx.audit.append(
                    caller.user,
                    "export.refused",
                    f"request:{rid}",
                    {"target": target, "reason": str(e)},
                )
                raise
            try:
                from nvr_guard.export import SourceSegment

                clips = []
                for cam in r.cameras:
                    segs = self.ctx.catalog.segments_of(r.site, cam, r.start, r.end)
                    clips.append(
                        (cam, [SourceSegment(Path(os.fsdecode(s.path)), s.start) for s in segs])
                    )
                if not any(segs for _, segs in clips):
                    self.wf._refused(
                        caller,
                        f"request:{rid}",
                        access.Decision(
                            False, f"request {rid}: no footage left in its range to export", 3
                        ),
                    )
                view = self.wf.request_json(r, approvals)
                view["judged_by"] = rules_record(
                    self.wf._acting(r, rules), r, self.wf.now(), self.wf.config.digest
                )
                key, fp = self.signing_key()
                head = self.ctx.audit.head()
            except BaseException:
                close = getattr(dest, "close", None)
                if close is not None:
                    close()
                raise
            self.ctx.audit.append(
                caller.user,
                "export.begin",
                f"request:{rid}",
                {"target": str(dest.path), "fingerprint": fp},
            )
            claim = ExportClaim(
                rid=rid,
                caller=caller,
                target=target,
                since=self.wf.now(),
                dest=dest,
                clips=clips,
                view=view,
                key=key,
                fingerprint=fp,
                head=head,
                seal=seal,
                raised=raised,
                zones=protection.zones_for(self.wf.config, r, approvals),
            )
            self.claims[rid] = claim
            return claim

    def export_finish(
        self, claim: ExportClaim, progress: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        """Build the package outside the engine lock, then commit it only if the export's
        authority still holds; a deny, cancel, expiry or reload that takes it away stops ffmpeg
        and removes the partial package (``export.aborted``, exit 3)."""
        from nvr_guard.export import ExportJob
        from nvr_guard.export.fonts import resolve_font

        rid, caller = claim.rid, claim.caller
        view = claim.view
        r = self.wf.store.get(rid)
        job = ExportJob(
            request=view,
            approvals=view["approvals"],
            technician=caller.user,
            start=r.start,
            end=r.end,
            tz=self.wf.config.site_tz(r.site),
            watermark_template=self.wf.config.export.watermark,
            font=resolve_font(self.wf.config.export.font),
            crf=self.wf.config.export.crf,
            preset=self.wf.config.export.preset,
            timeout=float(self.wf.config.export.timeout.seconds),
            group=self.export_gid(),
            zones=claim.zones,
        )

        def on_progress(f: float) -> None:
            self.progress[rid] = f
            if progress is not None:
                progress(f)

        gate = _CommitGate(claim.dest, lambda: self._commit_check(claim))
        try:
            # one export at a time: two encodes on a 2-core recorder would starve the recording
            with self._export_lock, claim.dest:
                self.remove_stale_exports([Path(claim.dest.path)])
                sealing: dict[str, Any] = {}
                if claim.seal is not None:  # a protected export: built in staging, then sealed
                    from nvr_guard.export.protect import staging_dir

                    staging = staging_dir(Path(self.wf.config.state_dir))
                    sealing = {"seal": claim.seal, "staging": staging}
                with stop_when(lambda: self._stop_reason(claim)):
                    pkg = self.exporter(
                        claim.clips,
                        job,
                        gate,
                        claim.key,
                        audit_head=claim.head,
                        progress=on_progress,
                        **sealing,
                    )
        except BaseException as e:
            self._release(claim)
            self.progress.pop(rid, None)
            with self.ctx.lock:
                if self.claims.get(rid) is claim:
                    del self.claims[rid]
                if claim.why is not None:
                    self.ctx.audit.append(
                        caller.user,
                        "export.aborted",
                        f"request:{rid}",
                        {"reason": claim.why, "target": claim.target, "error": str(e)},
                    )
                    raise PolicyRefused(
                        f"export of request {rid} aborted: {claim.why}; "
                        f"nothing was left on {claim.target}"
                    ) from None
                self.ctx.audit.append(
                    caller.user,
                    "export.refused" if isinstance(e, PolicyRefused) else "export.failed",
                    f"request:{rid}",
                    {"error": str(e), "target": claim.target},
                )
            raise
        if not claim.committing:
            # The builder returned without calling the commit hook (a package writer that lost
            # it): check now, and take back what it wrote rather than let it stand unchecked.
            log.error("export of request %s: the package was committed without the check", rid)
            try:
                self._commit_check(claim)
            except PolicyRefused:
                shutil.rmtree(pkg.path, ignore_errors=True)
                self.progress.pop(rid, None)
                with self.ctx.lock:
                    if self.claims.get(rid) is claim:
                        del self.claims[rid]
                    self.ctx.audit.append(
                        caller.user,
                        "export.aborted",
                        f"request:{rid}",
                        {"reason": claim.why, "target": claim.target, "package": str(pkg.path)},
                    )
                raise PolicyRefused(
                    f"export of request {rid} aborted: {claim.why}; the package was removed"
                ) from None
        # the commit check passed and its lock is still held: record before anyone else acts
        try:
            with self.ctx.recording():  # the state change and its entry, together
                now = self.wf.now()
                r, _, rules = self.wf._load(rid)
                self.wf.store.update(
                    rid,
                    state="exported",
                    exported_at=now,
                    exporter=caller.user,
                    package=str(pkg.path),
                    judged_by=rules_record(
                        self.wf._acting(r, rules), r, now, self.wf.config.digest
                    ),
                    sealed=getattr(pkg, "sealed", None),
                )
                self.ctx.catalog.set_request_holds_until(
                    rid, now + float(self.wf.config.export.preserve.seconds)
                )
                shown = getattr(pkg, "manifest", None) or {}
                self.wf.copies.record(rid, dict(shown.get("destination") or {}), pkg.path, now)
                self.ctx.audit.append(
                    caller.user,
                    "export.done",
                    f"request:{rid}",
                    {
                        "package": str(pkg.path),
                        "files": pkg.sha256s,
                        "fingerprint": claim.fingerprint,
                        # holes and left-out damaged sources, as the manifest names them
                        **({"gaps": shown["gaps"]} if shown.get("gaps") else {}),
                        **(
                            {"damaged_sources": shown["damaged_sources"]}
                            if shown.get("damaged_sources")
                            else {}
                        ),
                        **self._protection_record(claim, pkg),
                    },
                )
                self.progress[rid] = 1.0
                starts = {
                    c["camera"]: c["native_start"]
                    for c in (getattr(pkg, "manifest", None) or {}).get("clips", [])
                    if c.get("native_start")
                }
                out = {
                    "id": rid,
                    "package": str(pkg.path),
                    "files": pkg.sha256s,
                    "fingerprint": claim.fingerprint,
                    "encrypt": claim.seal.mode if claim.seal is not None else "none",
                    **({"native_start": starts} if starts else {}),
                }
                sealed = getattr(pkg, "sealed", None)
                if sealed:
                    out["archive"] = str(pkg.path / sealed["file"])
                    out["archive_sha256"] = sealed["sha256"]
                    out["sealed"] = sealed
                    if claim.seal.passphrase is not None:
                        # shown this once to the technician; stored nowhere
                        out["passphrase"] = claim.seal.passphrase
                return out
        finally:
            if self.claims.get(rid) is claim:
                del self.claims[rid]
            self._release(claim)

    @staticmethod
    def _protection_record(claim: ExportClaim, pkg: Any) -> dict[str, Any]:
        """What ``export.done`` records of the export's protection (never the passphrase)."""
        out: dict[str, Any] = {}
        if claim.zones:
            out["privacy_zones"] = protection.zones_json(claim.zones)
        sealed = getattr(pkg, "sealed", None)
        if sealed:
            out["sealed"] = dict(sealed)
            if sealed["mode"] == "passphrase":
                out["sealed"]["passphrase"] = "shown once to the technician, not stored"
        if claim.raised:
            out["encrypt_raised"] = claim.raised
        return out

    def export_gid(self) -> int | None:
        """The gid of ``export.group``, who may read packages; None when the group does not
        exist (only the default can be missing: a named one is a config error), and the
        package keeps the daemon's group, readable by nobody else."""
        name = self.wf.config.export.group
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            log.warning(
                "export.group %s does not exist: the package is readable by the daemon's own "
                "group only; create the group (systemd-sysusers) and put technicians and "
                "auditors in it",
                name,
            )
            return None

    def _commit_check(self, claim: ExportClaim) -> None:
        """At the commit point: take the engine lock and keep it (until :meth:`export_finish`
        has recorded the export) if the export is still allowed; else abort."""
        self.ctx.lock.acquire()
        claim.committing = True
        try:
            d = self._export_check(claim.rid, claim.caller, claim)
        except BaseException:
            self._release(claim)
            raise
        # authority lost at any check during the export ends it, even if a later reload would
        # give it back: what ran without authority is not committed
        gone = self._passphrase_lost(claim)
        if gone is not None and d.allowed:
            d = access.Decision(False, gone, 3)
        if claim.stop.is_set() or not d.allowed:
            claim.why = claim.why if claim.stop.is_set() and claim.why else d.reason
            claim.stop.set()
            self._release(claim)
            raise PolicyRefused(claim.why)

    @staticmethod
    def _passphrase_lost(claim: ExportClaim) -> str | None:
        """Why a passphrase export must stop because nobody would see its passphrase: the
        technician's command has gone (Ctrl-C, a dropped connection); else None."""
        if claim.seal is None or claim.seal.passphrase is None or claim.caller_gone is None:
            return None
        if not claim.caller_gone():
            return None
        return (
            "the technician's command ended (Ctrl-C or a dropped connection) before the "
            "passphrase could be shown, and it is stored nowhere; run the export again"
        )

    def _release(self, claim: ExportClaim) -> None:
        if claim.committing:
            claim.committing = False
            self.ctx.lock.release()

    def recheck(self, rid: int) -> None:
        """Under the engine lock, after anything that may take an export's authority away."""
        claim = self.claims.get(rid)
        if claim is None or claim.committing or claim.stop.is_set():
            return
        d = self._export_check(rid, claim.caller, claim)
        if not d.allowed:
            claim.why = d.reason
            claim.stop.set()

    def _stop_reason(self, claim: ExportClaim) -> str | None:
        """Polled by the running ffmpeg: why it must stop, else None. Between the immediate
        checks after a deny or cancel, re-checks the authority every RECHECK_EVERY seconds (an
        approval expiring, a reload), never waiting for the engine lock."""
        if claim.stop.is_set():
            return claim.why or "the export was stopped"
        t = time.monotonic()
        if t - claim.last_check < RECHECK_EVERY:
            return None
        claim.last_check = t
        gone = self._passphrase_lost(claim)
        if gone is not None:
            claim.why = gone
            claim.stop.set()
            return gone
        if not self.ctx.lock.acquire(blocking=False):
            return None
        try:
            self.recheck(claim.rid)
        finally:
            self.ctx.lock.release()
        return claim.why if claim.stop.is_set() else None

    def _remove_stale_staging(self) -> _Paths:
        """Remove the unencrypted packages a protected export killed mid-way left in the
        staging directory (``export.protect``), and audit it."""
        from nvr_guard.export.protect import remove_stale_staging

        removed = remove_stale_staging(Path(self.wf.config.state_dir))
        for path in removed:
            log.warning("removed %s, the staging of an interrupted protected export", path)
            with self.ctx.recording():
                self.ctx.audit.append(
                    "nvr-guard", "export.stale_removed", "staging", {"path": str(path)}
                )
        return removed

    def remove_stale_exports(self, targets: _Paths | None = None) -> _Paths:
        """Remove the hidden ``.NVRG-*.tmp`` directories an export killed mid-way (kill -9,
        power loss) left at the top of ``targets`` (default: ``export.targets``), and audit it.

        Only one export runs at a time and none has begun when this is called (daemon start,
        or under the export lock), so every such directory is a leftover that nobody must
        mistake for evidence. A symlink of that name is not followed, only reported.
        """
        if targets is None:
            targets = [Path(t) for t in self.wf.config.export.targets]
        removed: _Paths = self._remove_stale_staging()
        for target in targets:
            try:
                names = os.listdir(target)
            except OSError as e:
                log.warning("export target %s: cannot list it: %s", target, e)
                continue
            for name in names:
                if not (name.startswith(".NVRG-") and name.endswith(".tmp")):
                    continue
                path = Path(target) / name
                try:
                    if not stat.S_ISDIR(os.lstat(path).st_mode):
                        log.warning("export target %s: %s is not a directory; left", target, name)
                        continue
                    shutil.rmtree(path)
                except OSError as e:
                    log.warning("cannot remove the interrupted export %s: %s", path, e)
                    continue
                removed.append(path)
                log.warning("removed %s, left by an interrupted export", path)
                with self.ctx.recording():
                    self.ctx.audit.append(
                        "nvr-guard", "export.stale_removed", f"target:{target}", {"path": str(path)}
                    )
        return removed
