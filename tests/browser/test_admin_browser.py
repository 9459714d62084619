"""The admin dashboard in headless Chromium: log in, open a key, withdraw it as a token.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/install-browser``) and the
``selenium`` package; skipped with the reason otherwise. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import api_key_account
from tests.browser.admin_node import PASSWORD, AdminNode, start_admin_node
from tests.support.services import MintHandle

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


@pytest.fixture
async def node(tmp_path: Path, mint: MintHandle) -> AsyncIterator[AdminNode]:
    started = await start_admin_node(tmp_path, [mint.url])
    try:
        yield started
        await started.core.assert_books_balance()
    finally:
        await started.stop()


def drive(admin_url: str, account_id: str, profile: str) -> dict[str, Any]:
    """The browser session (blocking; runs in a thread while the server keeps serving)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
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
        browser.save_screenshot(str(ARTIFACTS / "admin-4-key.png"))
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
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        seen = await asyncio.to_thread(drive, node.admin, account_id, profile)
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
