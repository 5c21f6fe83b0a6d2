"""The web console in a real browser (Debian's chromium driven by Selenium through Debian's
chromedriver): people log in with their Unix passwords, file, approve, deny, watch an approved
viewing request and print the record. A screenshot of every page is kept in
``test-artifacts/web/`` (``NVR_GUARD_ARTIFACTS`` to put them elsewhere)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.fixtures.site import poll
from tests.fixtures.webconsole import REPO, Console, console, password_of, start_of_footage

pytestmark = pytest.mark.integration

P = "wb17"
ALICE = f"{P}-alice"  # operator
BOB = f"{P}-bob"  # dept_manager
CAROL = f"{P}-carol"  # security_lead
ARTIFACTS = Path(os.environ.get("NVR_GUARD_ARTIFACTS", REPO / "test-artifacts")) / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def web() -> Iterator[Console]:
    people = {ALICE: ["operator"], BOB: ["dept_manager"], CAROL: ["security_lead"]}
    with console(P, people, real_footage=True) as c:
        yield c


class Browser:
    """One person's browser window."""

    def __init__(self, url: str, name: str) -> None:
        for tool in (CHROMIUM, CHROMEDRIVER):
            assert shutil.which(tool), (
                f"{tool} is missing: apt-get install chromium chromium-driver"
            )
        self.url, self.name = url, name
        self.profile = tempfile.mkdtemp(prefix="nvrg-chromium-")
        opts = Options()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # the suite runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            f"--user-data-dir={self.profile}",
            "--autoplay-policy=no-user-gesture-required",
        ):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(60)

    def go(self, path: str) -> None:
        self.driver.get(self.url + path)

    def shot(self, label: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{label}.png"
        assert self.driver.save_screenshot(str(path)), path
        assert path.stat().st_size > 1000
        return path

    def text(self) -> str:
        """The page's text; empty while a new page is loading (polled, never trusted once)."""
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except (NoSuchElementException, StaleElementReferenceException):
            return ""

    def field(self, element_id: str, value: str) -> None:
        el = self.driver.find_element(By.ID, element_id)
        el.clear()
        el.send_keys(value)

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.ID, element_id).click()

    def login(self, user: str) -> None:
        self.go("/login")
        self.shot("login")
        self.field("username", user)
        self.field("password", password_of(user))
        self.click("login")
        poll(lambda: "/login" not in self.driver.current_url, 30, f"{user}'s login")
        assert self.driver.find_element(By.ID, "me").text == user

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browsers(web: Console) -> Iterator[dict[str, Browser]]:
    made: dict[str, Browser] = {}
    try:
        for who in (ALICE, BOB, CAROL):
            made[who] = Browser(web.url, who.removeprefix(f"{P}-"))
        yield made
    finally:
        for b in made.values():
            b.close()


def file_in_browser(web: Console, b: Browser, fmt: str, reason: str) -> int:
    start = start_of_footage(web)
    b.go("/requests/new")
    b.shot(f"new-{fmt}")
    Select(b.driver.find_element(By.ID, "cameras")).select_by_value("cam1")
    b.field("from", (start + timedelta(seconds=5)).isoformat())
    b.field("to", (start + timedelta(seconds=35)).isoformat())
    b.field("reason", reason)
    b.field("basis", "police case 2026-118")
    b.field("recipient_unit", "District PSB")
    b.field("recipient_person", "Officer Li")
    b.field("recipient_contact", "110")
    Select(b.driver.find_element(By.ID, "format")).select_by_value(fmt)
    b.click("file")
    poll(lambda: "/requests/new" not in b.driver.current_url, 30, "the filed request's page")
    rid = int(b.driver.current_url.rstrip("/").rsplit("/", 1)[1])
    assert reason in b.text()
    b.shot(f"request-{rid}-filed")
    return rid


def test_file_approve_deny_watch_and_print(web: Console, browsers: dict[str, Browser]) -> None:
    alice, bob, carol = browsers[ALICE], browsers[BOB], browsers[CAROL]
    for who, b in browsers.items():
        b.login(who)
    alice.shot("requests")

    rid = file_in_browser(web, alice, "view", "a bicycle stolen at the north gate")
    # the requester is not offered a decision on her own request
    assert not alice.driver.find_elements(By.ID, "approve")

    # bob sees it waiting for him and approves with a note
    bob.go("/requests?waiting=me")
    bob.shot("waiting")
    assert f"#{rid}" in bob.text()
    bob.go(f"/requests/{rid}")
    bob.field("note", "checked with the gate guard")
    bob.click("approve")
    poll(lambda: "checked with the gate guard" in bob.text(), 30, "bob's approval shown")
    bob.shot(f"request-{rid}-approved-once")

    # bob's own request: no decision offered to him; the daemon would refuse it
    own = file_in_browser(web, bob, "mp4", "bob's own request")
    assert not bob.driver.find_elements(By.ID, "approve")
    assert "someone else" in bob.text() or "他人" in bob.text()

    # carol completes rid and denies bob's with a reason
    carol.go(f"/requests/{rid}")
    carol.click("approve")
    poll(lambda: "/approve" not in carol.driver.current_url, 30, "carol's approval")
    carol.shot(f"request-{rid}-approved")
    carol.go(f"/requests/{own}")
    carol.field("deny_reason", "no police case number")
    carol.click("deny")
    poll(lambda: "no police case number" in carol.text(), 30, "the denial shown")
    carol.shot(f"request-{own}-denied")

    # alice watches the approved viewing request in the page: no download link
    alice.go(f"/requests/{rid}")
    alice.click("watch")
    poll(
        lambda: (alice.driver.refresh() or True) and alice.driver.find_elements(By.ID, "clip"),
        180,
        "the clip to be prepared",
        max_delay=2,
    )
    video = alice.driver.find_element(By.ID, "clip")
    assert "nodownload" in (video.get_attribute("controlslist") or "")
    poll(
        lambda: alice.driver.execute_script("return arguments[0].readyState", video) >= 1,
        60,
        "the browser to load the clip's metadata",
    )
    duration = alice.driver.execute_script("return arguments[0].duration", video)
    assert 25 <= duration <= 35, duration
    alice.shot(f"request-{rid}-watch")
    assert not alice.driver.find_elements(By.CSS_SELECTOR, "a[download]")

    # the printable record
    alice.go(f"/requests/{rid}/record")
    assert "审批表" in alice.text()
    alice.shot(f"request-{rid}-record")

    audit = web.audit()
    starts = [e for e in audit if e["action"] == "view.start" and e["actor"] == ALICE]
    assert starts and starts[-1]["details"]["via"] == "web"
    assert any(e["action"] == "request.deny" and e["actor"] == CAROL for e in audit)
