"""The web console in a real browser: Debian's chromium, headless, driven by
selenium through Debian's chromium-driver, against a real `twistd relay`,
real `tunnel-client` agents and a real visitor on loopback.

Screenshots are kept as artifacts in $ARTIFACTS_DIR (default: `artifacts/`
at the repository root, git-ignored; .ci/run keeps it); each test prints
where its file went. Without chromium or chromedriver the tests skip and
say how to install them; CI (.ci/run) installs both.
"""

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from tests.e2e.harness import RelayProcess, connect, wait_for
from tests.e2e.test_tenants import admin as relay_admin, log_count, wait_reloaded

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install '.[test]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium/chromedriver: apt-get install -y chromium chromium-driver (.ci/run installs them)",
)
REPO = Path(__file__).resolve().parents[2]
WAIT = 20  # seconds: every wait below is bounded by it


def artifacts_dir() -> Path:
    path = Path(os.environ.get("ARTIFACTS_DIR") or REPO / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1100", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> Path:
    path = artifacts_dir() / name
    driver.save_screenshot(str(path))
    print(f"console screenshot: {path}")
    return path


def message_text(driver) -> str:
    """The page's #message text, or "" while the page that has it is still loading."""
    found = driver.find_elements(By.ID, "message")
    try:
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def cell(driver, table: str, row_id: str, key: str):
    """The text and data-value of one cell, or None while the row is absent.
    Read in one script call: the page redraws its rows every second, so an
    element found in one call may be gone by the next."""
    return driver.execute_script(
        "const td = document.querySelector(arguments[0]);"
        "return td ? [td.innerText, td.dataset.value === undefined ? null : td.dataset.value] : null;",
        f'#{table} tr[data-id="{row_id}"] td[data-key="{key}"]',
    )


class SlowVisitor:
    """A visitor sending 32 KiB every 50 ms through an echo tunnel (reading
    the echo back) until stopped: a transfer the console can watch."""

    def __init__(self, port: int):
        self.sock = connect(port)
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True), threading.Thread(target=self._read, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _send(self):
        chunk = b"v" * 32768
        while not self._stop.wait(0.05):
            try:
                self.sock.sendall(chunk)
            except OSError:
                return
            self.sent += len(chunk)

    def _read(self):
        while not self._stop.is_set():
            try:
                if not self.sock.recv(65536):
                    return
            except OSError:
                return

    def stop(self):
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def test_the_console_shows_a_new_tunnel_and_its_bytes_growing(tmp_path, browser, echo, agents):
    """Loaded before any agent, the console lists the tunnel once an agent starts, and its byte count grows during a transfer, by itself."""
    relay = RelayProcess(tmp_path / "relay").start()
    try:
        browser.get(f"http://127.0.0.1:{relay.admin_port}/")
        assert browser.find_elements(By.CSS_SELECTOR, "#tunnels tbody tr") == []
        assert browser.find_element(By.CSS_SELECTOR, '#health dd[data-key="status"]').text == "ok"
        agent = agents(relay, "forward", str(echo.port), "--unencrypted")
        _, port = agent.address()
        [tunnel] = relay.tunnels()
        # No reload: the page's own polling brings the row in.
        wait_for(lambda: cell(browser, "tunnels", tunnel["id"], "urls"), WAIT, "the tunnel's row")
        assert f":{port}" in cell(browser, "tunnels", tunnel["id"], "urls")[0]
        wait_for(lambda: browser.execute_script("return document.querySelectorAll('#agents tbody tr').length") == 1,
                 WAIT, "the agent's row")
        visitor = SlowVisitor(port)
        try:
            def to_service():
                found = cell(browser, "tunnels", tunnel["id"], "bytes_to_service")
                return int(found[1]) if found else 0
            first = wait_for(to_service, WAIT, "bytes to the service")
            wait_for(lambda: to_service() > first, WAIT, f"the byte count to grow past {first}")
            wait_for(lambda: int(cell(browser, "tunnels", tunnel["id"], "visitors")[1]) == 1, WAIT, "one visitor")
            wait_for(lambda: float(cell(browser, "tunnels", tunnel["id"], "rate_to_service")[1]) > 0, WAIT, "a rate")
            path = screenshot(browser, "console-transfer.png")
            assert path.stat().st_size > 1000
        finally:
            visitor.stop()
        assert to_service() <= visitor.sent
        # The visitor is gone: the count stays (closed streams keep their bytes).
        wait_for(lambda: int(cell(browser, "tunnels", tunnel["id"], "visitors")[1]) == 0, WAIT, "no visitor")
        assert to_service() >= first
        assert relay.state_dir.joinpath("client.env").read_text().split("TUNNEL_TOKEN=")[1].split()[0] \
            not in browser.page_source
    finally:
        relay.stop()


def test_login_then_revoke_with_confirmation_closes_the_agent(tmp_path, browser, echo, agents):
    """Off loopback: the console asks for the admin token; after login, revoke asks to confirm, and the confirmed revoke ends that agent (exit 3)."""
    relay = RelayProcess(tmp_path / "relay", "--admin-interface=0.0.0.0").start()
    try:
        before = log_count(relay, "tokens file loaded")
        acme = json.loads(relay_admin(relay, "token", "add", "--tenant", "acme", "--label", "ci", "--json").stdout)
        wait_reloaded(relay, before)
        admin_token = relay_admin(relay, "admin-token").stdout.strip()
        agent = agents(relay, "forward", str(echo.port), "--unencrypted", env={"TUNNEL_TOKEN": acme["token"]})
        agent.address()
        base = f"http://127.0.0.1:{relay.admin_port}"
        browser.get(base + "/")
        assert browser.current_url == base + "/login"
        browser.find_element(By.ID, "token").send_keys("not-the-token")
        browser.find_element(By.ID, "login").click()
        wait_for(lambda: "not the admin token" in message_text(browser), WAIT, "the refused login's answer")
        browser.find_element(By.ID, "token").send_keys(admin_token)
        browser.find_element(By.ID, "login").click()
        wait_for(lambda: cell(browser, "tokens", acme["id"], "label"), WAIT, "the acme token's row")
        assert cell(browser, "tokens", acme["id"], "label")[0] == "ci"
        wait_for(lambda: cell(browser, "tokens", acme["id"], "agents")[1] == "1", WAIT, "its agent")
        # The link is a plain GET to the confirm page (redraws may replace the element: go by its href).
        href = browser.execute_script(
            "return document.querySelector(arguments[0]).href;", f'#tokens tr[data-id="{acme["id"]}"] a.act',
        )
        browser.get(href)
        assert browser.current_url == f"{base}/tokens/{acme['id']}/revoke"
        assert "Revoke token" in browser.page_source
        assert agent.proc.poll() is None  # the confirm page changed nothing
        screenshot(browser, "console-revoke-confirm.png")
        browser.find_element(By.ID, "confirm").click()
        # The click starts a navigation; the answer page may not be there yet.
        wait_for(lambda: "revoked" in message_text(browser), WAIT, "the revoke's answer page")
        assert agent.wait(WAIT) == 3  # AUTH_FAILED, "token revoked": the agent exits and does not retry
        browser.get(base + "/")
        wait_for(lambda: cell(browser, "tokens", acme["id"], "label") is None, WAIT, "the revoked token gone")
        assert acme["token"] not in browser.page_source and admin_token not in browser.page_source
    finally:
        relay.stop()
    assert admin_token not in relay.log() and acme["token"] not in relay.log()
