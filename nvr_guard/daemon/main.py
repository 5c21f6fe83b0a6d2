"""`nvr-guard daemon`: scheduler, watcher, control socket, systemd notification, signals.

Life cycle: load the config (refuse to start on any error) -> open the state -> control socket ->
cold reconcile -> watcher -> scheduler -> READY=1. SIGHUP reloads (validate first, keep the old
config on error), SIGTERM/SIGINT stop within a few seconds. Work happens in scheduler and socket
threads; the main thread only waits for signals and feeds the systemd watchdog while the scheduler
is alive, so a wedged daemon is restarted by systemd rather than silently doing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from nvr_guard import attention
from nvr_guard.config import Config, load_config
from nvr_guard.daemon import sdnotify
from nvr_guard.daemon.commands import Context, dispatch
from nvr_guard.daemon.control import OnBehalf
from nvr_guard.daemon.websessions import WebSessions
from nvr_guard.engine import Engine, StateLock
from nvr_guard.errors import ConfigError, InvalidInput, NvrGuardError, PolicyRefused, SessionEnded
from nvr_guard.identity import Caller
from nvr_guard.logs import InertFormatter
from nvr_guard.store.audit import AuditHeadMismatch

# how long a starting daemon waits for local root commands still acting on the state
STATE_LOCK_WAIT = 30.0
# seconds a thread holds the interpreter lock before another may take it (run_daemon)
SWITCH_INTERVAL = 0.001

log = logging.getLogger("nvr_guard.daemon.main")

# syslog priorities, so journald keeps the level of each line (sd-daemon(3) prefixes)
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _PriorityFormatter(InertFormatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{super().format(record)}"


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal: ``JOURNAL_STREAM`` names its
    ``device:inode``. The variable alone proves nothing: a terminal opened from a desktop session
    (itself started by systemd) inherits it, and its lines must not start with ``<6>``."""
    raw = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = raw.partition(":")
    try:
        st = os.fstat(fd)
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def log_formatter(environ: Mapping[str, str] | None = None, fd: int = 2) -> logging.Formatter:
    """How the daemon's log lines look on ``fd``.

    - the journal (``JOURNAL_STREAM`` matches ``fd``): ``<4>message`` — journald reads the
      priority prefix and stores the level; it adds the time itself;
    - a terminal (``nvr-guard daemon`` in the foreground): ``12:16:31 WARNING message``, no
      prefixes, which a person would have to read past;
    - anything else (a pipe, a file, a supervisor that is not systemd, an older systemd that sets
      no ``JOURNAL_STREAM``): the priority prefixes, which syslog-style readers understand and
      which keep the level in a file that is later fed to the journal.
    """
    if not stderr_is_journal(environ, fd) and os.isatty(fd):
        return InertFormatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S")
    return _PriorityFormatter("%(message)s")


def setup_logging(verbose: int) -> None:
    """Log to stderr: with times on a terminal, with syslog priorities to the journal."""
    handler = logging.StreamHandler(sys.stderr)
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file: never a terminal
        fd = -1
    handler.setFormatter(log_formatter(fd=fd))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _seconds(d: Any) -> float:
    return float(d.seconds + d.months * 30 * 86400)


class Daemon:
    """One nvr-guard daemon: its engine, control socket, watcher, scheduler and metrics."""

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.wake = threading.Event()
        self.engine: Engine | None = None
        self.server: Any = None
        self.watcher: Any = None
        self.scheduler: BackgroundScheduler | None = None
        self.started = time.time()
        self.last_error: str | None = None
        # job -> its failure, until that job next succeeds: another job's success (the 10 s
        # incremental rescan) must not hide a sweep that keeps failing
        self.job_errors: dict[str, str] = {}
        self.rescan_wanted = threading.Event()
        self.metrics: Any = None  # nvr_guard.daemon.metrics.Exporter when metrics: is configured
        self._refusal_queue: queue.Queue[tuple[str, str, str, dict[str, Any]] | None] = (
            queue.Queue()
        )
        self._refusal_writer = threading.Thread(
            target=self._write_refusals, name="refusal-writer", daemon=True
        )
        self.state_lock: StateLock | None = None
        # SIGHUP (main thread) and `nvr-guard reload` (a socket thread) take turns
        self._reload_lock = threading.Lock()
        # the web console's sessions and login lockout (limits from web:, set at start/reload)
        self.web_sessions = WebSessions(idle=900, limit=43200, max_failures=5, lockout=900)
        self._console: frozenset[int] = frozenset()

    # ---- start / stop --------------------------------------------------------------------------
    def start(self) -> None:
        """Load the config (refusing a bad one), take the state, serve, reconcile, schedule."""
        config = load_config(self.config_path)  # ConfigError -> refuse to start
        # the state is this daemon's alone for its whole life: a local root command acts on it
        # only while no daemon holds this lock (see StateLock)
        self.state_lock = StateLock(config.state_dir)

        def waiting() -> None:
            log.warning("waiting for local nvr-guard commands to finish with %s", config.state_dir)
            sdnotify.status(f"waiting for local commands to finish with {config.state_dir}")

        self.state_lock.acquire_for_daemon(STATE_LOCK_WAIT, waiting)
        self.engine = engine = Engine(config)
        self._configure_web(config)
        try:
            engine.audit.append(
                "nvr-guard", "config.load", str(config.source_path), {"digest": config.digest}
            )
            engine.audit.append("nvr-guard", "daemon.start", "daemon", {"pid": os.getpid()})
        except AuditHeadMismatch as e:
            # run anyway, so status and the attention entry tell the admin; every audited
            # change (deletions included) is refused until the log is re-anchored
            log.error("%s", e)
        engine.ensure_signing_key()  # its fingerprint is on record before any export
        try:  # an export killed with its daemon left a hidden temporary on its target
            engine.workflow.remove_stale_exports()
        except Exception:  # never a reason not to start retention
            log.exception("removing interrupted exports")
        try:  # packages exported before copies were recorded end at target_keep too
            engine.workflow.copies.adopt()
        except Exception:
            log.exception("recording the copies of earlier exports")
        self._start_server(config)
        sdnotify.status("reconciling recording roots")
        t0 = time.monotonic()
        stats = engine.reconcile(full=True)
        log.info("start-up reconcile: %s (%.1f s in all)", stats, time.monotonic() - t0)
        self._start_watcher()
        self._start_scheduler(config)
        self._start_metrics()
        sdnotify.ready()
        self._status_line()
        log.info("nvr-guard ready: %d sites, control socket %s", len(config.sites), config.socket)

    def _start_server(self, config: Config) -> None:
        from nvr_guard.daemon.control import ControlServer

        sock = Path(config.socket)
        sock.parent.mkdir(parents=True, exist_ok=True)
        if not self._refusal_writer.is_alive():
            self._refusal_writer.start()
        self.server = ControlServer(
            sock,
            config.socket_group,
            self.handle,
            admit=self._admit,
            on_refusal=self._record_refusal,
            behalf=self._behalf,
            exempt=lambda who: who.uid in self._console_uids(),
        )
        self.server.start()

    def _configure_web(self, config: Config) -> None:
        self._console = self._lookup_console_uids(config)
        web = config.web
        if web is not None:
            self.web_sessions.configure(
                idle=_seconds(web.idle_timeout),
                limit=_seconds(web.session_limit),
                max_failures=web.max_failures,
                lockout=_seconds(web.lockout),
            )

    def _console_uids(self) -> frozenset[int]:
        """The uids of the web console's gateway and password helper (looked up at start and
        at each reload, not in the accept loop)."""
        return self._console

    @staticmethod
    def _lookup_console_uids(config: Config) -> frozenset[int]:
        web = config.web
        uids: set[int] = set()
        if web is not None:
            for name in (web.gateway_user, web.auth_user):
                with contextlib.suppress(KeyError):
                    uids.add(pwd.getpwnam(name).pw_uid)
        return frozenset(uids)

    def _behalf(self, peer: Caller, on_behalf: OnBehalf) -> Caller:
        """The person a gateway acts for: only web.gateway_user may ask, only through a live
        session the password helper opened; the person's groups are looked up now."""
        engine = self.engine
        assert engine is not None
        web = engine.config.web
        if web is None:
            raise PolicyRefused("the web console is not configured (no web: in the config)")
        try:
            gateway_uid = pwd.getpwnam(web.gateway_user).pw_uid
        except KeyError:
            raise PolicyRefused(
                f"web.gateway_user {web.gateway_user!r} does not exist on this host"
            ) from None
        if peer.uid != gateway_uid:
            raise PolicyRefused(
                f"{peer.user} (uid {peer.uid}) is not the web gateway ({web.gateway_user}); "
                "only it may act on behalf of a logged-in person"
            )
        session = self.web_sessions.resolve(on_behalf.session)
        if session is None:
            raise SessionEnded("session ended or unknown; log in again")
        try:
            return Caller.acting_for(session.user, "web", on_behalf.client, session.sid)
        except KeyError:
            self.web_sessions.close(on_behalf.session)
            raise SessionEnded(f"account {session.user} no longer exists") from None

    def _admit(self, who: Caller) -> str | None:
        """Checked when a connection is accepted: someone the config gives no role is turned
        away at once (and the refusal recorded) instead of holding a slot."""
        engine = self.engine
        assert engine is not None
        if engine.roles_for(who) or who.uid == os.getuid() or who.uid in self._console_uids():
            # the daemon's own account comes in only for `reload` (ExecReload=); dispatch
            # refuses it everything else that needs a role
            return None
        return (
            f"{who.user} (uid {who.uid}) has no role in {engine.config.source_path}; "
            "an admin adds people under `people:`"
        )

    def _record_refusal(self, peer: Caller, details: dict[str, Any]) -> None:
        """Every refusal the control socket gives, into the audit log (rate-limited per uid by
        the server; a summary entry counts what was not recorded singly)."""
        engine = self.engine
        if engine is None:
            return
        user = peer.user
        cmd = details.get("cmd")
        if "suppressed" in details:
            action, obj = "control.refusals_suppressed", "control"
        elif cmd == "(connect)":
            action, obj = "access.denied", "control.connect"
        elif cmd == "(busy)":
            action, obj = "control.refused", "control.busy"
        else:
            action, obj = "control.refused", str(cmd or "control")
        extra: dict[str, Any] = {"uid": peer.uid, "pid": peer.pid}
        if peer.via is not None:  # refused for a person a gateway acted for: on record as theirs
            extra.update(via=peer.via, client=peer.client or "")
        # queued: the accept thread must never wait for the engine lock (a sweep may hold it)
        self._refusal_queue.put((user, action, obj, {**extra, **details}))

    def _write_refusals(self) -> None:
        """Writer thread of the refusal records; ends after the stop sentinel, queue drained."""
        while True:
            item = self._refusal_queue.get()
            if item is None:
                return
            engine = self.engine
            if engine is None:
                continue
            try:
                with engine.lock:
                    engine.audit.append(*item)
            except Exception:
                log.exception(
                    "recording a control refusal failed: %s %s on %s", item[0], item[1], item[2]
                )

    def _start_watcher(self) -> None:
        from nvr_guard.retention.watch import Watcher

        assert self.engine is not None
        try:
            self.watcher = Watcher(self.engine.scanner, self.engine.site_scans(), self._overflow)
            self.watcher.start()
        except OSError as e:  # no inotify (watch limit, unsupported fs): rescans do the work
            log.warning("file watcher unavailable (%s); relying on periodic rescans", e)
            self.watcher = None

    def _start_metrics(self) -> None:
        from nvr_guard.daemon.metrics import Exporter

        assert self.engine is not None
        try:
            self.metrics = Exporter.from_config(self.engine)
            if self.metrics is not None:
                self.metrics.start()
        except Exception:  # metrics are informative: never a reason not to run retention
            log.exception("metrics unavailable")
            self.metrics = None

    def _update_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.update()

    def _overflow(self) -> None:
        log.warning("file events were lost (inotify overflow or watch limit); rescanning")
        self.rescan_wanted.set()

    def _start_scheduler(self, config: Config) -> None:
        sched = BackgroundScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 60}
        )
        now = datetime.now()
        sched.add_job(
            self._job_sweep,
            "interval",
            seconds=_seconds(config.sweep_every),
            id="sweep",
            next_run_time=now,
        )
        sched.add_job(
            self._job_rescan,
            "interval",
            seconds=_seconds(config.rescan_every),
            id="rescan",
            next_run_time=now + timedelta(seconds=_seconds(config.rescan_every)),
        )
        sched.add_job(self._job_disk, "interval", seconds=60, id="disk")
        sched.add_job(self._job_requests, "interval", seconds=60, id="requests", next_run_time=now)
        sched.add_job(self._job_incremental, "interval", seconds=10, id="incremental")
        sched.add_job(self._job_audit, "interval", seconds=30, id="audit", next_run_time=now)
        sched.start()
        self.scheduler = sched

    def stop(self) -> None:
        """Stop every part, record the stop, and release the state last."""
        sdnotify.stopping()
        if self.watcher is not None:
            try:
                self.watcher.stop()
            except Exception:  # stopping must go on whatever a part does
                log.exception("stopping the watcher")
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.server is not None:
            self.server.stop()  # flushes the suppressed-refusal counts into the queue
        if self._refusal_writer.is_alive():
            self._refusal_queue.put(None)
            self._refusal_writer.join(8)
        if self.metrics is not None:
            self.metrics.stop()
        if self.engine is not None and self.engine.lock.acquire(timeout=8):
            try:
                self.engine.audit.append("nvr-guard", "daemon.stop", "daemon", {"pid": os.getpid()})
            except AuditHeadMismatch as e:  # stopping goes on; the attention state said why
                log.error("%s", e)
            finally:
                self.engine.lock.release()
        if self.state_lock is not None:
            self.state_lock.close()  # last: nothing of this daemon touches the state after it
        log.info("nvr-guard stopped")

    # ---- jobs ----------------------------------------------------------------------------------
    def _guarded(self, name: str, fn: Any) -> None:
        try:
            fn()
            self.job_errors.pop(name, None)
        except (
            Exception
        ) as e:  # a failed job is logged and retried next time; deletion fails closed
            why = str(e)
            trace = not isinstance(e, NvrGuardError)
            if isinstance(e, sqlite3.OperationalError) and "full" in why and self.engine:
                trace = False  # a known condition, repeated every sweep: one line is enough
                # SQLite says "database or disk is full": name the disk and what it stops
                why = (
                    f"state_dir {self.engine.config.state_dir} is full ({why}); "
                    "no deletion until space returns"
                )
            self.job_errors[name] = f"{name}: {why}"
            log.error("%s failed: %s", name, why, exc_info=trace)
        finally:
            self.last_error = "; ".join(self.job_errors.values()) or None
            self._status_line()

    def _job_sweep(self) -> None:
        assert self.engine is not None

        def run() -> None:
            assert self.engine is not None
            out = self.engine.sweep()
            self.last_sweep = out

        self._guarded("sweep", run)
        self._update_metrics()

    def _job_rescan(self) -> None:
        assert self.engine is not None
        self._guarded("rescan", lambda: self.engine.reconcile(full=True) if self.engine else None)
        self._update_metrics()

    def _job_incremental(self) -> None:
        assert self.engine is not None
        full = self.rescan_wanted.is_set()
        self.rescan_wanted.clear()
        self._guarded("rescan", lambda: self.engine.reconcile(full=full) if self.engine else None)

    def _job_requests(self) -> None:
        engine = self.engine
        assert engine is not None
        self._guarded("requests", lambda: engine.workflow.refresh())
        # packages on export targets past export.target_keep: destroyed, with receipts
        self._guarded("copies", lambda: engine.workflow.copies.destroy_due())
        self._update_metrics()

    def _job_audit(self) -> None:
        # the whole chain before status would have to walk it itself (ChainWatch.full_every)
        engine = self.engine
        assert engine is not None

        def run() -> None:
            age = engine.chain.full_age()
            if age is None or not 0 <= age < engine.chain.full_every - 60:
                report = engine.chain.check(full=True)
                if not report.ok:
                    log.error("audit chain check failed: %s", report.problem)

        self._guarded("audit", run)

    def _job_disk(self) -> None:
        assert self.engine is not None
        engine = self.engine
        states = engine.disk_states()
        short = [s for s, d in states.items() if d.bytes_to_free(engine.rules[s].min_free) > 0]
        if short:
            log.warning("disk below min_free for %s: sweeping now", ", ".join(short))
            self._job_sweep()

    def _status_line(self) -> None:
        if self.engine is None:
            return
        try:
            n = self.engine.catalog.count()
            sdnotify.status(
                f"{n} segments catalogued"
                + (f"; last error: {self.last_error}" if self.last_error else "")
            )
        except Exception:  # status is informative only
            pass

    # ---- reload --------------------------------------------------------------------------------
    def reload(self, actor: str = "nvr-guard") -> dict[str, Any]:
        """Validate and apply the config file; on any error keep the old config in force and
        raise the ``reload_refused`` attention state until a good config is loaded (a refused
        reload must not look like success). Returns ``{applied, errors, digest}``."""
        with self._reload_lock:
            return self._reload(actor)

    def _reload(self, actor: str) -> dict[str, Any]:
        assert self.engine is not None
        sdnotify.reloading()
        problem = self.engine.audit.anchor_problem()
        if problem is not None:  # no config change that the audit log cannot record
            log.error("reload refused (old config stays): audit log refuses appends: %s", problem)
            msg = f"the audit log refuses appends, so no config change can be recorded: {problem}"
            self.engine.attention.raise_(
                attention.RELOAD_REFUSED,
                None,
                "config",
                f"reload refused, the previous config stays in force: {msg}",
            )
            sdnotify.ready()
            return {
                "applied": False,
                "errors": [msg],
                "digest": self.engine.config.digest,
                "config": self.config_path,
            }
        try:
            new = load_config(self.config_path)
            # checks that need the state: an active hold must keep matching a site
            problems = self.engine.hold_problems(new)
            if problems:
                raise ConfigError(problems)
        except ConfigError as e:
            for line in e.lines():
                log.error("reload refused: %s", line)
            self.engine.audit.append(
                actor,
                "config.reload_failed",
                self.config_path,
                {"errors": e.lines(), "kept_digest": self.engine.config.digest},
            )
            first = e.lines()[0] if e.lines() else str(e)
            more = f" (and {len(e.lines()) - 1} more)" if len(e.lines()) > 1 else ""
            self.engine.attention.replace(
                attention.RELOAD_REFUSED,
                None,
                [
                    (
                        "config",
                        f"reload refused, the previous config stays in force: {first}{more}; "
                        f"fix it, check with `nvr-guard config check`, then reload again",
                        {"errors": e.lines(), "kept_digest": self.engine.config.digest},
                    )
                ],
            )
            sdnotify.ready()
            return {
                "applied": False,
                "errors": e.lines(),
                "digest": self.engine.config.digest,
                "config": self.config_path,
            }
        old = self.engine.config
        if Path(new.state_dir) != Path(old.state_dir) or Path(new.socket) != Path(old.socket):
            log.warning("state_dir and socket changes take effect at the next restart")
        details = self.engine.apply_config(new, actor)
        self._configure_web(new)
        self.engine.attention.clear(attention.RELOAD_REFUSED)
        log.info(
            "config reloaded (%s -> %s); changed sites: %s",
            details["old_digest"][:12],
            details["new_digest"][:12],
            ", ".join(details["changed_sites"]) or "none",
        )
        if self.watcher is not None:
            self.watcher.stop()
        self._start_watcher()
        if new.metrics != old.metrics:
            if self.metrics is not None:
                self.metrics.stop()
            self._start_metrics()
        if self.scheduler is not None:
            for job, every in (("sweep", new.sweep_every), ("rescan", new.rescan_every)):
                if self.scheduler.get_job(job) is not None:
                    self.scheduler.reschedule_job(job, trigger="interval", seconds=_seconds(every))
        sdnotify.ready()
        return {"applied": True, "errors": [], "digest": new.digest, "config": self.config_path}

    # ---- control socket ------------------------------------------------------------------------
    def context(self) -> Context:
        """What the command handlers of this daemon work with: its engine, reload and health."""
        assert self.engine is not None
        return Context(
            self.engine,
            reload=self.reload,
            started=self.started,
            last_error=lambda: self.last_error,
            web=self.web_sessions,
        )

    def handle(self, peer: Caller, cmd: str, args: dict[str, Any]) -> Any:
        """Serve one control request of ``peer`` from the command table (``commands.dispatch``)."""
        try:
            # the names cached at connect only decide admission; every command is judged on
            # the groups the user has now (a revoked group must stop working at once)
            return dispatch(self.context(), peer.refreshed(), cmd, args)
        except NvrGuardError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            # almost always a hand-made request with a missing or mistyped argument (the CLI
            # never sends one): the caller's mistake, exit 2; the log keeps the trace in case not
            log.warning("control: %s with bad arguments", cmd, exc_info=True)
            raise InvalidInput(
                f"{cmd}: missing or malformed argument ({type(exc).__name__}: {exc})"
            ) from None


def run_daemon(config_path: str, verbose: int = 0) -> int:
    """Run a daemon in the foreground until SIGTERM/SIGINT; the process's exit code."""
    setup_logging(verbose)
    # the commands people wait for are answered beside long CPU-bound work in this process (a
    # purge's catalog and receipts, a reconcile): each of a command's dozen hand-offs of the
    # interpreter lock waits up to this long behind it (Python's default: 5 ms)
    sys.setswitchinterval(SWITCH_INTERVAL)
    d = Daemon(config_path)

    def on_term(signum: int, frame: Any) -> None:
        d.stop_event.set()
        d.wake.set()

    def on_hup(signum: int, frame: Any) -> None:
        d.reload_event.set()
        d.wake.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        d.start()
    except ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        print("nvr-guard: refusing to start with an invalid config", file=sys.stderr)
        return 2
    except NvrGuardError as e:
        log.error("cannot start: %s", e)
        d.stop()
        return e.exit_code
    wd = sdnotify.watchdog_interval()
    tick = min(wd / 2, 5.0) if wd else 5.0
    try:
        while not d.stop_event.is_set():
            d.wake.wait(tick)
            d.wake.clear()
            if d.stop_event.is_set():
                break  # a HUP that arrived together with TERM is moot
            if d.reload_event.is_set():
                d.reload_event.clear()
                d.reload()
            if d.scheduler is not None and d.scheduler.running:
                sdnotify.watchdog()
    finally:
        d.stop()
    return 0
