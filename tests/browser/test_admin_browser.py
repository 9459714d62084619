"""The admin dashboard in headless Chromium: log in, open a key, withdraw it as a token; every
page at 1280 and 800 px wide without horizontal overflow (screenshots of each).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/install-browser``) and the
``selenium`` package; skipped with the reason otherwise. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer, api_key_account
from tests.browser.admin_node import (
    CHAT,
    PASSWORD,
    USAGE,
    AdminNode,
    admin_node_fixture,  # noqa: F401  (fixture)
)
from tests.support.core import TEST_MODEL

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1000",
)  # fmt: skip

selenium = pytest.importorskip(
    "selenium", reason="selenium is not installed (pip install -e .[dev])"
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="chromium and chromium-driver are not installed (run .ci/install-browser)",
)


def chromium(profile: str) -> Any:
    """A headless Chromium driven by chromedriver, with its own profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))


def drive(admin_url: str, account_id: str, profile: str) -> dict[str, Any]:
    """The browser session (blocking; runs in a thread while the server keeps serving)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium(profile)
    seen: dict[str, Any] = {}
    try:
        wait = WebDriverWait(browser, 30)  # a bound for a busy machine, not a speed check
        browser.get(admin_url + "/")
        wait.until(ec.presence_of_element_located((By.ID, "password")))
        seen["login_url"] = browser.current_url
        browser.save_screenshot(str(ARTIFACTS / "admin-1-login.png"))
        browser.find_element(By.ID, "password").send_keys(PASSWORD)
        browser.find_element(By.ID, "login").click()
        wait.until(ec.presence_of_element_located((By.ID, "earnings")))
        seen["earnings"] = browser.find_element(By.ID, "earnings").text
        seen["audit"] = browser.find_element(By.ID, "audit").text
        browser.save_screenshot(str(ARTIFACTS / "admin-2-overview.png"))
        browser.find_element(By.LINK_TEXT, "Keys").click()
        link = wait.until(ec.element_to_be_clickable((By.CLASS_NAME, "key-link")))
        browser.save_screenshot(str(ARTIFACTS / "admin-3-keys.png"))
        link.click()
        wait.until(ec.presence_of_element_located((By.ID, "withdraw-form")))
        seen["account_id"] = browser.find_element(By.ID, "account-id").text
        seen["balance"] = browser.find_element(By.ID, "balance").text
        seen["children"] = browser.find_element(By.ID, "children").text
        browser.save_screenshot(str(ARTIFACTS / "admin-4-key.png"))
        browser.find_element(By.CLASS_NAME, "child-link").click()
        wait.until(ec.presence_of_element_located((By.ID, "revoke-form")))
        seen["child_status"] = browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(ARTIFACTS / "admin-4b-child.png"))
        browser.find_element(By.ID, "parent").click()
        wait.until(ec.presence_of_element_located((By.ID, "withdraw-form")))
        browser.find_element(By.ID, "withdraw").click()
        token_box = wait.until(ec.presence_of_element_located((By.ID, "token")))
        seen["token"] = token_box.get_attribute("value")
        seen["token_amount"] = browser.find_element(By.ID, "token-amount").text
        browser.find_element(By.ID, "copy").click()
        browser.save_screenshot(str(ARTIFACTS / "admin-5-token.png"))
        browser.back()  # the token page is not cached: going back must not show it again
        seen["after_back"] = browser.page_source
        browser.get(admin_url + "/keys/" + account_id.replace(":", "%3A"))
        wait.until(ec.presence_of_element_located((By.ID, "balance")))
        seen["balance_after"] = browser.find_element(By.ID, "balance").text
        browser.save_screenshot(str(ARTIFACTS / "admin-6-key-after.png"))
        browser.find_element(By.ID, "logout").click()
        wait.until(ec.presence_of_element_located((By.ID, "password")))
        browser.get(admin_url + "/wallet")
        seen["after_logout"] = browser.current_url
    finally:
        browser.quit()
    return seen


async def test_login_open_key_and_withdraw_in_chromium(node: AdminNode, make_token: Any) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    key = await node.funded_key(50, make_token, charges=3)
    await node.core.wallet.receive(await make_token(7), OPERATOR, "operator")
    account_id = api_key_account(key)
    _, child = await node.core.payments.children.create(
        account_id, limit_msat=5_000, label="laptop"
    )
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        seen = await asyncio.to_thread(drive, node.admin, account_id, profile)
    assert child.id in seen["children"] and "laptop" in seen["children"]
    assert seen["child_status"] == "active"
    assert seen["login_url"].endswith("/admin/login")
    assert seen["earnings"] == "10.180 sat"  # 7 sat received + 3 requests of 1.060 sat
    assert seen["audit"] == "balanced"
    assert seen["account_id"] == account_id
    assert seen["balance"] == "46.820 sat"
    assert seen["token_amount"] == "46 sat"
    assert seen["token"].startswith("cashuB") and seen["token"] not in seen["after_back"]
    assert seen["balance_after"] == "0.820 sat"
    assert seen["after_logout"].endswith("/admin/login")
    assert await make_token.redeem(seen["token"]) == 46


# What overflows sideways: the page itself, or a table wider than the card it sits in.
OVERFLOW = """
const tables = [...document.querySelectorAll("table")]
  .filter((t) => t.scrollWidth > t.parentElement.clientWidth + 1)
  .map((t) => (t.id || t.className || "table") + ": " + t.scrollWidth + " > "
    + t.parentElement.clientWidth);
return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth, tables};
"""
PAGES = ("overview", "activity", "keys", "key", "search", "transactions", "wallet")


def layouts(admin_url: str, account_id: str, masked: str, profile: str) -> dict[str, Any]:
    """Each page at 1280 and 800 px: its overflow figures, a screenshot of each."""
    from urllib.parse import quote

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    paths = {
        "overview": "/",
        "activity": "/activity",
        "keys": "/keys",
        "key": "/keys/" + quote(account_id, safe=""),
        "search": "/keys?q=" + quote(masked, safe=""),
        "transactions": "/transactions",
        "wallet": "/wallet",
    }
    browser = chromium(profile)
    seen: dict[str, Any] = {}
    try:
        wait = WebDriverWait(browser, 30)  # a bound for a busy machine, not a speed check
        for width in (1280, 800):
            browser.set_window_size(width, 1000)
            browser.get(admin_url + "/login")
            wait.until(ec.presence_of_element_located((By.ID, "password")))
            seen[("login", width)] = browser.execute_script(OVERFLOW)
            browser.save_screenshot(str(ARTIFACTS / f"layout-{width}-login.png"))
            browser.find_element(By.ID, "password").send_keys(PASSWORD)
            browser.find_element(By.ID, "login").click()
            wait.until(ec.presence_of_element_located((By.ID, "earnings")))
            for name in PAGES:
                browser.get(admin_url + paths[name])
                wait.until(ec.presence_of_element_located((By.TAG_NAME, "h1")))
                seen[(name, width)] = browser.execute_script(OVERFLOW)
                seen[(name, width)]["url"] = browser.current_url
                seen[(name, width)]["text"] = browser.find_element(By.TAG_NAME, "main").text
                browser.save_screenshot(str(ARTIFACTS / f"layout-{width}-{name}.png"))
            browser.find_element(By.ID, "logout").click()
            wait.until(ec.presence_of_element_located((By.ID, "password")))
    finally:
        browser.quit()
    return seen


async def test_every_page_fits_1280_and_800_px_without_overflow(
    node: AdminNode, make_token: Any
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    key = await node.funded_key(50, make_token, charges=3)
    async with node.core.payments.job(
        Payer("request_token", await make_token(5)), TEST_MODEL, CHAT
    ) as paid:
        await paid.settle(USAGE)
    npub = "ab" * 32
    await node.core.payments.deposit("npub:" + npub, await make_token(9), "dm:deposit")
    async with node.core.payments.job(Payer("npub", npub, channel="nostr"), TEST_MODEL, CHAT) as j:
        await j.settle(USAGE)
    node.metrics.record_request("http", TEST_MODEL, 200, 0.4, 1060)
    node.metrics.record_request("nostr", TEST_MODEL, 502, 1.2)
    account_id = api_key_account(key)
    masked = key[:7] + "…" + key[-4:]
    # A job runs while the pages are looked at: its hold is on the activity page.
    async with node.core.payments.job(Payer("api_key", key), TEST_MODEL, CHAT) as running:
        with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
            seen = await asyncio.to_thread(layouts, node.admin, account_id, masked, profile)
        await running.settle(USAGE)
    for (name, width), figures in seen.items():
        assert figures["inner"] == width, (name, width, figures["inner"])
        assert figures["scroll"] <= figures["inner"], (name, width, figures)
        assert figures["tables"] == [], (name, width, figures["tables"])
    for width in (1280, 800):
        assert seen[("search", width)]["url"].endswith("/keys/" + account_id.replace(":", "%3A"))
        assert "Earnings and revenue" in seen[("overview", width)]["text"]
        assert "1 open hold," in seen[("activity", width)]["text"]
        assert "Request · " in seen[("transactions", width)]["text"]
