"""Layout presets: the file naming of the recorders sites run, as data.

``layout: <preset>`` in a site stands for the preset's pattern (:mod:`nvr_guard.retention.layout`),
its time zone of the path (``utc``: Frigate names its directories in UTC; ``local``: read in the
site's ``layout_timezone``, else its ``timezone``; ``epoch``: the start is an epoch in the name,
directories if any are local), its default segment extensions (when the site lists no
``extensions``) and its sidecar files. A sidecar is a file the recorder writes beside its
segments that is never a segment itself:

- ``shared`` (Viseron's ``init.mp4``): one per camera directory, needed to play any segment of
  it; never catalogued, never deleted (it stays while any segment of the camera remains).
- ``suffix`` (motionEye's ``<movie>.thumb``): belongs to the segment whose name it extends; never
  catalogued, and removed by the purge in the same step as its segment.

Facts come from each recorder's source or documentation; ``REFUSED`` names the recorders whose
files cannot be pruned from outside (their own index or ring buffer owns them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import tzinfo
from zoneinfo import ZoneInfo

from nvr_guard.retention.layout import Layout

__all__ = ["PRESETS", "REFUSED", "Preset", "compile_layout", "refusal"]


@dataclass(frozen=True)
class Preset:
    name: str
    pattern: str
    extensions: tuple[str, ...]
    zone: str  # "utc", "local" or "epoch" (the name's epoch; directories local)
    example: str  # a path under the root, as the recorder writes it
    explanation: str  # one paragraph, for `layout test` and the README
    recorder_setting: str  # what the admin must set on the recorder
    camera_from_root: bool = False  # the root is one camera's folder; camera = its name
    shared_sidecars: tuple[str, ...] = ()  # file names beside a camera's segments (init.mp4)
    suffix_sidecars: tuple[str, ...] = ()  # appended to a segment's name (".thumb")

    def sidecar_of(self, name: str) -> str | None:
        """For a file name: "" when it is a shared sidecar, the segment's name when it is a
        suffix sidecar of one, else None."""
        if name in self.shared_sidecars:
            return ""
        for suffix in self.suffix_sidecars:
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
        return None


_LOCAL_NOTE = "Local times are read in layout_timezone, else the site's timezone."

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "frigate",
            "%Y-%m-%d/%H/{camera}/%M.%S.mp4",
            (".mp4",),
            "utc",
            "2024-05-01/14/front/03.20.mp4",
            "Frigate 0.12+ recordings: <date>/<hour>/<camera>/<minute>.<second>.mp4 below "
            "/media/frigate/recordings, date and hour in UTC (whatever the host's zone); each "
            "file is one segment (10 s by default) starting at that time.",
            "Set Frigate's record.retain days at or above nvr-guard's keep; point the root at "
            "the recordings directory.",
        ),
        Preset(
            "dahua",
            "%Y-%m-%d/{camera}/dav/%H/%H.%M.%S-{end:%H.%M.%S}{ignore}.dav",
            (".dav",),
            "local",
            "2024-05-01/001/dav/14/14.03.20-14.08.20[M][0@0][0].dav",
            "Dahua NVR/IPC storage on NAS, SD card or FTP: <date>/<channel>/dav/<hour>/"
            "<start>-<end>[type][...].dav in the camera's local time; the name carries start "
            "and end, an end earlier than the start is on the next day (across midnight). "
            + _LOCAL_NOTE,
            "Set the camera's/NVR's time zone and NTP; set its own overwrite/keep days at or "
            "above nvr-guard's keep.",
        ),
        Preset(
            "nx-witness",
            "*/{camera}/%Y/%m/%d/%H/{epoch_ms}_{duration_ms}.mkv",
            (".mkv",),
            "epoch",
            "hi_quality/<camera id>/2024/05/01/14/1714572200000_60000.mkv",
            "Nx Witness / Network Optix archive: hi_quality or low_quality/<camera physical id>/"
            "<local year/month/day/hour>/<start epoch ms>_<duration ms>.mkv; start and end come "
            "from the name (exact), the directories only have to match.",
            "Run 'Reindex Archive' after nvr-guard deleted files; set the server's own archive "
            "days at or above nvr-guard's keep.",
        ),
        Preset(
            "shinobi",
            "*/{camera}/%Y-%m-%dT%H-%M-%S.mp4",
            (".mp4", ".webm"),
            "local",
            "<group>/<monitor>/2024-05-01T14-03-20.mp4",
            "Shinobi videos directory: <group key>/<monitor id>/<start>.mp4 in the server's "
            "local time; the camera is the monitor id (monitor ids must differ across groups). "
            + _LOCAL_NOTE,
            "Set the monitor's 'Max days' at or above nvr-guard's keep; Shinobi's videos table "
            "keeps rows of deleted files until its own cleanup.",
        ),
        Preset(
            "motioneye",
            "%Y-%m-%d/%H-%M-%S.mp4",
            (".mp4",),
            "local",
            "2024-05-01/14-03-20.mp4",
            "motionEye movies: <date>/<time>.mp4 in the camera's target directory (the root is "
            "one camera's folder; the camera is the root's directory name); the <movie>.thumb "
            "preview beside a movie is removed with it. " + _LOCAL_NOTE,
            "Keep motionEye's movie file name at %Y-%m-%d/%H-%M-%S; set 'Preserve Movies' at "
            "or above nvr-guard's keep; one root per camera's target directory.",
            camera_from_root=True,
            suffix_sidecars=(".thumb",),
        ),
        Preset(
            "motion",
            "{ignore}-%Y%m%d%H%M%S.mkv",
            (".mkv",),
            "local",
            "01-20240501140320.mkv",
            "Motion movies: <event number>-<start>.mkv (movie_filename %v-%Y%m%d%H%M%S) in the "
            "camera's target_dir (the root is one camera's folder; the camera is the root's "
            "directory name). " + _LOCAL_NOTE,
            "Keep movie_filename at %v-%Y%m%d%H%M%S and one target_dir per camera.",
            camera_from_root=True,
        ),
        Preset(
            "zoneminder",
            "{camera}/%y/%m/%d/%H/%M/%S/{ignore}-video{ignore}.mp4",
            (".mp4",),
            "local",
            "<monitor id>/24/05/01/14/03/20/<event id>-video.mp4",
            "ZoneMinder deep storage: <monitor id>/<yy/mm/dd/hh/mm/ss of the event start>/"
            "<event id>-video.mp4 (events stored as video; from 1.38 <event id>-video.<codec>"
            ".mp4; the incomplete.* file of an event still recording is never a segment). "
            + _LOCAL_NOTE,
            "Use the deep storage scheme and video storage (passthrough/encode); run zmaudit.pl "
            "(or let it run) so events whose files went are removed from ZoneMinder's database; "
            "set the PurgeWhenFull filter at or above nvr-guard's keep.",
        ),
        Preset(
            "ispy",
            "video/*/{camera}_%Y-%m-%d_%H-%M-%S.mp4",
            (".mp4", ".avi"),
            "local",
            "video/<dir>/<camid>_2024-05-01_14-03-20.mp4",
            "iSpy: video/<camera folder>/<camera id>_<start>.mp4 in the machine's local time. "
            + _LOCAL_NOTE,
            "Set the camera's storage management (max age) at or above nvr-guard's keep.",
        ),
        Preset(
            "agent-dvr",
            "video/*/{camera}_%Y-%m-%d_%H-%M-%S_{ignore}.mp4",
            (".mp4",),
            "local",
            "video/<dir>/<camid>_2024-05-01_14-03-20_123.mp4",
            "Agent DVR: video/<camera folder>/<camera id>_<start>_<milliseconds>.mp4 in the "
            "machine's local time (the milliseconds are not used). " + _LOCAL_NOTE,
            "Set storage management at or above nvr-guard's keep; Agent DVR rebuilds its "
            "recordings list from the folder (or use 'Rebuild' in the storage settings).",
        ),
        Preset(
            "viseron",
            "{camera}/%s.m4s",
            (".m4s",),
            "epoch",
            "<camera>/1714572200.m4s",
            "Viseron segments: <camera>/<start epoch seconds>.m4s with one init.mp4 per camera "
            "directory, which every segment needs to play: init.mp4 is never a segment and is "
            "never deleted.",
            "Point the root at Viseron's segments directory; set recorder retain days at or "
            "above nvr-guard's keep.",
            shared_sidecars=("init.mp4",),
        ),
        Preset(
            "blue-iris",
            "{camera}.%Y%m%d_%H%M%S.mp4",
            (".mp4", ".bvr"),
            "local",
            "Cam1.20240501_140320.mp4",
            "Blue Iris clips: <camera short name>.<start>.bvr or .mp4 (file name &CAM.%Y%m%d_"
            "%H%M%S) directly in a clip folder (New, Stored, ...: one root each). " + _LOCAL_NOTE,
            "Keep the clip file name at &CAM.%Y%m%d_%H%M%S; set each folder's limit (age) at "
            "or above nvr-guard's keep; Blue Iris's clip database needs 'Regenerate/Repair' "
            "after external deletions.",
        ),
    )
}

# recorders whose files cannot be pruned from outside, and why
REFUSED: dict[str, str] = {
    "hikvision": (
        "Hikvision NAS/SD storage is a ring buffer of preallocated datadirN/hivNNNNN.mp4 files "
        "indexed by index00.bin: removing a file breaks the index and frees no space"
    ),
    "milestone": (
        "Milestone XProtect keeps footage in its own media database (blocks and tables), not "
        "one file per segment: files cannot be pruned from outside"
    ),
}


def refusal(name: str) -> str | None:
    """Why ``layout: <name>`` is refused (a recorder nvr-guard cannot prune), or None."""
    why = REFUSED.get(name)
    if why is None:
        return None
    return (
        f"layout {name!r} is refused: {why}. Use the recorder's own retention, and set "
        "'retention: none' for this site so nvr-guard governs exports only (exports need "
        "footage as files: export it from the recorder into a root nvr-guard reads)"
    )


def compile_layout(layout: str, tz: tzinfo, explicit_tz: bool) -> Layout:
    """The layout a site's ``layout:`` names: a preset (its zone: UTC for ``utc`` unless the
    site sets ``layout_timezone``) or a pattern. ValueError: refused or not valid."""
    why = refusal(layout)
    if why is not None:
        raise ValueError(why)
    p = PRESETS.get(layout)
    if p is None:
        return Layout.compile(layout, tz)
    zone = ZoneInfo("UTC") if p.zone == "utc" and not explicit_tz else tz
    out = Layout.compile(p.pattern, zone, camera_from_root=p.camera_from_root)
    out.shared_sidecars = frozenset(n.encode() for n in p.shared_sidecars)
    out.suffix_sidecars = tuple(s.encode() for s in p.suffix_sidecars)
    return out
