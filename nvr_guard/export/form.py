"""The printable approval record (调阅监控录像审批表) and VERIFY.txt.

Every value that came from a user (reason, names, recipient, notes …) goes through
``html.escape``: the record is opened in a browser on whatever machine receives the package, and a
request reason must not be able to run script there or rewrite the form.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any

from nvr_guard.text import human_bytes

_CSS = """
body { font-family: "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Microsoft YaHei", sans-serif;
       margin: 2em; color: #000; }
h1 { font-size: 1.4em; text-align: center; margin-bottom: 0.2em; }
p.sub { text-align: center; margin-top: 0; }
table { border-collapse: collapse; width: 100%; margin: 0.8em 0; page-break-inside: avoid; }
th, td { border: 1px solid #000; padding: 0.35em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; width: 22%; font-weight: normal; }
td.hash, code { font-family: monospace; word-break: break-all; font-size: 0.9em; }
.sign { height: 3em; }
.note { font-size: 0.85em; }
.slip { page-break-before: always; break-before: page; }
.phrase { font-family: monospace; font-size: 2em; letter-spacing: 0.1em; padding: 0.6em; }
@media print { body { margin: 1cm; } }
"""


def _e(value: Any) -> str:
    if value is None or value == "":
        return "&nbsp;"
    if isinstance(value, list | tuple):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value)).replace("\n", "<br>")


def _row(zh: str, en: str, value: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<tr><th>{zh}<br>{en}</th><td{attr}>{_e(value)}</td></tr>"


def approval_record_html(
    request: Mapping[str, Any],
    approvals: Sequence[Mapping[str, Any]],
    export_info: Mapping[str, Any] | None,
    signer: str | None = None,
    tz: tzinfo | None = None,
) -> str:
    """Bilingual record of a request, its approvals and (when done) its export and hashes.

    ``export_info`` is None for a form printed before the export (`export form`): the export
    section is then left blank for hand-writing, as on the paper form. ``signer`` is the
    recorder's key fingerprint (taken from ``export_info`` when given): it is printed in the
    export section and on the hand-over slip, because the signed and stamped paper is the channel
    a courier cannot change, and the recipient pins ``nvr-guard verify --fingerprint`` to it.

    Times are printed site-local with their UTC offset (``2026-11-20 14:05:00 +08:00``): the
    ISO 8601 values of the request keep the offset they were written with, and a scan's epoch
    times are shown in ``tz`` (the site's zone; when None, the offset of the export time).
    """
    if export_info is not None and export_info.get("signer"):
        signer = str(export_info["signer"])
    rec = request.get("recipient") or {}
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="zh-CN"><head><meta charset="utf-8">',
        f"<title>调阅监控录像审批表 Approval record — request {_e(request.get('id'))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>调阅监控录像审批表<br>CCTV Footage Retrieval Approval Record</h1>",
        f'<p class="sub">申请编号 Request No. {_e(request.get("id"))}'
        + (" · 紧急调取 EMERGENCY" if request.get("emergency") else "")
        + (" · 调阅（仅查看）VIEWING REQUEST" if request.get("format") == "view" else "")
        + "</p>",
        "<table><caption>申请 Request</caption>",
        _row("申请人", "Requester", request.get("requester")),
        _row("场所", "Site", request.get("site")),
        _row("摄像机", "Cameras", request.get("cameras")),
        _row("调取时段（起）", "From", _when(request.get("from"))),
        _row("调取时段（止）", "To", _when(request.get("to"))),
        _row("调取原因", "Reason / purpose", request.get("reason")),
        _row("法律依据", "Legal basis", request.get("basis")),
        _row("输出格式", "Output format", _format_text(request.get("format"))),
        _row("输出保护", "Protection", _encrypt_text(request)),
        _row(
            "隐私遮挡",
            "Privacy zones",
            _zones_text(request.get("privacy_zones"), request.get("format")),
        ),
        _row("申请时间", "Requested at", _when(request.get("created"))),
        "</table>",
        "<table><caption>接收方 Recipient</caption>",
        _row("接收单位", "Unit", rec.get("unit")),
        _row("接收人", "Person", rec.get("person")),
        _row("联系方式", "Contact", rec.get("contact")),
        "</table>",
        "<table><caption>审批 Approvals</caption>",
        "<tr><th>审批人 Approver</th><th>角色 Role</th><th>意见 Decision</th>"
        "<th>说明 Note</th><th>时间 Time</th></tr>",
    ]
    for a in approvals:
        row = {k: a.get(k) for k in ("approver", "role", "decision", "note", "time")}
        row["decision"] = _decision_text(row["decision"])
        row["time"] = _when(row["time"])
        out.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row.values()) + "</tr>")
    if not approvals:
        out.append('<tr><td class="sign"></td><td></td><td></td><td></td><td></td></tr>')
    out.append("</table>")
    out.append("<table><caption>导出 Export</caption>")
    if export_info is None:
        out.append(_row("签名公钥指纹", "Signer key fingerprint", signer, "hash"))
        for zh, en in (
            ("导出技术人员", "Technician"),
            ("导出时间", "Exported at"),
            ("存储介质", "Storage medium"),
            ("杀毒检查", "Malware scan"),
            ("文件及校验值", "Files and SHA-256"),
        ):
            out.append(f'<tr><th>{zh}<br>{en}</th><td class="sign"></td></tr>')
        out.append("</table>")
    else:
        dest = export_info.get("destination") or {}
        head = export_info.get("audit_head") or {}
        out += [
            _row("导出包", "Package", _package_text(export_info.get("package"))),
            _row("导出技术人员", "Technician", export_info.get("technician")),
            _row("导出时间", "Exported at", _when(export_info.get("exported"))),
            _row("录像时段", "Footage range", _range_text(export_info.get("range"))),
            _row("存储介质", "Storage medium", dest.get("path") or dest.get("device")),
            _row(
                "杀毒检查",
                "Malware scan",
                _scan_text(dest.get("scan"), tz or _zone_of(export_info.get("exported"))),
            ),
            _row("签名公钥指纹", "Signer fingerprint", export_info.get("signer"), "hash"),
            _row("审计日志位置", "Audit head", f"#{head.get('seq')} {head.get('hash')}", "hash"),
            "</table>",
            "<table><caption>文件及校验值 Files and SHA-256</caption>",
            "<tr><th>文件 File</th><th>摄像机 Camera</th><th>时长 Duration</th>"
            "<th>SHA-256</th></tr>",
        ]
        for c in export_info.get("clips") or []:
            gaps = c.get("gaps") or []
            gap_text = "".join(
                f"<br>缺失 gap {_e(_when(g.get('from')))} – {_e(_when(g.get('to')))}" for g in gaps
            )
            for d in c.get("damaged_sources") or []:
                gap_text += (
                    f"<br>损坏 damaged source, left out: {_e(d.get('path'))} ({_e(d.get('error'))})"
                )
            video = c.get("video") or {}
            if video.get("scaled"):
                sizes = ", ".join(video.get("source_sizes") or [])
                gap_text += (
                    f"<br>分辨率变化 resolution changed ({_e(sizes)}): "
                    f"scaled to {_e(video.get('size'))}"
                )
            if c.get("privacy_zones"):
                gap_text += f"<br>隐私遮挡 privacy masking: {_e(c.get('masking'))}" + "".join(
                    f"<br>· {_e(_zone_text(z))}" for z in c["privacy_zones"]
                )
            if c.get("audio_handling"):
                gap_text += f"<br>音频 audio: {_e(c.get('audio_handling'))}"
            if c.get("native_start"):
                gap_text += (
                    f"<br>原始格式起点（关键帧）native copy starts at keyframe "
                    f"{_e(_when(c.get('native_start')))}, "
                    f"{_e(c.get('native_start_early_seconds'))} s before the requested start"
                )
            out.append(
                f"<tr><td>{_e(c.get('file'))}{gap_text}</td><td>{_e(c.get('camera'))}</td>"
                f"<td>{_e(_seconds(c.get('duration')))}</td>"
                f'<td class="hash">{_e(c.get("sha256"))}</td></tr>'
            )
        out.append("</table>")
    out += _sealed_rows(request.get("sealed"), request.get("destroyed"))
    package = export_info.get("package") if export_info is not None else None
    pin = signer or "SHA256:…"
    out += [
        "<table><caption>移交单 Hand-over slip</caption>",
        _row("导出包", "Package", package),
        _row("本机签名公钥指纹", "Recorder key fingerprint", signer, "hash"),
        '<tr><th>交付人 / 时间<br>Handed over by / at</th><td class="sign"></td></tr>',
        '<tr><th>接收人 / 时间<br>Received by / at</th><td class="sign"></td></tr>',
        "</table>",
        '<p class="note">接收方校验：以本纸面记录上的指纹为准，切勿使用导出包内的指纹——'
        "他人重新签名的伪造包会带有他自己的指纹。<br>The recipient checks the package against "
        "the fingerprint on this paper, never the one inside the package (a package re-signed "
        "by someone else carries that person's fingerprint):<br>"
        f"<code>nvr-guard verify {_e(package or 'PACKAGE_DIR')} --fingerprint {_e(pin)}</code>"
        "</p>",
        "<table><caption>签字 Signatures</caption>",
        '<tr><th>申请人 Requester</th><td class="sign"></td></tr>',
        '<tr><th>审批人 Approver(s)</th><td class="sign"></td></tr>',
        '<tr><th>导出人 Technician</th><td class="sign"></td></tr>',
        '<tr><th>接收人 Recipient</th><td class="sign"></td></tr>',
        "</table>",
        '<p class="note">说明：此表为查阅、调取监控录像依据，各级人员应完整填写，交保安部备案；'
        "不得删除任何细节。<br>This record is the basis for viewing and retrieving CCTV footage; "
        "it must be filled in completely and filed with security. No detail may be deleted. "
        "Check the package with <code>nvr-guard verify</code> or the commands in VERIFY.txt.</p>",
    ]
    if request.get("encrypt") == "passphrase":
        # the passphrase is never stored: this page is filled in by hand, or printed by
        # `export run --slip` at the moment of the export
        out += _slip_page(request.get("id"), request.get("sealed"), None)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _encrypt_text(request: Mapping[str, Any]) -> str:
    mode = request.get("encrypt") or "none"
    unit = (request.get("recipient") or {}).get("unit")
    return {
        "none": "无（未加密的导出包）none: a plain package",
        "passphrase": "口令加密 AES-256（7z），口令另行交付 passphrase (AES-256 7z), handed over "
        "separately",
        "recipient": f"按接收单位证书加密（CMS）encrypted to the certificate of {unit}",
    }.get(mode, str(mode))


def _zones_text(zones: Any, fmt: Any = None) -> str:
    if not zones:
        return "无 none"
    listed = "\n".join(
        f"{cam}: " + "; ".join(_zone_text(z) for z in zs) for cam, zs in dict(zones).items()
    )
    if fmt == "native":
        return "未遮挡的原始副本 unmasked native copy: these zones are NOT applied\n" + listed
    return listed


def _sealed_rows(sealed: Any, destroyed: Any) -> list[str]:
    if not sealed and not destroyed:
        return []
    rows = ["<table><caption>加密交付 Protected delivery</caption>"]
    if sealed:
        rows += [
            _row("加密文件", "Sealed file", sealed.get("file")),
            _row("文件 SHA-256", "Its SHA-256", sealed.get("sha256"), "hash"),
            _row("大小", "Size", f"{sealed.get('size')} bytes"),
        ]
        r = sealed.get("recipient")
        if r:
            rows += [
                _row(
                    "接收单位证书", "Recipient certificate", f"{r.get('unit')}: {r.get('subject')}"
                ),
                _row("证书指纹", "Certificate SHA-256", r.get("fingerprint"), "hash"),
                _row("证书有效期", "Valid", f"{r.get('not_before')} – {r.get('not_after')}"),
            ]
        else:
            rows.append(
                _row(
                    "口令",
                    "Passphrase",
                    "另行交付，录像机未保存 handed over separately; not stored",
                )
            )
    if destroyed:
        rows.append(
            _row(
                "副本销毁",
                "Copy destroyed",
                f"{destroyed.get('time')} · {destroyed.get('how')} · {destroyed.get('by')}",
            )
        )
    rows.append("</table>")
    return rows


def _slip_page(rid: Any, sealed: Any, passphrase: str | None) -> list[str]:
    sealed = sealed or {}
    phrase = (
        f'<div class="phrase">{_e(passphrase)}</div>'
        if passphrase
        else '<div class="phrase sign">&nbsp;</div>'
    )
    return [
        '<div class="slip">',
        "<h1>口令单 Passphrase slip</h1>",
        f'<p class="sub">申请编号 Request No. {_e(rid)}</p>',
        "<table>",
        _row("加密文件", "Sealed file", sealed.get("file")),
        _row("文件 SHA-256", "Its SHA-256", sealed.get("sha256"), "hash"),
        "</table>",
        f"<table><caption>口令 Passphrase</caption><tr><td>{phrase}</td></tr></table>",
        '<p class="note">此单须与存储介质分开交付（另一人、另一途径），'
        "接收方核对后销毁。录像机不保存口令。"
        "<br>Hand this slip over apart from the medium (another person or channel); the "
        "recipient destroys it once the package is opened. The recorder does not keep the "
        "passphrase. Open the file with 7-Zip (Windows) or <code>7z x</code> (Linux).</p>",
        "<table><caption>签字 Signatures</caption>",
        '<tr><th>交付人 / 时间<br>Handed over by / at</th><td class="sign"></td></tr>',
        '<tr><th>接收人 / 时间<br>Received by / at</th><td class="sign"></td></tr>',
        "</table>",
        "</div>",
    ]


def passphrase_slip_html(result: Mapping[str, Any]) -> str:
    """The passphrase slip printed by ``export run --slip`` from the export's result: the one
    time the passphrase exists outside the technician's screen, on paper."""
    return (
        "\n".join(
            [
                "<!DOCTYPE html>",
                '<html lang="zh-CN"><head><meta charset="utf-8">',
                f"<title>口令单 Passphrase slip — request {_e(result.get('id'))}</title>",
                f"<style>{_CSS}</style></head><body>",
                *_slip_page(result.get("id"), result.get("sealed"), str(result.get("passphrase"))),
                "</body></html>",
            ]
        )
        + "\n"
    )


_DECISIONS = {"approve": "同意 approved", "approved": "同意 approved", "deny": "不同意 denied",
              "denied": "不同意 denied"}  # fmt: skip


def _zone_text(z: Mapping[str, Any]) -> str:
    if "rect" in z:
        body = "x,y,w,h " + ",".join(f"{v:g}" for v in z["rect"])
    else:
        body = "polygon " + " ".join(f"{x:g},{y:g}" for x, y in z.get("polygon") or [])
    name = f"{z['name']}: " if z.get("name") else ""
    return f"{name}{body} ({z.get('source', '')})"


def _decision_text(decision: Any) -> str:
    return _DECISIONS.get(str(decision), "" if decision is None else str(decision))


def _format_text(fmt: Any) -> str:
    if fmt == "native":
        return (
            "原始格式（无水印证据副本，从请求起点之前最近的关键帧开始）native evidence copy, no "
            "watermark; starts at the keyframe at or before the requested start (the exact time "
            "is in the manifest and the export record)"
        )
    if fmt == "mp4":
        return "MP4（含水印）watermarked MP4"
    if fmt == "view":
        return (
            "调阅（仅在线查看，含查看人水印，不导出）viewing request: watched in the web console, "
            "watermarked with the viewer's name, never exported"
        )
    return "" if fmt is None else str(fmt)


def _when(value: Any) -> Any:
    """An ISO 8601 time with an offset as people read it: ``2026-11-20 14:05:00 +08:00``, in the
    offset it carries (site-local where it was written); anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if dt.tzinfo is None:
        return value
    return _local(dt)


def _local(dt: datetime) -> str:
    off = dt.utcoffset()
    minutes = int(off.total_seconds() // 60) if off is not None else 0
    sign, (h, m) = "+" if minutes >= 0 else "-", divmod(abs(minutes), 60)
    return dt.strftime("%Y-%m-%d %H:%M:%S") + f" {sign}{h:02}:{m:02}"


def _zone_of(value: Any) -> tzinfo | None:
    """The fixed offset an ISO 8601 time was written with (the export time's: the scan ran
    minutes before it, at the same offset but across a DST change)."""
    try:
        return datetime.fromisoformat(str(value)).tzinfo
    except ValueError:
        return None


def _range_text(value: Any) -> Any:
    if isinstance(value, str) and " – " in value:
        a, b = value.split(" – ", 1)
        return f"{_when(a)} – {_when(b)}"
    return value


def _package_text(name: Any) -> str:
    if not name:
        return ""
    return (
        f"{name}\n（目录名中的时间为导出时刻的UTC时间 the time in the directory name is the export "
        "time in UTC, written with Z）"
    )


def _scan_text(scan: Any, tz: tzinfo | None = None) -> str:
    """The scan as a reader checks it: engine and its version, the signatures' version and date,
    what was scanned, the result, and when."""
    if not scan:
        return "无（已配置的目录，非移动介质）none (configured directory, not removable media)"
    if not isinstance(scan, Mapping):
        return str(scan)
    engine = " ".join(str(scan[k]) for k in ("engine", "engine_version") if scan.get(k))
    sigs = str(scan.get("signature_version") or "?")
    if scan.get("signature_date"):
        sigs += f" ({scan['signature_date']})"
    what = f"{scan['files']} 个文件 files" if scan.get("files") is not None else ""
    if isinstance(scan.get("bytes"), int):
        what += f", {human_bytes(scan['bytes'])}"
    result = str(scan.get("result") or "?")
    result_zh = {"clean": "无病毒 clean", "infected": "发现病毒 infected"}.get(result, result)
    lines = [
        f"引擎 Engine: {engine or '?'}",
        f"病毒库 Signatures: {sigs}",
    ]
    if what:
        lines.append(f"扫描 Scanned: {what}")
    lines.append(f"结果 Result: {result_zh}")
    finished = scan.get("finished")
    if isinstance(finished, int | float) and tz is not None:
        lines.append(f"时间 Time: {_local(datetime.fromtimestamp(finished, tz))}")
    elif scan.get("finished_iso"):
        lines.append(f"时间 Time: {_when(scan['finished_iso'])}")
    if scan.get("id") is not None:
        lines.append(f"扫描记录 Scan record: #{scan['id']}")
    return "\n".join(lines)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    s = int(round(value))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d} ({value:.2f} s)"


def verify_text(package: str, fingerprint: str, sums: Mapping[str, str]) -> str:
    """VERIFY.txt; ``sums`` (file name -> sha256) are listed for reading only: the documented
    check compares each file's hash with the signed manifest.json, never with this file."""
    lines = "\n".join(f"{digest}  {name}" for name, digest in sorted(sums.items()))
    return f"""\
How to check this package / 如何校验本导出包
=========================================

Package: {package}
Fingerprint of the key that signed it, as this package claims:
    {fingerprint}

IMPORTANT / 重要: this file travels with the package, so whoever carried the package could have
changed it, the clip, the manifest and the key together. The recorder's real fingerprint comes
from OUTSIDE the package: the signed and stamped paper approval record or hand-over slip, or
`nvr-guard key show` on the recorder. A package is the recorder's only if its signer matches
that fingerprint. 以纸质审批表/移交单上的指纹为准，不要以本文件中的指纹为准。

1. With nvr-guard (any host with nvr-guard installed), pinning the fingerprint from the paper:

    nvr-guard verify {package} --fingerprint SHA256:<fingerprint from the paper record>

   Exit 0 and "package OK ... the pinned recorder key": every file is as the recorder exported it.
   Exit 4: the output names what is wrong (clip changed, manifest changed, key mismatch — signed
   by another key than the pinned one —, missing, extra or non-regular files, wrong name).
   Without --fingerprint the check only says the package is consistent in itself and that the
   signer is NOT confirmed.

2. With plain OpenSSL 3 and coreutils, inside this directory:

   a) the signature over manifest.json (prints "Signature Verified Successfully"):

    openssl pkeyutl -verify -pubin -inkey signer.pub -rawin -in manifest.json -sigfile manifest.sig

   b) the signer key is the recorder's key: the line this prints must equal the fingerprint on
      the paper record. Comparing it with the fingerprint printed above in this file proves
      nothing (both come from the package):

    echo "SHA256:$(openssl pkey -pubin -in signer.pub -outform DER \\
        | openssl dgst -sha256 -binary | base64 | tr -d '=')"

   c) every file is the one the recorder signed: its SHA-256 must be the one listed for its name
      under "files" in manifest.json (the file the signature in step a covers). Every line this
      prints must end in ": OK"; a "FAILED" line means that file was changed, replaced or added:

    for f in *; do case "$f" in manifest.json|manifest.sig|signer.pub) continue;; esac; \\
        h=$(sha256sum "$f" | cut -c1-64); \\
        if grep -A1 -F "\\"$f\\": {{" manifest.json | grep -qF "\\"sha256\\": \\"$h\\""; \\
        then echo "$f: OK"; else echo "$f: FAILED"; fi; done

   d) no file is missing: every name this prints (the "files" of the signed manifest.json) must
      be in this directory:

    sed -n '/^  "files": {{/,/^  }}/p' manifest.json | grep -E '^    "'

   Do not check the hashes below with `sha256sum -c`: they are a copy in this unsigned file, for
   reading only, and whoever swapped a clip could have edited them too. The check is step c.

{lines}

A signature that verifies only proves manifest.json is unchanged since someone signed it; step b
against the paper proves that someone was the recorder; steps c and d, against the signed
manifest.json, then prove the files are the ones it lists. All four checks are needed.
"""
