"""What an admin sees: `retention plan/run/confirm` summary first, `status` for people with its
exit code, log lines for a terminal or the journal, times for people (issue 15)."""

from __future__ import annotations

import json
import logging
import os
import pty
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nvr_guard.cli.show import columns, local, local_iso, span, when
from nvr_guard.cli.status_cmd import not_ok_reasons, print_status
from nvr_guard.config import load_config
from nvr_guard.daemon.main import log_formatter, stderr_is_journal
from nvr_guard.engine import Engine
from nvr_guard.retention.scan import ReconcileStats
from nvr_guard.retention.sweeper import held_back_kind
from tests.fixtures.site import SH, Site, build_tree, write_segment

# ---- retention plan / run / confirm ------------------------------------------------------------


def _hold(site: Site, t0: datetime, t1: datetime) -> None:
    r = site.run(
        "hold", "add", "--camera", "cam1", "--from", t0.isoformat(), "--to", t1.isoformat(),
        "--reason", "case 17",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_plan_is_one_line_per_site_and_camera_then_every_row_with_list(
    site: Site, now: datetime
) -> None:
    # cam1: three expired segments, one of them held; gate-03: two expired; both keep 10 days
    expired = [write_segment(site.root, "cam1", now - timedelta(days=20, hours=h)) for h in (0, 2)]
    held = write_segment(site.root, "cam1", now - timedelta(days=25))
    gate = [write_segment(site.root, "gate-03", now - timedelta(days=d)) for d in (16, 18)]
    build_tree(site.root, ["cam1", "gate-03"], days=10, per_day=24, now=now)
    site.write_config(fraction=1.0)
    _hold(site, now - timedelta(days=25, minutes=1), now - timedelta(days=24))

    r = site.run("retention", "plan")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("SITE"))
    assert header.split() == ["SITE", "CAMERA", "TO", "DELETE", "SIZE", "RECORDED"] + [
        "(site-local)", "HELD", "BACK",
    ]  # fmt: skip
    rows = {tuple(ln.split()[:2]): ln for ln in lines if ln.startswith("toll ")}
    assert set(rows) == {("toll", "cam1"), ("toll", "gate-03")}
    first = min(now - timedelta(days=20, hours=2), now - timedelta(days=20))
    last = now - timedelta(days=20)
    cam1 = rows[("toll", "cam1")].split()
    assert cam1[2:5] == ["2", "2.0", "KiB"]  # two segments of 1000 bytes
    assert span(first.timestamp(), last.timestamp(), SH) in rows[("toll", "cam1")]
    assert rows[("toll", "cam1")].endswith("held 1")
    assert rows[("toll", "gate-03")].split()[2] == "2"
    assert rows[("toll", "gate-03")].endswith("-")
    # summary only: no path, no reason text
    assert str(site.root) not in r.stdout and "keep=15d" not in r.stdout
    assert "--list" in r.stdout

    listed = site.run("retention", "plan", "--list")
    assert listed.returncode == 0, listed.stderr
    for p in [*expired, held, *gate]:
        (line,) = [ln for ln in listed.stdout.splitlines() if f"  {p}  " in ln]
        assert line.split()[0] == ("keep" if p == held else "delete")
    assert "held: hold" in listed.stdout and "keep=15d" in listed.stdout


def test_plan_json_keeps_every_field(site: Site, now: datetime) -> None:
    write_segment(site.root, "cam1", now - timedelta(days=20))
    build_tree(site.root, ["cam1"], days=3, per_day=4, now=now)
    site.write_config(fraction=1.0)
    res = site.json("retention", "plan")
    assert {"sweep", "deleted", "bytes", "items", "trips", "alerts", "skipped"} <= set(res)
    assert {"unmatched", "attention"} <= set(res)
    (item,) = res["items"]
    assert set(item) == {"path", "site", "camera", "recorded", "size", "action", "reason"}


def test_blocked_cameras_show_what_the_guard_stopped(site: Site, now: datetime) -> None:
    build_tree(site.root, ["cam1"], days=30, per_day=4, now=now)
    r = site.run("retention", "plan")
    assert r.returncode == 0, r.stderr
    (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith("toll ")]
    # what confirming would delete: its count, size and span; held back: the guard stops it
    res = site.json("retention", "plan")
    blocked = [i for i in res["items"] if i["action"] == "blocked"]
    assert len(blocked) > 40 and int(row.split()[2]) == len(blocked)
    assert row.endswith(f"guard {len(blocked)}")
    assert "guard: camera cam1" in r.stderr


def test_confirm_prints_the_summary_and_the_guard_names_the_sweep(
    site: Site, now: datetime
) -> None:
    old = build_tree(site.root, ["cam1"], days=30, per_day=4, now=now - timedelta(days=16))
    build_tree(site.root, ["cam1"], days=10, per_day=4, now=now)
    r = site.run("retention", "run")
    assert r.returncode == 3
    assert all(p.exists() for p in old)
    # the run's guard message names the sweep it asks to confirm
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("guard:")]
    sweep_id = int(line.split("retention confirm ")[1].split("`")[0])
    assert r.stdout.splitlines()[0] == f"sweep {sweep_id}"
    # a sweep's summary counts what it deleted: nothing; the guard holds back all that was due
    (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith("toll ")]
    assert row.split()[2:4] == ["0", "-"] and row.endswith(f"guard {len(old)}")

    # and so does status (the sweep's stored summary was written before it had an id)
    (b,) = Engine(load_config(site.config)).status()["blocked_sweeps"]
    assert b["id"] == sweep_id and f"`nvr-guard retention confirm {sweep_id}`" in b["message"]
    assert "SWEEP_ID" not in b["message"]

    c = site.run("retention", "confirm", str(sweep_id))
    assert c.returncode == 0, c.stderr
    assert not any(p.exists() for p in old)
    # the summary: a header, one row, the counts; not a row per deleted segment
    assert len(c.stdout.splitlines()) <= 5, c.stdout
    assert str(site.root) not in c.stdout
    (row,) = [ln for ln in c.stdout.splitlines() if ln.startswith("toll ")]
    assert int(row.split()[2]) == len(old)
    assert "DELETED" in c.stdout


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("held: hold 3 (legal: case 17, by root); otherwise expired (keep=15d)", "held"),
        ("settling: modified 40 s ago (settle=120 s); otherwise expired (keep=15d)", "settling"),
        ("floor: min_keep=30d until 2026-12-01T10:00:00+08:00; keep=15d", "floor"),
        ("something the policy says in a sentence", "other"),
    ],
)
def test_held_back_reasons_are_counted_by_the_rule_they_name(reason: str, kind: str) -> None:
    assert held_back_kind(reason) == kind


def test_columns_at_80_never_break_a_cell() -> None:
    header = ["SITE", "CAMERA", "TO DELETE", "SIZE", "RECORDED (site-local)", "HELD BACK"]
    rows = [
        ["gate", "gate-03", "12,345", "38.2 GiB", "2026-05-01 12:13 – 05-15 18:13",
         "guard 12,345, held 1,204, settling 3, floor 20, other 1"],
        ["toll", "cam1", "2", "2.0 KiB", "2026-11-01 12:13 – 11-15 18:13", "-"],
    ]  # fmt: skip
    lines = columns(header, rows, width=80, right=frozenset({2, 3}))
    assert all(len(ln) <= 80 for ln in lines), lines
    lead = lines[0].index("HELD BACK")
    # every cell but the last whole on its row's first line; the last wrapped at its own column
    first = lines[1]
    assert all(cell in first for cell in rows[0][:5])
    cont = [ln for ln in lines[2:] if not ln.startswith("toll")]
    assert cont and all(ln[:lead].strip() == "" for ln in cont)
    assert " ".join([first[lead:], *(c[lead:] for c in cont)]) == rows[0][5]
    # a pipe: one line per row, never wrapped
    assert len(columns(header, rows, width=None)) == 3

    # names too long for any table at 80 columns: a block per row, still no cell broken
    rows[0][:2] = ["highway-east-carriageway", "gate-03-entrance-northbound"]
    rows[0][4] = "2025-11-01 12:13 – 2026-05-15 18:13"
    lines = columns(header, rows, width=80, right=frozenset({2, 3}))
    assert all(len(ln) <= 80 for ln in lines), lines
    assert lines[:3] == [
        "highway-east-carriageway  gate-03-entrance-northbound",
        "  to delete: 12,345",
        "  size: 38.2 GiB",
    ]
    assert "  recorded (site-local): 2025-11-01 12:13 – 2026-05-15 18:13" in lines


# ---- status ------------------------------------------------------------------------------------
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=ZoneInfo("Asia/Shanghai"))


def _status(**over: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "ok": True,
        "attention": [],
        "time": NOW.isoformat(),
        "config": "/etc/nvr-guard/config.yaml",
        "sites": {
            "toll": {
                "rule": "keep=15d min_keep=none",
                "segments": 1204,
                "bytes": 38 * 2**30,
                "oldest": (NOW - timedelta(days=15, minutes=45)).isoformat(),
                "newest": (NOW - timedelta(seconds=40)).isoformat(),
                "oldest_expires": (NOW - timedelta(minutes=45)).isoformat(),
                "oldest_past_rule": True,
                "disk_free_fraction": 0.311,
            }
        },
        "holds": [],
        "holds_not_shown": [],
        "blocked_sweeps": [],
        "last_sweep": {
            "id": 17,
            "state": "done",
            "time": (NOW - timedelta(minutes=4)).isoformat(),
            "deleted": 3,
            "bytes": 3000,
        },
        "audit": {"ok": True, "entries": 42, "problem": None},
        "violations": [],
        "violations_not_shown": 0,
        "open_requests": {"pending": [], "expiring": [], "overdue": []},
        "last_scans": [],
        "retention": {"deleted": 3, "last_sweep_lateness_max": 33242929.0, "guard_trips": {}},
        "export_key": {"fingerprint": "SHA256:abc"},
        "daemon": {"pid": 1, "uptime": 5400.0, "last_error": None},
    }
    st.update(over)
    return st


def _printed(st: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    print_status(st)
    return capsys.readouterr().out


def test_status_shows_times_and_durations_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    text = _printed(_status(), capsys)
    assert text.splitlines()[0] == "nvr-guard: OK"
    assert "2026-11-30 12:00:00 +08:00" in text
    assert "oldest recorded 2026-11-15 11:15 +08:00 (15 d ago)" in text
    assert "due for deletion 45 min ago" in text
    assert "newest recorded 2026-11-30 11:59 +08:00 (40 s ago)" in text
    assert "last sweep 17: done 2026-11-30 11:56 +08:00 (4 min ago)" in text
    assert "at most 384 d 18 h late" in text and "33242929" not in text
    assert "since start (90 min ago)" in text


def test_status_lists_why_it_is_not_ok_first(capsys: pytest.CaptureFixture[str]) -> None:
    msg = (
        "camera cam1 (site toll): ... Review with `nvr-guard retention plan --site toll`, then "
        "`nvr-guard retention confirm SWEEP_ID` (`nvr-guard retention run` gives the sweep id)."
    )
    st = _status(
        ok=False,
        blocked_sweeps=[{"id": 18, "message": msg}],
        attention=[{"kind": "unmatched", "site": "toll", "message": "40 files ..."}],
        violations=["request 4: emergency export not completed within 24 h"],
    )
    why = not_ok_reasons(st)
    assert len(why) == 3
    assert why[0].startswith("sweep 18 blocked:") and "`nvr-guard retention confirm 18`" in why[0]
    assert why[1].startswith("violation: request 4")
    assert why[2] == "attention (unmatched, site toll): 40 files ..."
    text = _printed(st, capsys)
    lines = text.splitlines()
    assert lines[0] == "nvr-guard: ATTENTION (3)"
    assert [ln.strip() for ln in lines[2:5]] == [f"- {w}" for w in why]


def test_status_exits_1_while_not_ok(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvr_guard.cli import status_cmd

    answers = iter([_status(ok=False, attention=[{"kind": "x", "site": None, "message": "m"}])] * 2
                   + [_status()] * 2)  # fmt: skip
    monkeypatch.setattr(status_cmd, "daemon_call", lambda *a, **k: next(answers))
    for args, want in (((), 1), (("--json",), 1), ((), 0), (("--json",), 0)):
        r = site.run(*args, "status")
        assert r.returncode == want, (args, r.stdout, r.stderr)
    # no daemon at all: 1 as before, and --json says why
    monkeypatch.undo()
    r = site.run("--json", "status")
    assert r.returncode == 1 and "error" in json.loads(r.stdout)


def test_local_time_helpers() -> None:
    ts = datetime(2026, 3, 1, 23, 5, tzinfo=UTC).timestamp()
    assert local(ts, SH) == "2026-03-02 07:05 +08:00"
    assert local(ts, ZoneInfo("America/St_Johns")) == "2026-03-01 19:35 -03:30"
    assert local_iso("2026-03-02T07:05:09+08:00", seconds=True) == "2026-03-02 07:05:09 +08:00"
    assert local_iso(None) == "-"
    assert span(ts, ts + 3600, SH) == "2026-03-02 07:05 – 08:05"
    assert span(ts, ts + 40 * 86400, SH) == "2026-03-02 07:05 – 04-11 07:05"
    assert span(ts, ts + 400 * 86400, SH) == "2026-03-02 07:05 – 2027-04-06 07:05"
    assert when(-2700) == "45 min ago" and when(3 * 86400 + 7200) == "in 3 d 2 h"


# ---- log lines ---------------------------------------------------------------------------------
def _line(fmt: logging.Formatter) -> str:
    rec = logging.LogRecord("nvr_guard", logging.WARNING, __file__, 1, "disk %s", ("low",), None)
    return fmt.format(rec)


def test_log_lines_on_a_terminal_have_no_priority_prefix() -> None:
    master, slave = pty.openpty()
    r, w = os.pipe()  # stands for the journal's stream, which the terminal is not
    try:
        # a terminal opened from a desktop session inherits the session's JOURNAL_STREAM
        st = os.fstat(w)
        inherited = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        for env in ({}, inherited):
            assert not stderr_is_journal(env, slave)
            line = _line(log_formatter(env, slave))
            assert not line.startswith("<") and "WARNING disk low" in line
    finally:
        for fd in (master, slave, r, w):
            os.close(fd)


def test_log_lines_to_the_journal_or_a_pipe_keep_priorities() -> None:
    r, w = os.pipe()
    try:
        st = os.fstat(w)
        journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(journal, w)
        assert _line(log_formatter(journal, w)) == "<4>disk low"
        assert _line(log_formatter({}, w)) == "<4>disk low"  # a pipe or a file: prefixes too
        assert not stderr_is_journal({"JOURNAL_STREAM": "x:y"}, w)
    finally:
        os.close(r)
        os.close(w)


def test_reconcile_stats_read_as_words() -> None:
    s = ReconcileStats(added=240, files=240, dirs=305, seconds=0.05, unmatched=2)
    text = f"{s}"
    assert "ReconcileStats(" not in text and "=" not in text
    assert text == (
        "240 segment files (240 added, 0 updated, 0 removed), 0 ignored, 2 unmatched, "
        "305 directories in 0.1 s"
    )


# ---- the printed approval record ---------------------------------------------------------------
def test_approval_record_shows_the_scan_and_times_for_people() -> None:
    from nvr_guard.export.form import approval_record_html

    finished = datetime(2026, 11, 28, 6, 25, 30, tzinfo=UTC).timestamp()
    scan = {
        "id": 5, "target_path": "/media/stick", "started": finished - 30,
        "finished": finished, "engine": "clamscan", "engine_version": "1.0.7",
        "signature_version": "27450", "signature_date": "Sat Nov 28 09:21:05 2026",
        "files": 12, "bytes": 3 * 2**20, "duration": 30.0, "result": "clean",
        "listing_fingerprint": "ab" * 32, "device_identity": "usb-1", "media_id": "usb-1",
        "infected": [], "errors": [], "content_digest": "cd" * 32,
        "started_iso": "2026-11-28T06:25:00+00:00", "finished_iso": "2026-11-28T06:25:30+00:00",
    }  # fmt: skip
    request = {
        "id": 7, "recipient": {}, "from": "2026-11-28T10:00:00+08:00",
        "to": "2026-11-28T11:00:00+08:00", "created": "2026-11-28T13:00:00+08:00",
    }  # fmt: skip
    approvals = [{"approver": "bob", "role": "security_lead", "decision": "approve",
                  "time": "2026-11-28T13:30:00+08:00"}]  # fmt: skip
    info = {
        "package": "NVRG-7-20261128T063000Z", "technician": "tom",
        "exported": "2026-11-28T14:30:00+08:00",
        "range": "2026-11-28T10:00:00+08:00 – 2026-11-28T11:00:00+08:00",
        "clips": [], "signer": "SHA256:x", "audit_head": {"seq": 9, "hash": "h"},
        "destination": {"path": "/media/stick", "scan": scan},
    }  # fmt: skip
    page = approval_record_html(request, approvals, info, tz=SH)
    cell = page.split("Malware scan</th><td>")[1].split("</td>")[0]
    assert "{" not in cell and "listing_fingerprint" not in cell and "engine_version" not in cell
    for shown in (
        "clamscan 1.0.7", "27450 (Sat Nov 28 09:21:05 2026)", "12 个文件 files, 3.0 MiB",
        "无病毒 clean", "2026-11-28 14:25:30 +08:00", "#5",
    ):  # fmt: skip
        assert shown in cell, (shown, cell)
    # site-local with the offset everywhere; the package name stays UTC, and says so
    for shown in (
        "2026-11-28 10:00:00 +08:00", "2026-11-28 13:00:00 +08:00", "2026-11-28 13:30:00 +08:00",
        "2026-11-28 14:30:00 +08:00", "2026-11-28 10:00:00 +08:00 – 2026-11-28 11:00:00 +08:00",
    ):  # fmt: skip
        assert shown in page, shown
    assert "T10:00:00+08:00" not in page
    pkg = page.split("Package</th><td>")[1].split("</td>")[0]
    assert pkg.startswith("NVRG-7-20261128T063000Z<br>") and "UTC" in pkg


def test_hold_list_is_one_line_per_hold_with_site_local_times(site: Site, now: datetime) -> None:
    write_segment(site.root, "cam1", now - timedelta(days=2))
    r = site.run(
        "hold", "add", "--camera", "cam1", "--from", "2026-01-01T00:00", "--to",
        "2026-01-02T12:30", "--until", "30d", "--reason", "case [red]17[/red]",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = site.run("hold", "list")
    assert shown.returncode == 0, shown.stderr
    (line,) = [ln for ln in shown.stdout.splitlines() if ln.startswith("  hold ")]
    assert "(manual) toll/cam1: 2026-01-01 00:00 +08:00 – 2026-01-02 12:30 +08:00, until " in line
    assert line.endswith("; by root: case [red]17[/red]")  # as typed, never read as markup


def test_what_the_purge_skipped_is_not_shown_as_deleted(capsys: pytest.CaptureFixture[str]) -> None:
    # a sweep's summary counts what was removed: a file the purge skipped (changed since it was
    # planned) is held back, named on stderr, in the summary from items and from the daemon
    from nvr_guard.cli.base import Ctx
    from nvr_guard.cli.retention_cmd import print_outcome
    from nvr_guard.model import Action, Item, Segment
    from nvr_guard.retention.sweeper import summarize

    segs = [
        Segment("toll", "cam1", f"/r/cam1/{i}.mp4".encode(), 1e9 + i, 1e9 + i, 10) for i in range(4)
    ]
    items = [Item(s, Action.DELETE, "expired: x") for s in segs]
    skipped = [{"path": "/r/cam1/3.mp4", "reason": "changed since planned"}]
    res = {
        "sweep": 7,
        "deleted": 3,
        "items": [i.as_json() for i in items],
        "skipped": skipped,
        "trips": [],
        "alerts": [],
    }
    [row] = summarize(items, done=True, skipped={segs[3].path})
    assert (row["due"], row["bytes"], row["kept"]) == (3, 30, {"skipped": 1})
    for shown in (res, {**res, "items": [], "summary": [row]}):
        print_outcome(Ctx("/dev/null", False, 0), shown, "sweep 7", done=True)
        out, err = capsys.readouterr()
        line = next(ln for ln in out.splitlines() if "cam1" in ln)
        assert line.split()[2] == "3" and "skipped 1" in line, out
        assert "deleted 3, to delete 3, held back 1" in out
        assert "skipped: 1 file(s)" in err and "/r/cam1/3.mp4" in err
