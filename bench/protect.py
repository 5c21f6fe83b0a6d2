"""Protected-export benchmark: a masked export against the unmasked one, and the cost of sealing.

    python bench/protect.py [--dir /tmp/nvrg-bench-export] [--runs 2] [--preset veryfast] [--quick]

Uses the export benchmark's footage (``bench/export.py``: 10 minutes of 720p25 testsrc2 with
temporal noise and a sine audio track, 1-minute segments) and exports the same 7 minutes
(``--quick``: 84 s) four ways in one run, alternating so other load on the machine falls on every
side alike:

- plain: ``run_export`` with no privacy zones (the baseline);
- masked: the same with three zones — two rectangles and a polygon (drawn through a mask image);
- passphrase: the plain export sealed into a 7z AES-256 archive (staging, seal, read-back);
- recipient: the plain export sealed with ``openssl cms`` to an RSA-3072 certificate.

Printed: the best wall time of each, and the ratios masked / plain (goal <= 1.3) and sealed /
plain, with the peak RSS of this process (the seal streams; the encoders are child processes).
Exit status 0 unless the benchmark itself crashes: PASS/FAIL is information, not a test.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export import FONT, T0, TEMPLATE, TZ, make_source  # noqa: E402

from nvr_guard.export import (  # noqa: E402
    DirectoryDestination,
    ExportJob,
    SourceSegment,
    load_or_create_key,
    run_export,
)
from nvr_guard.export.keys import load_recipient_cert  # noqa: E402
from nvr_guard.export.protect import (  # noqa: E402
    Seal,
    new_passphrase,
    run_sealed_export,
    staging_dir,
)
from nvr_guard.export.zones import zones_from  # noqa: E402

ZONES = zones_from(
    [
        [0.62, 0.05, 0.30, 0.22],
        [0.05, 0.55, 0.20, 0.35],
        {"polygon": [[0.40, 0.40], [0.60, 0.42], [0.55, 0.80], [0.38, 0.70]]},
    ],
    "bench",
)


def make_cert(where: Path) -> Path:
    cert = where / "unit-cert.pem"
    if not cert.exists():
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", "30",
             "-keyout", str(where / "unit-key.pem"), "-out", str(cert), "-subj", "/CN=bench unit"],
            check=True, capture_output=True,
        )  # fmt: skip
    return cert


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/nvrg-bench-export"))
    ap.add_argument("--runs", type=int, default=2, help="runs per case (alternating)")
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--quick", action="store_true", help="3-minute source, 84 s export")
    ap.add_argument(
        "--cases",
        default="plain,masked,passphrase,recipient",
        help="which to time, comma-separated (plain is always timed: it is the baseline)",
    )
    args = ap.parse_args(argv)
    wanted = {"plain", *args.cases.split(",")}

    export_s = 84.0 if args.quick else 420.0
    minutes = 3 if args.quick else 10
    src = make_source(args.dir / f"source-{minutes}min", minutes)
    segments = [SourceSegment(p, T0 + 60 * i) for i, p in enumerate(src)]
    start = T0 + 90.48
    key, _ = load_or_create_key(args.dir / "state")
    staging = staging_dir(args.dir / "state")
    cert = load_recipient_cert(make_cert(args.dir / "pki"))

    def job(zones: dict[str, Any]) -> ExportJob:
        return ExportJob(
            request={"id": 1, "requester": "alice", "site": "bench", "cameras": ["gate-01"],
                     "reason": "benchmark", "basis": "none", "format": "mp4",
                     "recipient": {"unit": "lab", "person": "bench", "contact": "-"}},
            approvals=[{"approver": "bob", "role": "manager", "decision": "approve", "note": "",
                        "time": "2025-11-20T09:00:00+08:00"}],
            technician="tom", start=start, end=start + export_s, tz=TZ,
            watermark_template=TEMPLATE, font=FONT, preset=args.preset, zones=zones,
        )  # fmt: skip

    def out(name: str) -> Path:
        d = args.dir / f"out-{name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    clips = [("gate-01", segments)]
    cases: dict[str, Callable[[], Any]] = {
        "plain": lambda: run_export(
            clips, job({}), DirectoryDestination(out("plain")), key, audit_head=(1, "0" * 64)
        ),
        "masked": lambda: run_export(
            clips, job({"gate-01": ZONES}), DirectoryDestination(out("masked")), key,
            audit_head=(1, "0" * 64),
        ),
        "passphrase": lambda: run_sealed_export(
            clips, job({}), DirectoryDestination(out("passphrase")), key,
            seal=Seal("passphrase", passphrase=new_passphrase()), staging=staging,
            audit_head=(1, "0" * 64),
        ),
        "recipient": lambda: run_sealed_export(
            clips, job({}), DirectoryDestination(out("recipient")), key,
            seal=Seal("recipient", cert=cert, unit="bench"), staging=staging,
            audit_head=(1, "0" * 64),
        ),
    }  # fmt: skip
    cases = {name: fn for name, fn in cases.items() if name in wanted}
    print(
        f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}; {len(src)} x 1-min "
        f"720p25 segments; exporting {export_s:.0f} s; libx264 preset={args.preset}; "
        f"{args.runs} run(s) per case, alternating"
    )
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.runs):
        for name, fn in cases.items():
            secs = timed(fn)
            times[name].append(secs)
            print(f"  run {r + 1}: {name:<10} {secs:7.2f} s", flush=True)
    best = {name: min(ts) for name, ts in times.items()}
    plain = best["plain"]
    print()
    for name, b in best.items():
        spread = f"{min(times[name]):.2f}–{max(times[name]):.2f} s"
        print(f"{name:<10} best {b:7.2f} s ({spread}); {b / plain:.3f} x plain")
    if "masked" in best:
        ratio = best["masked"] / plain
        print(
            f"masked / unmasked: {ratio:.3f} (goal <= 1.3) {'PASS' if ratio <= 1.3 else 'FAIL'}; "
            f"{len(ZONES)} zones (2 rectangles, 1 polygon)"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (staging, seal, read-back): {rss:.0f} MB")
    sealed = args.dir / "out-passphrase"
    if "passphrase" in best and sealed.is_dir():
        size = sum(f.stat().st_size for f in sealed.rglob("*") if f.is_file())
        print(f"sealed package size: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
