"""The config's shape: one pydantic model per section, and :class:`Config`, what the rest of the
daemon reads its rules from.

Every model forbids unknown keys (``extra="forbid"``, as Frigate's config does): a misspelt key is
an error at its line, never a setting silently ignored while the default applies. Models are frozen:
a reload builds a new Config, so a sweep never sees half of an old and half of a new one. Defaults
are the cautious choice where one exists (an unclassified camera needs the wider permission level,
a new user gets the narrower one, nobody may export in an emergency until a role is named).

The field types (``types.py``) convert and check single values; what spans fields or looks at the
disk is in ``checks.py``.
"""

from __future__ import annotations

import posixpath
import typing
from functools import cached_property
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from nvr_guard.config.loader import KeyPath, Lines, Problem, Where
from nvr_guard.config.profiles import PROFILES
from nvr_guard.config.types import (
    AbsPath,
    Bool,
    CameraId,
    CameraPatterns,
    Crf,
    Dates,
    Email,
    EncryptMode,
    Extensions,
    Failures,
    FixedDur,
    Fraction,
    HostName,
    Hours,
    HttpUrl,
    Level,
    Listen,
    Port,
    PrivacyZones,
    ProfileName,
    RetentionDur,
    Role,
    Roots,
    SiteId,
    Steps,
    Template,
    Text,
    UnixName,
    ValidFor,
    WebListen,
    WholeNumber,
    WorkingDays,
    Zone,
    hours_window,
    one_of,
    sites_present,
)
from nvr_guard.model import CameraRule, GuardRules, SiteRules
from nvr_guard.retention.layout import Layout
from nvr_guard.retention.presets import PRESETS, Preset, compile_layout
from nvr_guard.text import Duration, fmt_duration, fmt_percent_exact

DEFAULT_EXTENSIONS = (".mp4", ".mkv", ".ts", ".avi", ".h264", ".h265", ".dav")
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip
DEFAULT_WATERMARK = (
    "调取 request {request} · {camera} · 申请 {requester} · 审批 {approvers}"
    " · 导出 {technician} {exported}"
)


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Guards(_Strict):
    """``guards:``: what stops a sweep until an admin confirms (mass deletion, clock jumps)."""

    max_delete_fraction: Fraction = 0.2
    max_clock_jump: FixedDur = Duration.parse("1d")
    # a segment whose path time and mtime disagree by more than this is reported (clock_skew);
    # see policy.skew for the exact band
    max_clock_skew: FixedDur = Duration.parse("1h")


class Disk(_Strict):
    """``disk:``: the free-space floor and what to do below it."""

    min_free: Fraction = 0.1
    action: typing.Annotated[str, BeforeValidator(one_of("alert", "overwrite-oldest"))] = "alert"


class SiteApproval(_Strict):
    """Per-site overrides of the approval rules (unset = the global ``approval:`` value)."""

    steps: Steps | None = None
    hours: Hours | None = None


RECORDER_KINDS = ("frigate",)  # recorders whose own index nvr-guard keeps in step


def _recorder_kind(v: object) -> str:
    s = v.strip().lower() if isinstance(v, str) else v
    if s not in RECORDER_KINDS:
        raise ValueError(
            f"recorder kind {v!r} is not supported; supported kinds: {', '.join(RECORDER_KINDS)} "
            '(for other recorders see the README, "The recorder\'s own index")'
        )
    return str(s)


class Recorder(_Strict):
    """``recorder:`` (top level) and ``sites.<id>.recorder:``: the recorder's own index, whose
    rows of the files nvr-guard deletes are removed in the same purge batch."""

    kind: typing.Annotated[str, BeforeValidator(_recorder_kind)]
    database: AbsPath  # e.g. /opt/frigate/config/frigate.db (as this host sees it)
    # the recordings directory as the recorder sees it (Frigate in Docker:
    # /media/frigate/recordings); its paths are stored that way. None: the same as the root
    recordings: AbsPath | None = None
    # top level only: the roots it serves (any layout); unset: every site with layout frigate
    roots: list[AbsPath] | None = None
    busy_timeout: FixedDur = Duration.parse("3s")  # longest wait for the recorder's write lock


def _retention_mode(v: object) -> str:
    try:
        return str(one_of("none")(v))
    except ValueError as e:
        raise ValueError(
            f"{e}; none = nvr-guard deletes nothing at this site (the recorder's own retention "
            "applies); leave retention out for nvr-guard to enforce keep"
        ) from None


class SiteExport(_Strict):
    """``sites.<id>.export:``: per-site overrides of ``export:`` (unset = the global value)."""

    encrypt: EncryptMode | None = None


class Site(_Strict):
    """``sites.<id>:``: a set of recording roots and the retention rule they share."""

    profile: ProfileName | None = None
    keep: RetentionDur | None = None  # ceiling; overrides the profile's
    min_keep: RetentionDur | None = None  # floor; overrides the profile's
    roots: Roots
    layout: Text | None = None
    layout_timezone: Zone | None = None
    timezone: Zone | None = None
    extensions: Extensions = Field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    approval: SiteApproval | None = None
    export: SiteExport | None = None
    # false: the scanner and the purge stay on each root's file system; a directory mounted
    # below a root (a bind mount, another disk) is skipped and reported (mount_skipped)
    cross_mounts: Bool = False
    # only these cameras (ids or fnmatch globs) of the roots are the site's; unset: every camera.
    # Required on a root that several sites share, with disjoint sets (checks.py)
    cameras: CameraPatterns | None = None
    recorder: Recorder | None = None  # the recorder's own index (overrides the top-level one)
    # "none": nvr-guard deletes nothing here (the recorder's own retention applies); the footage
    # under the roots is still catalogued, for exports. Absent: nvr-guard enforces the rule.
    retention: typing.Annotated[str, BeforeValidator(_retention_mode)] | None = None


class Camera(_Strict):
    """``cameras.<id>:``: a camera's permission level and display name."""

    # Unlisted level = 2: a camera nobody classified needs the wider permission (fail closed).
    level: Level = 2
    name: Text | None = None
    # the camera's own ceiling and floor, at every site that has it; never below a site's floor
    keep: RetentionDur | None = None
    min_keep: RetentionDur | None = None
    # parts of the picture filled in on every watermarked export and view of this camera
    privacy_zones: PrivacyZones = Field(default_factory=list)


class User(_Strict):
    """``people.users.<name>:``: a Unix user's roles and camera level."""

    roles: list[Role] = Field(default_factory=list)
    level: Level = 1  # least privilege: internal cameras only unless raised
    # where notifications for this person go (else notify.smtp.domain, else no e-mail)
    email: Email | None = None


class Group(_Strict):
    """``people.groups.<name>:``: roles every member of a Unix group holds."""

    roles: list[Role] = Field(default_factory=list)


class People(_Strict):
    """``people:``: who holds which role, by Unix user and group."""

    users: dict[UnixName, User] = Field(default_factory=dict)
    groups: dict[UnixName, Group] = Field(default_factory=dict)


class Emergency(_Strict):
    """``approval.emergency:``: who may export before approval, and how soon it is back-filled."""

    roles: list[Role] = Field(default_factory=list)  # nobody, unless the admin names a role
    backfill_within: FixedDur = Duration.parse("24h")


class Approval(_Strict):
    """``approval:``: the steps, hours and time limits of the retrieval workflow."""

    steps: Steps = Field(default_factory=lambda: ["dept_manager", "security_lead"])
    decide_within: WorkingDays = 3
    valid_for: ValidFor = Duration.parse("30d")
    hours: Hours = "08:00-20:00"
    after_hours_role: Role = "duty_manager"
    # how long an after-hours approval covers exports after it was given
    after_hours_valid: FixedDur = Duration.parse("12h")
    # separation of duties: whoever approved a request may not also export it unless this is true
    approver_may_export: Bool = False
    emergency: Emergency = Field(default_factory=Emergency)
    max_range: FixedDur = Duration.parse("24h")
    holidays: Dates = Field(default_factory=list)
    workdays: Dates = Field(default_factory=list)

    def hours_window(self) -> tuple[int, int]:
        """(start, end) in minutes after local midnight."""
        return hours_window(self.hours)


DEFAULT_EXPORT_GROUP = "nvr-guard-export"  # systemd/nvr-guard.sysusers creates it


class Export(_Strict):
    """``export:``: where exports go, how they are watermarked, encoded and signed."""

    targets: list[AbsPath] = Field(default_factory=list)
    # the Unix group that may read finished packages (directories 0750, files 0640): the admin
    # puts technicians and auditors in it; systemd/nvr-guard.sysusers creates the default
    group: UnixName = DEFAULT_EXPORT_GROUP
    watermark: Template = DEFAULT_WATERMARK
    font: Text | None = None  # a font file path or a fontconfig family; None = find a CJK font
    crf: Crf = 23
    preset: typing.Annotated[str, BeforeValidator(one_of(*X264_PRESETS))] = "medium"
    signing_key: AbsPath | None = None  # None = <state_dir>/export-key.pem
    # a request's footage stays held this long after its export (complaints, second copies)
    preserve: FixedDur = Duration.parse("30d")
    # the held range extends this far on both sides of the requested one (camera clock skew)
    hold_margin: FixedDur = Duration.parse("10m")
    timeout: FixedDur = Duration.parse("1h")  # per clip; a longer ffmpeg run is stopped
    # how a package leaves the recorder: none (a plain package directory), passphrase (an AES-256
    # 7z archive; the passphrase is shown once to the technician) or recipient (CMS enveloped to
    # the recipient unit's certificate in ``recipients``); a request may ask for more, never less
    encrypt: EncryptMode = "none"
    # the recipient units' X.509 certificates (PEM), by the unit's name as requests give it
    recipients: dict[Text, AbsPath] = Field(default_factory=dict)
    # cameras of this level or above are only exported encrypted (unset: as encrypt says)
    encrypt_from_level: Level | None = None
    # a native copy (stream copy, cannot be masked) of a camera with privacy zones: allow (the
    # record says "unmasked native copy") or refuse
    native_with_zones: typing.Annotated[str, BeforeValidator(one_of("allow", "refuse"))] = "allow"
    # packages written to export.targets directories are destroyed this long after their export
    # (a hold naming the request keeps them); a medium is wiped by media wipe instead
    target_keep: FixedDur = Duration.parse("30d")


class Media(_Strict):
    """``media:``: how removable media are scanned and prepared before an export."""

    scanner: typing.Annotated[str, BeforeValidator(one_of("auto", "clamd", "clamscan"))] = "auto"
    scan_max_age: FixedDur = Duration.parse("15m")
    require_enrolled: Bool = True
    # local ClamAV signature directory for clamscan (default: freshclam's DatabaseDirectory);
    # air-gapped recorders point it at the copied daily/main .cvd files
    database: AbsPath | None = None
    clamd_socket: AbsPath | None = None  # default: LocalSocket from /etc/clamav/clamd.conf
    clamd_config: AbsPath | None = None  # default: /etc/clamav/clamd.conf
    sysfs_root: AbsPath = "/sys"  # where removable devices are read from (a testing aid)
    # where the admin mounts export media (e.g. [/media/nvr-export]): `unit-paths` makes them
    # writable for the unit and lets it read removable disks' filesystem headers; when set, a
    # medium mounted anywhere else is refused as a destination
    mountpoints: list[AbsPath] = Field(default_factory=list)
    reserve: WholeNumber = 64 * 2**20  # bytes left free on media
    # "wipe": `media wipe` may format a medium (mkfs.vfat) instead of scanning old contents
    prepare: typing.Annotated[str, BeforeValidator(one_of("scan", "wipe"))] = "scan"


class Metrics(_Strict):
    """Prometheus metrics: a node_exporter textfile and/or an HTTP endpoint on loopback."""

    textfile: AbsPath | None = None  # rewritten atomically after each sweep, rescan, request check
    listen: Listen | None = None


class Web(_Strict):
    """``web:``: the approval console (``nvr-guard web``, its own unit and user).

    The console holds no authority: it is a gateway to the daemon, which accepts "on behalf of"
    requests only from ``gateway_user`` and only for sessions the password check
    (``auth_user``'s helper, PAM service ``nvr-guard``) opened."""

    listen: WebListen = "0.0.0.0:8443"
    tls_cert: AbsPath | None = None
    tls_key: AbsPath | None = None
    gateway_user: UnixName = "nvr-guard-web"
    # the account of the password-checking helper (nvr-guard-auth@.service): the only one whose
    # word opens a session
    auth_user: UnixName = "nvr-guard-auth"
    auth_socket: AbsPath = "/run/nvr-guard-auth/auth.sock"
    max_failures: Failures = 5
    lockout: FixedDur = Duration.parse("15min")
    idle_timeout: FixedDur = Duration.parse("15min")
    session_limit: FixedDur = Duration.parse("12h")  # absolute, however active the session
    previews: Bool = False
    # the console's address as people reach it, for links in notifications
    url: HttpUrl | None = None


class Smtp(_Strict):
    """``notify.smtp:``: a mail relay the web service hands notifications to."""

    # ``config show`` writes ``from``, as the file does
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    host: HostName
    port: Port = 587
    # ``from`` in YAML; a Python keyword, hence the alias
    sender: Email = Field(alias="from")
    starttls: Bool = True
    username: Text | None = None
    password_file: AbsPath | None = None
    # people without people.users.<name>.email get <name>@domain when this is set
    domain: HostName | None = None


class Webhook(_Strict):
    """``notify.webhook:``: JSON POSTed to ``url``, signed with HMAC-SHA256 of ``secret_file``."""

    url: HttpUrl
    secret_file: AbsPath | None = None


class Notify(_Strict):
    """``notify:``: who hears that a request waits, is decided or expires, or a violation opens."""

    smtp: Smtp | None = None
    webhook: Webhook | None = None
    retry_for: FixedDur = Duration.parse("24h")  # a notification still failing then is dropped


class Config(_Strict):
    """The whole file, validated; what the daemon and the CLI read their rules from."""

    state_dir: AbsPath = "/var/lib/nvr-guard"
    timezone: Zone = "Asia/Shanghai"
    settle: FixedDur = Duration.parse("2m")
    socket: AbsPath = "/run/nvr-guard/control.sock"
    socket_group: UnixName = "nvr-guard"
    sweep_every: FixedDur = Duration.parse("5m")
    rescan_every: FixedDur = Duration.parse("1h")
    # declared legal minimum; `config check` warns below it
    legal_min_keep: RetentionDur | None = None
    guards: Guards = Field(default_factory=Guards)
    disk: Disk = Field(default_factory=Disk)
    sites: typing.Annotated[dict[SiteId, Site], BeforeValidator(sites_present)]
    cameras: dict[CameraId, Camera] = Field(default_factory=dict)
    people: People = Field(default_factory=People)
    approval: Approval = Field(default_factory=Approval)
    export: Export = Field(default_factory=Export)
    media: Media = Field(default_factory=Media)
    metrics: Metrics = Field(default_factory=Metrics)
    recorder: Recorder | None = None  # applies to sites with layout frigate (or its roots)
    web: Web | None = None
    notify: Notify = Field(default_factory=Notify)

    _source_path: Path = PrivateAttr(default=Path("<memory>"))
    _digest: str = PrivateAttr(default="")
    _warnings: list[Problem] = PrivateAttr(default_factory=list)
    _layouts: dict[str, Layout | None] = PrivateAttr(default_factory=dict)
    _lines: dict[KeyPath, Where] = PrivateAttr(default_factory=dict)

    @property
    def source_path(self) -> Path:
        """The absolute path the config was read from (``<memory>`` for parsed bytes)."""
        return self._source_path

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the file's bytes: what the audit log records on load and reload."""
        return self._digest

    def line_of(self, path: tuple[Any, ...]) -> int:
        """The line of a key in the file (``("sites", "gate")``), for checks made after loading
        (those that need the state: a reload that would orphan a hold)."""
        return Lines(self._lines).at(path, True)

    @property
    def warnings(self) -> list[Problem]:
        """What ``config check`` warns about; the daemon logs these on load."""
        return list(self._warnings)

    @cached_property
    def tz(self) -> ZoneInfo:
        """The default timezone (top-level ``timezone``)."""
        return ZoneInfo(self.timezone)

    def site_tz(self, site: str) -> ZoneInfo:
        """The site's own zone: where its months and years are counted and its hours apply."""
        return ZoneInfo(self.sites[site].timezone or self.timezone)

    def resolved_keep(self, site: str) -> tuple[Duration | None, Duration | None]:
        """(keep, min_keep) after profile + overrides; the override wins."""
        return resolve_keep(self.sites[site])

    def site_rules(self) -> dict[str, SiteRules]:
        """Each site's retention rules as the pure policy takes them."""
        out: dict[str, SiteRules] = {}
        cameras = tuple(
            CameraRule(cid, c.keep, c.min_keep)
            for cid, c in sorted(self.cameras.items())
            if c.keep is not None or c.min_keep is not None
        )
        for name, s in self.sites.items():
            keep, min_keep = resolve_keep(s)
            unmanaged = s.retention == "none"
            out[name] = SiteRules(
                site=name,
                keep=keep,
                min_keep=min_keep,
                tz=self.site_tz(name),
                settle=float(self.settle.seconds),
                # a site under the recorder's own retention asks no space of a shared volume
                min_free=0.0 if unmanaged else self.disk.min_free,
                disk_action=self.disk.action,
                profile=s.profile,
                cameras=() if unmanaged else cameras,
                enforce=not unmanaged,
                claims=tuple(s.cameras or ()),
            )
        return out

    def guard_rules(self) -> GuardRules:
        """The mass-deletion and clock guards as the pure policy takes them."""
        return GuardRules(
            max_delete_fraction=self.guards.max_delete_fraction,
            max_clock_jump=float(self.guards.max_clock_jump.seconds),
            max_clock_skew=float(self.guards.max_clock_skew.seconds),
        )

    def layout_timezone(self, site: str) -> ZoneInfo:
        """The zone a site's path dates are written in: ``layout_timezone``, else UTC for a
        preset whose recorder writes UTC (Frigate), else the site's."""
        s = self.sites[site]
        if s.layout_timezone:
            return ZoneInfo(s.layout_timezone)
        preset = self.preset_for(site)
        return ZoneInfo("UTC") if preset and preset.zone == "utc" else self.site_tz(site)

    def preset_for(self, site: str) -> Preset | None:
        """The recorder preset a site's ``layout:`` names, or None (a pattern, or no layout)."""
        layout = self.sites[site].layout
        return PRESETS.get(layout) if layout else None

    def layout_for(self, site: str) -> Layout | None:
        """The site's compiled path pattern (dates read in ``layout_timezone``), or None: mtime."""
        if site not in self._layouts:
            s = self.sites[site]
            self._layouts[site] = (
                compile_layout(s.layout, self.layout_timezone(site), s.layout_timezone is not None)
                if s.layout
                else None
            )
        return self._layouts[site]

    def recorder_for(self, site: str) -> Recorder | None:
        """The recorder index a site's deletions are reported to: its own ``recorder:``, else
        the top-level one when it names one of the site's roots (or, naming none, when the
        site's layout is ``frigate``); None: no index to keep in step."""
        s = self.sites[site]
        if s.recorder is not None:
            return s.recorder
        r = self.recorder
        if r is None:
            return None
        if r.roots is not None:
            mine = {str(x).rstrip("/") or "/" for x in s.roots}
            return r if any((str(x).rstrip("/") or "/") in mine for x in r.roots) else None
        return r if (s.layout or "").strip().lower() == r.kind else None

    def extensions_for(self, site: str) -> frozenset[str]:
        """Lower-case; compare with the lower-cased suffix of a file name. A site that lists
        none has its preset's (``.dav`` for dahua ...), else the defaults."""
        s = self.sites[site]
        preset = self.preset_for(site)
        if preset is not None and "extensions" not in s.model_fields_set:
            return frozenset(preset.extensions)
        return frozenset(e.lower() for e in s.extensions)

    def approval_for(self, site: str) -> tuple[list[str], str]:
        """(steps, hours) of a site: its own override, else the global ones."""
        own = self.sites[site].approval
        steps = own.steps if own and own.steps is not None else self.approval.steps
        hours = own.hours if own and own.hours is not None else self.approval.hours
        return list(steps), hours

    def signing_key_path(self) -> str:
        """``export.signing_key``, else ``<state_dir>/export-key.pem``."""
        return self.export.signing_key or posixpath.join(self.state_dir, "export-key.pem")

    def effective(self) -> dict[str, Any]:
        """The config as the daemon applies it: defaults filled in, profiles resolved, durations as
        strings. Plain JSON/YAML types only; fed back in as a config it gives the same result."""
        data = self.model_dump(mode="json")
        data["approval"]["decide_within"] = f"{self.approval.decide_within} working days"
        data["guards"]["max_delete_fraction"] = fmt_percent_exact(self.guards.max_delete_fraction)
        data["disk"]["min_free"] = fmt_percent_exact(self.disk.min_free)
        data["export"]["signing_key"] = self.signing_key_path()
        for name, site in data["sites"].items():
            keep, min_keep = self.resolved_keep(name)
            site["keep"] = fmt_duration(keep, "min") if keep else None
            site["min_keep"] = fmt_duration(min_keep, "min") if min_keep else None
            site["timezone"] = self.sites[name].timezone or self.timezone
            site["layout_timezone"] = str(self.layout_timezone(name)) if site["layout"] else None
            if self.preset_for(name) is not None:
                site["extensions"] = sorted(self.extensions_for(name))
            steps, hours = self.approval_for(name)
            site["approval"] = {"steps": steps, "hours": hours}
        return data


def resolve_keep(s: Site) -> tuple[Duration | None, Duration | None]:
    """(keep, min_keep) of a site: its own value where it sets one, else its profile's
    ((None, None) under ``retention: none``: nvr-guard keeps everything there)."""
    if s.retention == "none":
        return None, None
    p = PROFILES.get(s.profile) if s.profile else None
    keep = s.keep if s.keep is not None else (p.keep if p else None)
    min_keep = s.min_keep if s.min_keep is not None else (p.min_keep if p else None)
    return keep, min_keep
