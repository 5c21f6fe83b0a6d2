"""The console's small pure parts: language choice, local redirects, byte ranges, texts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nvr_guard.web import i18n
from nvr_guard.web.app import _is_continuation, _safe_next

TEMPLATES = Path(i18n.__file__).parent / "templates"


@pytest.mark.parametrize(
    ("header", "cookie", "want"),
    [
        (None, None, "zh"),
        ("en-US,en;q=0.9", None, "en"),
        ("zh-CN,zh;q=0.9,en;q=0.8", None, "zh"),
        ("fr-FR,en;q=0.5,zh;q=0.7", None, "zh"),
        ("fr-FR,en;q=0.5", None, "en"),
        ("en;q=abc,zh;q=0.1", None, "zh"),
        ("en-US", "zh", "zh"),
        ("zh-CN", "en", "en"),
        ("zh-CN", "xx", "zh"),
    ],
)
def test_language(header: str | None, cookie: str | None, want: str) -> None:
    assert i18n.pick(header, cookie) == want


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/requests/3", "/requests/3"),
        ("/requests?waiting=me", "/requests?waiting=me"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
        (None, "/"),
        ("requests", "/"),
    ],
)
def test_only_local_paths_are_returned_to(path: str | None, want: str) -> None:
    assert _safe_next(path) == want


@pytest.mark.parametrize(
    ("header", "want"),
    [(None, False), ("bytes=0-", False), ("bytes=0-99", False), ("bytes=100-", True),
     ("bytes=-500", False), ("garbage", False)],
)  # fmt: skip
def test_a_seek_continues_a_viewing(header: str | None, want: bool) -> None:
    assert _is_continuation(header) is want


def test_state_names_and_page_texts_do_not_collide() -> None:
    # t() looks in the page texts first: a state named like a text would be shown wrongly
    assert not set(i18n._T) & set(i18n.STATE_NAMES)


def test_every_text_a_template_asks_for_exists() -> None:
    keys = set()
    for tpl in TEMPLATES.glob("*.html"):
        keys |= set(re.findall(r"t\('([a-z_]+)'", tpl.read_text()))
    # t('format_' ~ r.format): each format a request can have
    keys = {k for k in keys if not k.endswith("_")} | {
        f"format_{f}" for f in ("mp4", "native", "view")
    }
    assert sorted(k for k in keys if k not in i18n._T and k not in i18n.STATE_NAMES) == []


@pytest.mark.parametrize("lang", i18n.LANGS)
def test_texts_fill_their_fields(lang: str) -> None:
    t = i18n.translator(lang)
    assert "7" in t("login_locked", minutes=7)
    assert t("approved") != "approved" or lang == "en"


def test_the_console_reads_the_config_without_the_daemons_paths(tmp_path: Path) -> None:
    # the console's account cannot see the recordings (nor the state): a root it cannot reach
    # must not stop it, while the daemon's reading still refuses a root that is not there
    from nvr_guard.config import load_config
    from nvr_guard.errors import ConfigError

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        'sites:\n  gate: {roots: [/nonexistent/rec], keep: 30d}\nweb: {listen: "127.0.0.1:8080"}\n'
    )
    assert load_config(cfg, host=False).web is not None
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(cfg)
    cfg.write_text("sites:\n  gate: {roots: [/nonexistent/rec], keep: 30d}\nweb: {listen: 1}\n")
    with pytest.raises(ConfigError, match="web.listen"):
        load_config(cfg, host=False)


def test_the_console_and_the_password_helper_must_be_different_accounts(tmp_path: Path) -> None:
    from nvr_guard.config import check_config

    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "sites:\n  gate: {roots: [/tmp], keep: 30d}\n"
        'web: {listen: "127.0.0.1:8080", gateway_user: nvr-guard-web, auth_user: nvr-guard-web}\n'
    )
    _, errors, _ = check_config(cfg)
    assert any("different accounts" in msg for _, _, msg in errors)


def test_previews_read_only_the_segments_they_show() -> None:
    # a day of 10-second segments: three of them are read, not 8,640 (a reload loop of the
    # request page made the daemon probe every segment of the range each time)
    from nvr_guard.export.package import SourceSegment
    from nvr_guard.export.view import _around

    segs = [SourceSegment(Path(f"/r/{i}.mp4"), 1000.0 + 10 * i) for i in range(8640)]
    got = _around(segs, 1000.0, 1000.0 + 86400)
    assert [s.start for s in got] == [1000.0, 1000.0 + 43200, 1000.0 + 86390]
    assert _around(segs[:2], 1000.0, 1020.0) == segs[:2]
