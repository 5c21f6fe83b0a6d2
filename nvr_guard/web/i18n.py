"""The console's words in Chinese and English.

The language is the ``lang`` cookie's (set by the switch in the page header), else the first
of zh/en in the browser's Accept-Language, else Chinese. Texts that people wrote (reasons,
notes, names) are shown as written, in whatever language they are.
"""

from __future__ import annotations

from collections.abc import Callable

LANGS = ("zh", "en")

_T: dict[str, tuple[str, str]] = {
    "app": ("录像调阅审批", "Footage access console"),
    "login": ("登录", "Log in"),
    "logout": ("退出", "Log out"),
    "username": ("用户名", "User name"),
    "password": ("密码", "Password"),
    "login_failed": ("用户名或密码错误。", "Wrong user name or password."),
    "login_locked": (
        "登录失败次数过多，请 {minutes} 分钟后再试。",
        "Too many failed logins; try again in {minutes} min.",
    ),
    "login_unavailable": (
        "暂时无法验证密码（服务不可用），请稍后再试。",
        "The password check is unavailable; try again later.",
    ),
    "login_no_role": (
        "此账户在本系统中没有任何角色，请联系管理员。",
        "This account has no role here; ask the administrator.",
    ),
    "requests": ("申请", "Requests"),
    "waiting_me": ("待我审批", "Waiting for me"),
    "all_requests": ("全部申请", "All requests"),
    "new_request": ("新建申请", "New request"),
    "audit": ("审计日志", "Audit log"),
    "status": ("系统状态", "Status"),
    "busy": (
        "系统正忙：{doing}（自 {since} 起）；本页为 {made} 时的状态，告警项为当前状态",
        "Busy: {doing} since {since}; this page shows the status as of {made} "
        "(attention entries as they stand now)",
    ),
    "more_holds": (
        "另有 {n} 项保全未列出（`nvr-guard hold list` 列出全部）",
        "{n} more holds not listed (`nvr-guard hold list` lists them all)",
    ),
    "signed_in_as": ("当前用户", "Signed in as"),
    "roles": ("角色", "Roles"),
    "id": ("编号", "ID"),
    "state": ("状态", "State"),
    "requester": ("申请人", "Requester"),
    "site": ("站点", "Site"),
    "cameras": ("摄像机", "Cameras"),
    "level": ("级别", "Level"),
    "range": ("时间范围", "Range"),
    "from": ("开始", "From"),
    "to": ("结束", "To"),
    "reason": ("事由", "Reason"),
    "basis": ("依据", "Basis"),
    "recipient": ("接收方", "Recipient"),
    "recipient_unit": ("接收单位", "Receiving unit"),
    "recipient_person": ("接收人", "Receiving person"),
    "recipient_contact": ("联系方式", "Contact"),
    "format": ("形式", "Format"),
    "format_mp4": ("导出 MP4（加水印）", "Export MP4 (watermarked)"),
    "format_native": ("原始格式（证据）", "Native copy (evidence)"),
    "format_view": ("在线调阅（不复制）", "View in the browser (no copy)"),
    "emergency": ("紧急", "Emergency"),
    "created": ("提交时间", "Filed"),
    "deadline": ("审批期限", "Decide by"),
    "valid_until": ("有效期至", "Valid until"),
    "approvals": ("审批记录", "Approvals"),
    "approver": ("审批人", "Approver"),
    "role": ("角色", "Role"),
    "decision": ("决定", "Decision"),
    "note": ("意见", "Note"),
    "time": ("时间", "Time"),
    "approve": ("批准", "Approve"),
    "deny": ("拒绝", "Deny"),
    "deny_reason": ("拒绝理由（必填）", "Reason for denying (required)"),
    "approve_note": ("审批意见（可选）", "Note (optional)"),
    "approve_mask": (
        "加遮挡区域（可选，x,y,w,h 为画面比例，多个用 ; 分隔）",
        "Mask zones (optional: x,y,w,h as fractions of the frame, ; between zones)",
    ),
    "encrypt": ("输出保护", "Protection"),
    "encrypt_default": ("按场所设置", "As the site sets it"),
    "encrypt_none": ("不加密", "None (plain package)"),
    "encrypt_passphrase": ("口令加密（口令另行交付）", "Passphrase (handed over separately)"),
    "encrypt_recipient": ("按接收单位证书加密", "To the receiving unit's certificate"),
    "privacy_zones": ("隐私遮挡区域", "Privacy zones"),
    "sealed": ("加密文件", "Sealed file"),
    "destroyed": ("副本销毁", "Copy destroyed"),
    "mask": ("遮挡", "Mask"),
    "open_steps": ("待审批步骤", "Open steps"),
    "own_request": (
        "这是您提交的申请，须由他人审批。",
        "You filed this request: someone else decides it.",
    ),
    "record": ("审批表（打印）", "Approval record (print)"),
    "watch": ("在线调阅", "Watch"),
    "audit_trail": ("审计记录", "Audit trail"),
    "no_requests": ("没有申请。", "No requests."),
    "submit": ("提交", "Submit"),
    "filter": ("筛选", "Filter"),
    "since": ("起始", "Since"),
    "actor": ("操作人", "Actor"),
    "action": ("操作", "Action"),
    "object": ("对象", "Object"),
    "details": ("详情", "Details"),
    "older_entries": (
        "更早的记录未显示，请用筛选条件缩小范围。",
        "Older entries are not shown; narrow the filters.",
    ),
    "chain_ok": ("哈希链完整", "Hash chain intact"),
    "chain_bad": ("哈希链异常", "Hash chain broken"),
    "entries": ("条", "entries"),
    "attention": ("需要处理", "Needs attention"),
    "all_ok": ("一切正常", "All well"),
    "oldest": ("最早录像", "Oldest footage"),
    "keep": ("保存规则", "Retention rule"),
    "segments": ("片段", "Segments"),
    "disk_free": ("磁盘剩余", "Disk free"),
    "holds": ("保全", "Holds"),
    "blocked_sweeps": ("等待确认的清理", "Sweeps waiting for confirmation"),
    "confirm": ("确认", "Confirm"),
    "confirm_password": ("再次输入密码以确认", "Re-enter your password to confirm"),
    "violations": ("违规", "Violations"),
    "notifications": ("通知", "Notifications"),
    "sent": ("已发送", "sent"),
    "failed": ("失败", "failed"),
    "queued": ("待发送", "queued"),
    "last_error": ("最近错误", "last error"),
    "forbidden": ("无权执行此操作。", "Not allowed."),
    "csrf": (
        "表单已过期或无效，请返回重试。",
        "The form expired or is invalid; go back and try again.",
    ),
    "not_found": ("未找到，或您无权查看。", "Not found, or not yours to see."),
    "unavailable": (
        "录像守护进程未响应，请稍后再试。",
        "The recorder daemon does not answer; try again later.",
    ),
    "error": ("错误", "Error"),
    "back": ("返回", "Back"),
    "preparing": ("正在准备视频，页面将自动刷新……", "Preparing the clip; this page refreshes…"),
    "view_failed": ("视频准备失败", "Preparing the clip failed"),
    "previews": ("预览", "Previews"),
    "session_ended": ("会话已结束，请重新登录。", "Your session ended; log in again."),
    "language": ("English", "中文"),
    "none": ("无", "none"),
    "yes": ("是", "yes"),
    "no": ("否", "no"),
}

STATE_NAMES: dict[str, tuple[str, str]] = {
    "pending": ("待审批", "pending"),
    "approved": ("已批准", "approved"),
    "denied": ("已拒绝", "denied"),
    "expired": ("已过期", "expired"),
    "cancelled": ("已撤销", "cancelled"),
    "exported": ("已导出", "exported"),
    "resolved": ("已处理", "resolved"),
}


def pick(accept_language: str | None, cookie: str | None) -> str:
    """The page language: the cookie's, else the browser's first of zh/en, else zh."""
    if cookie in LANGS:
        return cookie
    best: tuple[float, int, str] | None = None
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        lang = tag.strip().lower()[:2]
        if lang in LANGS and (best is None or (q, -i) > (best[0], best[1])):
            best = (q, -i, lang)
    return best[2] if best else "zh"


def translator(lang: str) -> Callable[..., str]:
    """``t(key, **fields)`` for templates: the text of ``key`` in ``lang``."""
    idx = LANGS.index(lang) if lang in LANGS else 0

    def t(key: str, **fields: object) -> str:
        pair = _T.get(key) or STATE_NAMES.get(key)
        text = pair[idx] if pair else key
        return text.format(**fields) if fields else text

    return t
