"""Viewing without copying (调阅) and still previews for the people who decide a request.

A viewing request (``--format view``) is approved like any other, but its footage never leaves
the box: its requester asks the daemon to prepare a clip (``prepare``), transcoded in the
background into ``<state_dir>/views/`` (0700, the daemon's own) with the viewer's name, the
request and the time burned in, then asks for it (``open``) and receives an open read-only
descriptor of that file over the control socket — never a path, so no other process can read or
copy it by name. Every opening is on record (``view.start``). A clip exists only while the
request is approved and within the approval's validity: it is deleted, once, with a
``view.expired`` entry, when the validity ends (checked at each view command and at the daemon's
periodic request check) or the request is cancelled or denied.

Previews (``web.previews``) are three watermarked still frames per camera for a person who may
decide the request now, so an approver sees what they are asked to release (``preview.show``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvr_guard.context import Context
from nvr_guard.errors import InvalidInput, NvrGuardError, PolicyRefused, RuntimeFailure
from nvr_guard.export import SourceSegment
from nvr_guard.export.ffmpeg import stop_when
from nvr_guard.export.fonts import resolve_font
from nvr_guard.export.view import encode_view, plan_view, preview_watermark, stills, view_watermark
from nvr_guard.identity import Caller
from nvr_guard.times import iso
from nvr_guard.workflow import access
from nvr_guard.workflow.export_job import RequestAccess
from nvr_guard.workflow.protection import zones_for, zones_json

log = logging.getLogger(__name__)

VIEWS_DIR = "views"
# Clips being prepared at once, all requests and viewers together: each waits its turn for the
# one encoder (two encodes on a 2-core recorder would starve the recording), and a flood of
# prepare calls is refused rather than queued without end.
MAX_PREPARING = 4
MAX_PREVIEW_CAMERAS = 4  # previews of the first cameras only: each costs three ffmpeg runs
RECHECK_EVERY = 0.5  # seconds between authority checks while a clip encodes
_CLIP = re.compile(r"^([0-9]+)-([0-9a-f]{16})(?:-[0-9a-f]{12})?\.mp4$")
_PART = re.compile(r"^\.([0-9]+)-([0-9a-f]{16})(?:-[0-9a-f]{12})?\.mp4\.part$")


def _viewer_part(rid: int, viewer: str) -> str:
    return f"{rid}-{hashlib.sha256(viewer.encode()).hexdigest()[:16]}"


def clip_name(rid: int, viewer: str, zones: Mapping[str, Sequence[Any]] | None = None) -> str:
    """The clip's file name: the request, a digest of the viewer (no name in a path) and one
    of the privacy zones it was made with: zones changed since make it another clip."""
    shown = json.dumps(zones_json(zones or {}), sort_keys=True)
    return f"{_viewer_part(rid, viewer)}-{hashlib.sha256(shown.encode()).hexdigest()[:12]}.mp4"


#: a seek within this long of a recorded start continues that viewing (no new entry)
CONTINUE_WINDOW = 4 * 3600.0


@dataclass
class ViewJob:
    """One clip of one request for one viewer: preparing, ready, or failed."""

    rid: int
    caller: Caller
    name: str
    state: str = "preparing"
    progress: float = 0.0
    message: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    why: str | None = None
    last_check: float = 0.0
    last_start: float | None = None  # monotonic time of the last view.start recorded

    def status(self) -> dict[str, Any]:
        """The job as ``view.prepare`` reports it."""
        return {"state": self.state, "progress": round(self.progress, 3), "message": self.message}


class Viewings:
    """The viewing clips and previews of one instance."""

    def __init__(self, wf: RequestAccess) -> None:
        self.wf = wf
        self.ctx: Context = wf.ctx
        self._jobs: dict[tuple[int, str], ViewJob] = {}  # under ctx.lock
        self._encoder = threading.Lock()  # one encode at a time
        self._previewer = threading.Semaphore(1)

    # ---- the directory -------------------------------------------------------------------------
    def directory(self) -> Path:
        """``<state_dir>/views``: created 0700 when missing; refused unless it is a real
        directory of the daemon's own, closed to everyone else."""
        d = Path(self.ctx.config.state_dir) / VIEWS_DIR
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise RuntimeFailure(
                f"{d} is not a directory of the daemon's own; remove it so the daemon can create it"
            )
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(d, 0o700)
        return d

    # ---- who may look --------------------------------------------------------------------------
    def _watchable(
        self, caller: Caller, rid: int
    ) -> tuple[access.Request, list[access.Approval], access.AccessRules]:
        """Request ``rid`` if ``caller`` may watch it now; else refused (exit 3) and audited."""
        r, approvals, rules = self.wf._visible(caller, rid)
        d = access.check_watch(
            r, approvals, self.wf.actor(caller), self.wf._acting(r, rules), self.wf.now()
        )
        if not d.allowed:
            self.wf._refused(caller, f"request:{rid}", d)
        return r, approvals, rules

    def _job(self, rid: int, caller: Caller, zones: Mapping[str, Sequence[Any]]) -> ViewJob | None:
        """The clip job of ``rid`` for ``caller`` with the privacy ``zones`` in force; a ready
        clip left by an earlier daemon is taken up again (its validity was checked by the
        caller). A clip or an encode made with other zones (a reload changed them) is dropped:
        it is prepared again with these."""
        key = (rid, caller.user)
        name = clip_name(rid, caller.user, zones)
        job = self._jobs.get(key)
        if job is not None and job.name != name:
            job.why = "the privacy zones changed since the clip was prepared"
            job.stop.set()
            del self._jobs[key]
            job = None
        views = self.directory()
        if job is None:
            # a clip of this viewer made with other zones (before a reload, or by an earlier
            # daemon) goes; once a job stands, its own is the only one there
            prefix = _viewer_part(rid, caller.user)
            for other in os.listdir(views):
                if other != name and other.startswith(prefix) and _CLIP.match(other):
                    (views / other).unlink(missing_ok=True)
                    self.ctx.audit.append(
                        "nvr-guard",
                        "view.expired",
                        f"request:{rid}",
                        {
                            "clip": other,
                            "viewer": caller.user,
                            "reason": "made with other privacy zones than those in force",
                        },
                    )
        path = views / name
        if job is not None and job.state == "ready" and not path.is_file():
            del self._jobs[key]  # removed behind the daemon's back: prepare it again
            job = None
        if job is None and path.is_file():
            job = self._jobs[key] = ViewJob(rid, caller, path.name, "ready", 1.0)
        return job

    # ---- prepare -------------------------------------------------------------------------------
    def prepare(self, caller: Caller, rid: int) -> dict[str, Any]:
        """Start (or report) the transcode of request ``rid``'s clip for ``caller``."""
        self.expire()
        with self.ctx.recording():
            r, approvals, _ = self._watchable(caller, rid)
            zones = zones_for(self.wf.config, r, approvals)
            job = self._job(rid, caller, zones)
            if job is not None and job.state in ("preparing", "ready"):
                return job.status()
            if job is not None:  # failed: said once, and the next call tries again
                del self._jobs[(rid, caller.user)]
                return job.status()
            busy = sum(1 for j in self._jobs.values() if j.state == "preparing")
            if busy >= MAX_PREPARING:
                raise RuntimeFailure(
                    f"{busy} viewing clips are being prepared; try again in a minute"
                )
            clips = []
            for cam in r.cameras:
                segs = self.ctx.catalog.segments_of(r.site, cam, r.start, r.end)
                clips.append(
                    (cam, [SourceSegment(Path(os.fsdecode(s.path)), s.start) for s in segs])
                )
            job = ViewJob(rid, caller, clip_name(rid, caller.user, zones))
            self._jobs[(rid, caller.user)] = job
            tz = self.wf.config.site_tz(r.site)
            threading.Thread(
                target=self._encode,
                args=(job, clips, r.start, r.end, tz, zones),
                name=f"view-{rid}",
                daemon=True,
            ).start()
            return job.status()

    def _encode(
        self,
        job: ViewJob,
        clips: list[tuple[str, list[SourceSegment]]],
        t0: float,
        t1: float,
        tz: Any,
        zones: dict[str, list[Any]],
    ) -> None:
        """The worker: wait for the encoder, transcode into a hidden part file, then make it the
        clip only if the viewing is still allowed."""
        work: Path | None = None
        part: Path | None = None
        try:
            with self._encoder:
                if job.stop.is_set():
                    raise PolicyRefused(job.why or "viewing stopped")
                views = self.directory()
                part = views / f".{job.name}.part"
                part.unlink(missing_ok=True)
                vp = plan_view(clips, t0, t1)
                work = Path(tempfile.mkdtemp(prefix="nvrg-view-"))
                config = self.wf.config

                def on_progress(f: float) -> None:
                    job.progress = min(f, 0.99)

                with stop_when(lambda: self._stop_reason(job)):
                    encode_view(
                        vp,
                        work,
                        part,
                        watermark=view_watermark(job.rid, job.caller.user, self.wf.now(), tz),
                        tz=tz,
                        font=resolve_font(config.export.font),
                        timeout=float(config.export.timeout.seconds),
                        progress=on_progress,
                        zones=zones,
                    )
                os.chmod(part, 0o600)
                with self.ctx.lock:
                    if job.stop.is_set():
                        raise PolicyRefused(job.why or "viewing stopped")
                    os.rename(part, views / job.name)
                    part = None
                    job.progress, job.state, job.message = 1.0, "ready", ""
                log.info("viewing clip of request %s for %s is ready", job.rid, job.caller.user)
        except Exception as e:
            job.state = "failed"
            job.message = job.why if job.stop.is_set() and job.why else str(e)
            if job.stop.is_set():
                # stopped on purpose (cancel, deny, expiry): the reason, not a traceback
                log.info("viewing clip of request %s stopped: %s", job.rid, job.message)
            elif not isinstance(e, NvrGuardError):
                log.exception("preparing the viewing clip of request %s failed", job.rid)
            else:
                log.warning("viewing clip of request %s: %s", job.rid, job.message)
        finally:
            if part is not None:
                part.unlink(missing_ok=True)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def _stop_reason(self, job: ViewJob) -> str | None:
        """Polled by the running ffmpeg: why the clip must not be finished, else None. Checks the
        request every RECHECK_EVERY seconds without waiting for the engine lock."""
        if job.stop.is_set():
            return job.why or "viewing stopped"
        t = time.monotonic()
        if t - job.last_check < RECHECK_EVERY:
            return None
        job.last_check = t
        if not self.ctx.lock.acquire(blocking=False):
            return None
        try:
            r, approvals, rules = self.wf._current(job.rid)
            d = access.check_watch(
                r, approvals, self.wf.actor(job.caller), self.wf._acting(r, rules), self.wf.now()
            )
        finally:
            self.ctx.lock.release()
        if not d.allowed:
            job.why = d.reason
            job.stop.set()
            return d.reason
        return None

    # ---- open ----------------------------------------------------------------------------------
    def open(
        self, caller: Caller, rid: int, continued: bool = False
    ) -> tuple[dict[str, Any], int | None]:
        """The ready clip of request ``rid`` for ``caller``: its facts and an open read-only
        descriptor of it (the caller closes it), recorded as ``view.start``. While it is not
        ready: its state, and no descriptor.

        ``continued``: the player fetching the rest of a viewing it started (a seek, a byte
        range); no new entry when this viewer's start of this clip was recorded within
        ``CONTINUE_WINDOW`` — otherwise it is a start like any other."""
        self.expire()
        with self.ctx.recording():
            r, approvals, rules = self._watchable(caller, rid)
            job = self._job(rid, caller, zones_for(self.wf.config, r, approvals))
            if job is None:
                return {"state": "none", "progress": 0.0, "message": "prepare the clip first"}, None
            if job.state != "ready":
                return job.status(), None
            path = self.directory() / job.name
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise RuntimeFailure(f"{path} is not a clip of the daemon's own")
                tz = rules.tz
                until = access.valid_until(r, approvals, rules)
                now = time.monotonic()
                recent = job.last_start is not None and now - job.last_start < CONTINUE_WINDOW
                if not (continued and recent):
                    self.ctx.audit.append(
                        caller.user,
                        "view.start",
                        f"request:{rid}",
                        {
                            "range": {"from": iso(r.start, tz), "to": iso(r.end, tz)},
                            "cameras": list(r.cameras),
                            "size": st.st_size,
                        },
                    )
                    job.last_start = now
            except BaseException:
                os.close(fd)
                raise
            return {
                "state": "ready",
                "size": st.st_size,
                "content_type": "video/mp4",
                "expires": until,
                "request": self.wf.request_json(r, approvals),
            }, fd

    # ---- the end of a clip ---------------------------------------------------------------------
    def expire(self, rid: int | None = None) -> list[str]:
        """Delete the clips (of ``rid``, or all) whose request may no longer be watched: not
        approved any more (expired, cancelled, denied) or gone. Each deletion is recorded once
        (``view.expired``). Left-over part files of a stopped daemon go without a record:
        nobody could ever open them."""
        removed: list[str] = []
        with self.ctx.recording():
            # never created here: a root command acting locally must not leave the directory
            # behind with root as its owner
            views = Path(self.ctx.config.state_dir) / VIEWS_DIR
            try:
                names = os.listdir(views) if views.is_dir() else []
            except OSError as e:
                log.warning("viewing clips: cannot list %s: %s", views, e)
                names = []
            verdicts: dict[int, str | None] = {}

            def ended(clip_rid: int) -> str | None:
                if clip_rid not in verdicts:
                    verdicts[clip_rid] = self._ended(clip_rid)
                return verdicts[clip_rid]

            viewers = {j.name: k[1] for k, j in self._jobs.items()}
            running = {j.name for j in self._jobs.values() if j.state == "preparing"}
            for key, job in list(self._jobs.items()):
                if rid is not None and job.rid != rid:
                    continue
                why = ended(job.rid)
                if why is not None:  # a running encode stops, and is never made a clip
                    job.why = why
                    job.stop.set()
                    del self._jobs[key]
            for name in sorted(names):
                m = _CLIP.match(name) or _PART.match(name)
                if m is None:
                    continue
                clip_rid = int(m.group(1))
                if rid is not None and clip_rid != rid:
                    continue
                if name.startswith("."):
                    if name[1:-5] not in running:
                        (views / name).unlink(missing_ok=True)
                    continue
                why = ended(clip_rid)
                if why is None:
                    continue
                (views / name).unlink(missing_ok=True)
                self.ctx.audit.append(
                    "nvr-guard",
                    "view.expired",
                    f"request:{clip_rid}",
                    {"clip": name, "viewer": viewers.get(name), "reason": why},
                )
                removed.append(name)
        return removed

    def _ended(self, rid: int) -> str | None:
        """Why request ``rid``'s clips must go, or None while it may still be watched."""
        try:
            r, approvals, rules = self.wf._current(rid)
        except InvalidInput:
            return f"request {rid} does not exist"
        if r.format != access.VIEW:
            return f"request {rid} is not a viewing request"
        if r.state != "approved":
            until = access.valid_until(r, approvals, rules)
            if r.state == "expired" and until is not None:
                return f"the approval's validity ended at {iso(until, rules.tz)}"
            return f"request {rid} is {r.state}"
        return None

    # ---- previews ------------------------------------------------------------------------------
    def previews(self, caller: Caller, rid: int) -> dict[str, Any]:
        """Three watermarked JPEG frames (start, middle, end) of each of the first cameras of
        request ``rid``, for a person who may decide it now, when ``web.previews`` is on."""
        web = self.wf.config.web
        if web is None or not web.previews:
            with self.ctx.recording():
                self.wf._refused(
                    caller,
                    f"request:{rid}",
                    access.Decision(
                        False,
                        "previews are off: an admin turns them on with web.previews: true",
                        3,
                    ),
                )
        with self.ctx.recording():
            r, approvals, rules = self.wf._visible(caller, rid)
            now = self.wf.now()
            d = access.check_preview(
                r, approvals, self.wf.actor(caller), self.wf._acting(r, rules), now
            )
            if not d.allowed:
                self.wf._refused(caller, f"request:{rid}", d)
            cameras = list(r.cameras[:MAX_PREVIEW_CAMERAS])
            clips = [
                (
                    cam,
                    [
                        SourceSegment(Path(os.fsdecode(s.path)), s.start)
                        for s in self.ctx.catalog.segments_of(r.site, cam, r.start, r.end)
                    ],
                )
                for cam in cameras
            ]
            tz = rules.tz
            zones = zones_for(self.wf.config, r, approvals)
        # one set of stills at a time, and nobody queues for it: a page reloaded in a loop must
        # not pile up daemon threads (and connections) behind a slow decode
        if not self._previewer.acquire(blocking=False):
            raise RuntimeFailure("previews are being made for another page; try again shortly")
        try:
            frames = self._stills(clips, r, rid, caller, now, tz, zones)
        finally:
            self._previewer.release()
        left_out = list(r.cameras[MAX_PREVIEW_CAMERAS:])
        with self.ctx.recording():
            self.ctx.audit.append(
                caller.user,
                "preview.show",
                f"request:{rid}",
                {
                    "cameras": cameras,
                    "frames": [{"camera": f["camera"], "at": f["at"]} for f in frames],
                },
            )
        return {"request": rid, "frames": frames, "cameras_left_out": left_out}

    def _stills(
        self,
        clips: list[tuple[str, list[SourceSegment]]],
        r: access.Request,
        rid: int,
        caller: Caller,
        now: float,
        tz: Any,
        zones: dict[str, list[Any]],
    ) -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        font = resolve_font(self.wf.config.export.font)
        text = preview_watermark(rid, caller.user, now, tz)
        with tempfile.TemporaryDirectory(prefix="nvrg-preview-") as tmp:
            for cam, segs in clips:
                for i, s in enumerate(
                    stills(
                        cam,
                        segs,
                        r.start,
                        r.end,
                        watermark=text,
                        font=font,
                        workdir=Path(tmp),
                        zones=zones.get(cam, ()),
                    )
                ):
                    frames.append(
                        {
                            "camera": cam,
                            "position": ("start", "middle", "end")[i],
                            "at": iso(s.at, tz),
                            "content_type": "image/jpeg",
                            "jpeg": base64.b64encode(s.jpeg).decode("ascii"),
                        }
                    )
        return frames
