"""The console in a real browser: Debian's Chromium driven by Selenium (chromium-driver), against `imguard console`
on a data folder that a real gateway run filled (slixmpp clients, a real Prosody, the real `imguard run`): one
blocked EICAR file with a bidi override in its name, a blocked keyword message, plain messages, a hostile message
text (`<script>`) and a bidi override. The malware rule's notice names the console's release page (as a site's
rules would: `notify` with `{file.sha256}`), so the sender's own notice is where the release request starts.

What is checked is what a reader and an attacker would check: the console's certificate chains to imguard's CA
(Python's ssl, not the browser), logging in, filtering alerts, the blocked file's alert and its conversation, the
hostile text shown as text (no script ran: the browser's own window flag, no alert dialog, no element made from
it), a POST without its CSRF token refused, an auditor kept out of an analyst's page, wrong passwords throttled,
and the access log naming who read what; the quarantined file downloaded as an AES zip opened by 7-Zip; the
release workflow from the sender's notice to the receiver's one-time link (four eyes: EICAR is malware); the rule
playground against `imguard rules explain` and `imguard scan --explain`. Screenshots of every page go to a
folder under pytest's tmp dir.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.peers.gateway import BUNDLED_SIGNATURES, PYTHON, Gateway
from tests.peers.prosody import PeerError, free_ports, stop_process, wait_for_port
from tests.xmpp_clients import STARTTLS, Client

pytestmark = pytest.mark.timeout(240)

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SHA256 = hashlib.sha256(EICAR).hexdigest()
EICAR_NAME = "invoice\u202efdp.exe"            # shows as "invoiceexe.pdf" where the override acts
HOSTILE = "<script>alert(1)</script>"
HOSTILE_FLAG = "<script>window.imguardXss = 1</script><img src=x onerror=\"window.imguardXss = 2\">"
BIDI_TEXT = "see the file \u202etxt.exe"
FORMULA = "=HYPERLINK(\"http://attacker.example\",\"click\")"
PASSWORD = "correct-horse-battery"
CAROL, DAVE = "console-carol", "console-dave"      # the chat accounts (on the test Prosody, domain localhost)
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900")


def _need(path: str) -> str:
    found = shutil.which(path)
    if not found:
        pytest.skip(f"{path} is not installed (tools/setup.sh test installs chromium and chromium-driver)")
    return found


@pytest.fixture(scope="module")
def console_port() -> int:
    return free_ports(1)[0]


def name_the_release_page(gw: Gateway, port: int) -> None:
    """Edit the malware rule's notice in the gateway's rules folder to name the console's release page, as a site
    would, and reload it (SIGHUP); wait until the reload is reported good."""
    files = gw.directory / "rules" / "10-files.yaml"
    old = 'notify: "Your file {file.name} was blocked: it matched a malware signature."'
    assert old in files.read_text()
    since = gw.mark()
    files.write_text(files.read_text().replace(old, 'notify: "Your file {file.name} was blocked: it matched a '
                                               f'malware signature. Ask for its release: https://127.0.0.1:{port}'
                                               '/release?sha256={file.sha256}"', 1))
    os.kill(gw.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for event in gw.alerts()[since:]:
            if event["event"].get("action") == "policy_reload":
                assert event["event"]["outcome"] == "success", event["imguard"]["policy"]
                return
        time.sleep(0.1)
    raise AssertionError(f"no policy_reload event after SIGHUP\n{gw.logs()}")


@pytest.fixture(scope="module")
def filled(prosody, tmp_path_factory, console_port) -> Path:
    """A data folder written by a real gateway run, then stopped (its archive and alerts complete). The notice
    the sender got for the EICAR file is kept in ../notice.txt; the gateway's rules are in ../rules."""
    directory = tmp_path_factory.mktemp("console-gateway")
    gw = Gateway.start(directory, prosody)

    async def chat() -> None:
        endpoint = gw.endpoint(STARTTLS)
        for user in (CAROL, DAVE):      # this module's own accounts: no other test's session on them
            if user not in prosody.accounts:
                prosody.add_account(user)
        async with Client.connected(endpoint, prosody.jid(CAROL) + "/laptop", prosody.password(CAROL)) as carol, \
                Client.connected(endpoint, prosody.jid(DAVE) + "/phone", prosody.password(DAVE)) as dave:
            for sender, receiver, text in ((carol, dave, "hello dave, the numbers are in"),
                                           (dave, carol, HOSTILE), (dave, carol, HOSTILE_FLAG),
                                           (carol, dave, BIDI_TEXT), (carol, dave, FORMULA)):
                sender.send_chat(receiver.jid, text)
                assert await receiver.wait_message(text), f"{text!r} did not arrive"
            result = await carol.ibb_send(dave.jid, EICAR, name=EICAR_NAME)     # the gateway cuts the stream
            carol.send_chat(dave.jid, "project-bluebird is next")      # blocked by the test rules
            carol.send_chat(dave.jid, "sentinel after the blocked items")
            assert await dave.wait_message("sentinel after the blocked items")
            assert EICAR not in bytes(dave.received.ibb.get(result.sid, b"")), "EICAR reached dave"
            notices = [result.error_text or ""] + carol.bodies()
            notice = next((n for n in notices if "/release?sha256=" in n), "")
            assert notice, f"carol's notice names no release page: {notices}"
            (directory / "notice.txt").write_text(notice)

    try:
        name_the_release_page(gw, console_port)
        asyncio.run(chat())
        block = asyncio.run(gw.wait_alert(lambda e: (e.get("file") or {}).get("hash", {}).get("sha256")
                                          == EICAR_SHA256 and e["event"].get("action") == "block"))
        assert block, f"the gateway logged no block of EICAR in {gw.alerts_file}"
    finally:
        gw.stop()
    return gw.data_dir


class Console:
    def __init__(self, data_dir: Path, port: int, process: subprocess.Popen, log: Path):
        self.data_dir, self.port, self.process, self.log = data_dir, port, process, log
        self.url = f"https://127.0.0.1:{port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def access(self) -> list[dict]:
        path = self.data_dir / "console" / "access.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _imguard(*args: str, data_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(PYTHON), "-m", "imguard", *args, "--data-dir", str(data_dir)], input=stdin,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def console_args() -> list[str]:
    """More arguments of `imguard console` (a module that imports `console` may override this)."""
    return []


@pytest.fixture(scope="module")
def console(filled, tmp_path_factory, console_port, console_args):
    """`imguard console` on the filled folder (the playground on the gateway's rules), with accounts made by
    `imguard console user add`."""
    for name, role in (("ada", "admin"), ("anna", "analyst"), ("bert", "analyst"), ("audrey", "auditor"),
                       ("tom", "auditor")):
        result = _imguard("console", "user", "add", name, "--role", role, "--password-file", "-",
                          data_dir=filled, stdin=PASSWORD + "\n")
        assert result.returncode == 0, result.stderr
    users = filled / "console" / "users.json"
    assert users.stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in users.read_text() and "$argon2id$" in users.read_text()
    port = console_port
    log = tmp_path_factory.mktemp("console-log") / "console.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(PYTHON), "-m", "imguard", "console", "--data-dir", str(filled),
                                    "--console-port", str(port), "--rules", str(filled.parent / "rules"),
                                    *console_args],
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 60, process, what="imguard console")
    except PeerError:
        stop_process(process)
        raise
    yield Console(filled, port, process, log)
    stop_process(process)
    errors = [line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line]
    assert not errors, f"the console logged errors:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go: a folder under pytest's tmp dir, or $IMGUARD_SCREENSHOTS (docs/console-overview.png
    is the overview from such a run)."""
    if os.environ.get("IMGUARD_SCREENSHOTS"):
        folder = Path(os.environ["IMGUARD_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path_factory.mktemp("console-screenshots")


def _spki_hash(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def browser(console, tmp_path):
    """A fresh headless Chromium that trusts exactly the console's key (its SPKI), nothing else; it saves
    downloads in tmp_path/downloads without asking."""
    chromium, driver_path = _need("chromium"), _need("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    cert = (console.data_dir / "console" / "tls" / "console-cert.pem").read_bytes()
    options.add_argument(f"--ignore-certificate-errors-spki-list={_spki_hash(cert)}")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def login(driver, console: Console, name: str, password: str = PASSWORD) -> None:
    """Fill and send the login form; return once the answer page has replaced it."""
    submit(driver, console.url + "/login", {"name": name, "password": password}, "login-submit")


def submit(driver, url: str | None, fields: dict, button: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    if url:
        driver.get(url)
    for field, value in fields.items():
        driver.find_element(By.ID, field).send_keys(value)
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, button).click()
    WebDriverWait(driver, 15).until(lambda d: replaced(old))


def replaced(element) -> bool:
    """Whether the page `element` belonged to has gone. Selenium's staleness_of expects a StaleElementReference;
    Chromium may instead answer, while the new page replaces the old, "Node with given id does not belong to the
    document" (seen under load): that is gone too."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    try:
        element.is_enabled()
        return False
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        if "does not belong to the document" in str(e) or "No node with given id" in str(e):
            return True
        raise


def shot(driver, shots: Path, name: str) -> None:
    driver.save_screenshot(str(shots / f"{name}.png"))


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.TAG_NAME, "body").text


# --- transport -------------------------------------------------------------------------------------------

def test_https_certificate_is_issued_by_imguards_ca(console, tmp_path):
    """The console speaks only HTTPS, with a certificate for its loopback address that chains to imguard's CA
    (checked by Python's ssl against the CA `imguard ca --export` gives, not by the browser)."""
    ca = tmp_path / "ca.pem"
    assert _imguard("ca", "--export", str(ca), data_dir=console.data_dir).returncode == 0
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", console.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            issuer = dict(x[0] for x in tls.getpeercert()["issuer"])
    assert issuer.get("organizationName") == "imguard", issuer
    with socket.create_connection(("127.0.0.1", console.port), timeout=10) as raw:     # plain HTTP: no page
        raw.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(100)
        except (TimeoutError, ConnectionError):
            answer = b""
    assert b"200 OK" not in answer


# --- pages -----------------------------------------------------------------------------------------------

def test_login_overview_and_alert_filter(browser, console, shots):
    """An analyst logs in, sees the overview's counts and chart, and filters the alerts by rule: only the
    malware alert is left."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(console.url + "/login")
    shot(browser, shots, "login")
    login(browser, console, "anna")
    assert browser.current_url == console.url + "/", body_text(browser)
    text = body_text(browser)
    assert "By rule" in text and "malware" in text and "xmpp" in text, text
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar"), "the overview has no chart bars"
    assert browser.execute_script("return document.scripts.length") == 0
    shot(browser, shots, "overview")

    browser.get(console.url + "/alerts")
    all_rows = browser.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")
    assert len(all_rows) >= 2, body_text(browser)
    Select(browser.find_element(By.ID, "filter-rule")).select_by_visible_text("malware")
    submit(browser, None, {}, "filter-submit")
    assert "rule=malware" in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "#alerts tbody tr")
    assert len(rows) == 1 and "malware" in rows[0].text and len(rows) < len(all_rows), [r.text for r in rows]
    shot(browser, shots, "alerts-filtered")


def test_blocked_file_alert_to_conversation(browser, console, shots):
    """The blocked file's alert names who sent what to whom over what, the rule in words, the file's facts and
    the sender's notice; its link leads to the conversation, where both sides appear in order with the blocked
    file and the blocked message inline."""
    from selenium.webdriver.common.by import By

    login(browser, console, "audrey")
    browser.get(console.url + f"/alerts?sha256={EICAR_SHA256}")
    links = browser.find_elements(By.CSS_SELECTOR, "#alerts tbody tr td.time a")
    assert len(links) == 1, body_text(browser)
    browser.get(links[0].get_attribute("href"))
    text = body_text(browser)
    assert browser.find_element(By.ID, "hash-sha256").text == EICAR_SHA256
    assert browser.find_element(By.ID, "alert-sender").text == f"{CAROL}@localhost"
    assert f"{DAVE}@localhost" in text and "xmpp (ibb)" in text and "outbound" in text
    assert "Malware signature match" in text and "YARA rule EICAR_Test_File" in text
    assert "blocked" in browser.find_element(By.ID, "notice").text
    name = browser.find_element(By.CSS_SELECTOR, "#file-facts .fname").text
    assert name == "invoice[U+202E]fdp.exe", repr(name)      # the override is shown, not obeyed
    shot(browser, shots, "alert")

    browser.get(browser.find_element(By.ID, "to-conversation").get_attribute("href"))
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#conversation li.item")]
    joined = "\n".join(items)
    order = ["hello dave, the numbers are in", HOSTILE, "invoice[U+202E]fdp.exe", "project-bluebird is next",
             "sentinel after the blocked items"]
    positions = [joined.find(piece) for piece in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (positions, joined)
    blocked = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#conversation li.item.act-block")]
    assert any("fdp.exe" in t for t in blocked) and any("project-bluebird" in t for t in blocked), blocked
    sides = {li.get_attribute("class").split()[1] for li in browser.find_elements(By.CSS_SELECTOR,
                                                                                     "#conversation li.item")}
    assert sides == {"side-a", "side-b"}, sides
    shot(browser, shots, "conversation")


def test_hostile_text_is_inert(browser, console, shots):
    """Message text that is markup stays text: no script ran (the page's window flag is unset, no dialog
    opened), the DOM holds the characters, not a script or img element; a bidi override is a visible mark."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    login(browser, console, "audrey")
    browser.get(console.url + "/conversations?" + urllib.parse.urlencode({"person": DAVE}))
    shot(browser, shots, "conversations-search")
    browser.get(console.url + "/conversations/view?" + urllib.parse.urlencode(
        {"protocol": "xmpp", "a": f"{CAROL}@localhost", "b": f"{DAVE}@localhost"}))
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text        # noqa: B018 - an alert(1) would have opened a dialog
    assert browser.execute_script("return window.imguardXss === undefined")
    assert browser.execute_script("return document.querySelectorAll('main script, main img').length") == 0
    texts = browser.execute_script(
        "return Array.from(document.querySelectorAll('#conversation .text')).map(e => e.textContent)")
    assert HOSTILE in texts and HOSTILE_FLAG in texts, texts
    hostile = [e for e in browser.find_elements(By.CSS_SELECTOR, "#conversation .text")
               if e.get_attribute("textContent") == HOSTILE][0]
    assert browser.execute_script("return arguments[0].children.length", hostile) == 0
    bidi = [t for t in texts if t.startswith("see the file")]
    assert bidi == ["see the file [U+202E]txt.exe"], bidi
    assert "\u202e" not in browser.page_source
    shot(browser, shots, "conversation-hostile")


def test_post_without_csrf_token_is_refused(browser, console):
    """The logout form without its hidden token is refused (403) and the session lives on; a POST from outside
    the page (no token) is refused too."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    login(browser, console, "audrey")
    browser.execute_script("document.querySelector('form.logout input[name=csrf]').remove()")
    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    WebDriverWait(browser, 15).until(lambda d: replaced(old))
    assert "refused: this form has no valid CSRF token" in body_text(browser)
    browser.get(console.url + "/alerts")
    assert "/alerts" in browser.current_url and "Log out" in body_text(browser), "the refused logout logged out"

    cookies = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())
    status = _post(console, "/logout", {"csrf": "forged"}, cookies)
    assert status == 403
    status = _post(console, "/login", {"name": "ada", "password": PASSWORD}, "")
    assert status == 403, "a login form without a token was served"
    assert any(e["event"]["action"] == "console_csrf_refused" for e in console.access())

    submit(browser, console.url + "/alerts", {}, "logout-submit")      # the same form with its token: served
    assert browser.current_url.endswith("/login")
    browser.get(console.url + "/alerts")
    assert browser.current_url.endswith("/login"), "the session outlived its logout"


def _post(console: Console, path: str, form: dict, cookies: str) -> int:
    context = ssl._create_unverified_context()      # noqa: S323 - the certificate is checked in its own test
    request = urllib.request.Request(console.url + path, data=urllib.parse.urlencode(form).encode(),
                                     headers={"Cookie": cookies} if cookies else {}, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_auditor_cannot_reach_analyst_page(browser, console, shots):
    """The quarantine is an analyst's page: an auditor has no link to it and is refused at its address (and the
    refusal is logged); an analyst sees the EICAR file there."""
    from selenium.webdriver.common.by import By

    login(browser, console, "audrey")
    assert not browser.find_elements(By.LINK_TEXT, "Quarantine")
    browser.get(console.url + "/quarantine")
    assert "may not read quarantine" in browser.find_element(By.ID, "error-message").text
    assert EICAR_SHA256 not in browser.page_source
    assert any(e["event"]["action"] == "console_denied" and e["user"]["name"] == "audrey" for e in console.access())
    browser.get(console.url + "/users")
    assert "may not manage users" in body_text(browser)

    browser.delete_all_cookies()
    login(browser, console, "anna")
    browser.get(console.url + "/quarantine")
    assert EICAR_SHA256 in browser.find_element(By.ID, "quarantine").text
    shot(browser, shots, "quarantine")


def test_wrong_passwords_are_throttled(browser, console):
    """After five wrong passwords the account is locked for a while: even the right password is refused then."""
    from selenium.webdriver.common.by import By

    for _ in range(5):
        login(browser, console, "tom", "not-the-password")
        assert "Wrong name or password" in browser.find_element(By.ID, "login-message").text
    login(browser, console, "tom")
    assert "Too many failed logins" in browser.find_element(By.ID, "login-message").text
    assert browser.current_url.endswith("/login")
    attempts = [e for e in console.access() if e["event"]["action"] == "console_login" and e["user"]["name"] == "tom"]
    assert [e["event"]["outcome"] for e in attempts] == ["failure"] * 6
    assert attempts[-1]["imguard"]["console"]["reason"] == "throttled"


def test_access_log_and_formula_safe_export(browser, console):
    """Who read which alert and conversation is in the access log (0600); the CSV export defuses a formula a
    sender typed, as `imguard archive search --format csv` does."""
    from selenium.webdriver.common.by import By

    login(browser, console, "ada")
    browser.get(console.url + f"/alerts?sha256={EICAR_SHA256}")
    browser.get(browser.find_element(By.CSS_SELECTOR, "#alerts tbody tr td.time a").get_attribute("href"))
    alert_id = browser.current_url.rsplit("/", 1)[1]
    browser.get(browser.find_element(By.ID, "to-conversation").get_attribute("href"))
    log = console.data_dir / "console" / "access.jsonl"
    assert log.stat().st_mode & 0o777 == 0o600
    events = [e for e in console.access() if e["user"]["name"] == "ada"]
    actions = [(e["event"]["action"], e["imguard"]["console"].get("alert")) for e in events]
    assert ("console_view_alert", alert_id) in actions, actions
    assert any(a == "console_view_conversation" for a, _ in actions), actions

    browser.get(console.url + "/conversations?text=HYPERLINK")
    href = browser.find_element(By.ID, "export-csv").get_attribute("href")
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())
    context = ssl._create_unverified_context()      # noqa: S323
    with urllib.request.urlopen(urllib.request.Request(href, headers={"Cookie": cookies}), context=context,
                                timeout=10) as answer:
        csv_text = answer.read().decode()
    assert "'" + FORMULA.replace('"', '""') in csv_text, csv_text
    assert "\n" + FORMULA not in csv_text and "," + FORMULA not in csv_text
    assert any(e["event"]["action"] == "console_export" for e in console.access())


# --- quarantine: the analysis download, the release workflow --------------------------------------------------

def wait_download(folder: Path, name: str, timeout: float = 20.0) -> Path:
    """The finished download `name` in `folder` (Chromium writes NAME.crdownload first, then renames it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = folder / name
        if path.exists() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"no download {name} in {folder}: {sorted(p.name for p in folder.iterdir())}")


def seven_zip() -> str:
    found = shutil.which("7zz") or shutil.which("7z")
    if not found:
        pytest.skip("7-Zip is not installed (tools/setup.sh test installs 7zip)")
    return found


def test_analyst_downloads_the_file_only_as_an_encrypted_zip(browser, console, shots, tmp_path):
    """The analyst's download is a zip that 7-Zip (not the library that wrote it) lists as AES-256 and opens with
    `infected` into bytes whose SHA-256 is the alert's; the raw file is nowhere in it; the download is in the access
    log. An auditor sees no download link and is refused at its address."""
    from selenium.webdriver.common.by import By

    login(browser, console, "audrey")
    browser.get(console.url + f"/quarantine/{EICAR_SHA256}/zip")
    assert "may not download quarantined files" in body_text(browser)
    assert not list(browser.downloads.iterdir()), "an auditor got a download"

    browser.delete_all_cookies()
    login(browser, console, "anna")
    browser.get(console.url + f"/alerts?sha256={EICAR_SHA256}")
    browser.get(browser.find_element(By.CSS_SELECTOR, "#alerts tbody tr td.time a").get_attribute("href"))
    alert_hash = browser.find_element(By.ID, "hash-sha256").text
    browser.get(console.url + "/quarantine")
    browser.find_element(By.LINK_TEXT, EICAR_SHA256).click()
    assert "malware: a release needs 2 analysts" in browser.find_element(By.ID, "malware").text
    shot(browser, shots, "quarantine-file")
    browser.find_element(By.ID, "download-zip").click()
    zipped = wait_download(browser.downloads, f"{EICAR_SHA256}.zip")
    assert EICAR not in zipped.read_bytes()
    seven = seven_zip()
    listing = subprocess.run([seven, "l", "-slt", "-pinfected", str(zipped)], capture_output=True, text=True)
    assert "Method = AES-256" in listing.stdout and "Encrypted = +" in listing.stdout, listing.stdout
    out = tmp_path / "unzipped"
    subprocess.run([seven, "x", "-pinfected", f"-o{out}", str(zipped)], check=True, capture_output=True)
    (member,) = out.iterdir()
    assert hashlib.sha256(member.read_bytes()).hexdigest() == alert_hash == EICAR_SHA256
    downloads = [e for e in console.access() if e["event"]["action"] == "console_download_quarantine"]
    assert [(e["user"]["name"], e["imguard"]["console"]["sha256"]) for e in downloads] == [("anna", EICAR_SHA256)]


def decide(browser, console: Console, request_id: int, reason: str, button: str = "approve") -> None:
    browser.get(console.url + f"/quarantine/{EICAR_SHA256}")
    submit(browser, None, {f"reason-{request_id}": reason} if reason else {}, f"{button}-{request_id}")


def test_release_from_the_notice_to_a_one_time_link(browser, console, shots, tmp_path):
    """Carol's notice names the release page; she asks there (no account); one analyst's approval does not release
    malware, nor does the same analyst approving twice, nor an approval without a reason; a second analyst's does,
    and the link shown to them gives dave's browser the file once. Every step is in the access log and the
    quarantine's ledger, which `imguard archive verify` still finds intact."""
    from selenium.webdriver.common.by import By

    notice = (console.data_dir.parent / "notice.txt").read_text()
    url = re.search(r"https://\S+/release\?sha256=[0-9a-f]{64}", notice).group()
    assert url.startswith(console.url) and url.endswith(EICAR_SHA256), notice
    browser.get(url)
    shot(browser, shots, "release-request")
    submit(browser, None, {"requester": f"{CAROL}@localhost/laptop", "why": "the <b>customer</b> needs it"},
           "release-submit")
    message = browser.find_element(By.ID, "release-message").text
    assert "is recorded" in message and "Two analysts" in message, message
    request_id = int(re.search(r"number (\d+)", message).group(1))

    login(browser, console, "anna")
    browser.get(console.url + "/quarantine")
    assert f"{CAROL}@localhost" in browser.find_element(By.ID, "pending").text
    decide(browser, console, request_id, "")
    assert "an approval needs a reason" in browser.find_element(By.ID, "release-problem").text
    decide(browser, console, request_id, "vendor says it is their test file")
    state = browser.find_element(By.CSS_SELECTOR, f"#request-{request_id} .state").text
    assert state == "approved" and not browser.find_elements(By.ID, "release-link")
    decide(browser, console, request_id, "me again")
    assert "approved this already" in browser.find_element(By.ID, "release-problem").text
    assert "the <b>customer</b> needs it" in browser.find_element(By.ID, f"request-{request_id}").text

    browser.delete_all_cookies()
    login(browser, console, "bert")
    decide(browser, console, request_id, "checked: the EICAR test string")
    link = browser.find_element(By.ID, "release-link").get_attribute("href")
    assert browser.find_element(By.CSS_SELECTOR, f"#request-{request_id} .state").text == "released"
    shot(browser, shots, "release-approved")

    browser.delete_all_cookies()            # dave has no console account: the link is all he needs
    browser.get(link)
    browser.find_element(By.ID, "released-download").click()       # a download: the page stays
    got = wait_download(browser.downloads, "invoice_fdp.exe")
    assert hashlib.sha256(got.read_bytes()).hexdigest() == EICAR_SHA256
    browser.get(link)
    submit(browser, None, {}, "released-download")
    assert "unknown, used or expired" in body_text(browser)

    steps = [(e["event"]["action"], e["event"]["outcome"]) for e in console.access()
             if e["event"]["action"].startswith("console_release")]
    assert steps == [("console_release_request", "success"), ("console_release_approve", "failure"),
                     ("console_release_approve", "success"), ("console_release_approve", "failure"),
                     ("console_release_approve", "success"), ("console_release", "success"),
                     ("console_release_download", "success"), ("console_release_download", "failure")], steps
    ledger = [json.loads(line) for line in (console.data_dir / "quarantine" / "ledger.jsonl").read_text().splitlines()]
    ops = [(e["op"], (e.get("extra") or {}).get("actor")) for e in ledger if e["op"].startswith("release")]
    assert ops[:4] == [("release_request", f"{CAROL}@localhost"), ("release_approve", "anna"),
                       ("release_approve", "bert"), ("release", "bert")], ops
    assert ops[4][0] == "release_download" and len(ops) == 5
    verify = _imguard("archive", "verify", data_dir=console.data_dir)
    assert verify.returncode == 0 and "quarantine" in verify.stdout, verify.stdout + verify.stderr


# --- the rule playground ----------------------------------------------------------------------------------

def test_playground_explains_like_the_cli_and_changes_nothing(browser, console, shots, tmp_path):
    """A pasted message and an uploaded file get the decision and the words of `imguard rules explain` and
    `imguard scan --explain` (run here as commands on the same rules); hostile text comes back inert; nothing is
    added to alerts.jsonl, the archive or the quarantine's ledger; an auditor is refused; no CSRF token, no answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rules = console.data_dir.parent / "rules"
    before = [(console.data_dir / name).stat().st_size for name in ("alerts.jsonl", "archive.sqlite3")] + [
        (console.data_dir / "quarantine" / "ledger.jsonl").read_bytes()]

    login(browser, console, "audrey")
    browser.get(console.url + "/playground")
    assert "may not use the rule playground" in body_text(browser)
    browser.delete_all_cookies()

    login(browser, console, "anna")
    text = "project-bluebird <script>window.imguardXss = 3</script> \u202eevil"
    browser.get(console.url + "/playground")
    browser.find_element(By.ID, "pg-text").send_keys(text)
    Select(browser.find_element(By.ID, "pg-direction")).select_by_value("outbound")
    submit(browser, None, {"pg-sender": f"{CAROL}@localhost", "pg-recipient": f"{DAVE}@localhost"}, "pg-submit")
    assert browser.find_element(By.ID, "pg-action").text == "block"
    assert browser.execute_script("return window.imguardXss === undefined")
    assert browser.execute_script("return document.querySelectorAll('main script').length") == 0
    cli = subprocess.run([str(PYTHON), "-m", "imguard", "rules", "explain", str(rules), "--text", text,
                          "--sender", f"{CAROL}@localhost", "--recipient", f"{DAVE}@localhost", "--protocol", "xmpp",
                          "--direction", "outbound"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    shown = browser.find_element(By.ID, "pg-explain").get_attribute("textContent")
    assert shown == cli.stdout.rstrip("\n").replace("\u202e", "[U+202E]"), (shown, cli.stdout)
    shot(browser, shots, "playground-message")

    sample = tmp_path / "report<b>.com"
    sample.write_bytes(EICAR)
    browser.get(console.url + "/playground")
    browser.find_element(By.ID, "pg-file").send_keys(str(sample))
    submit(browser, None, {"pg-sender": f"{CAROL}@localhost", "pg-recipient": f"{DAVE}@localhost"}, "pg-submit")
    assert browser.find_element(By.ID, "pg-action").text == "block"
    cli = subprocess.run([str(PYTHON), "-m", "imguard", "scan", "--explain", str(sample), "--rules", str(rules),
                          "--signatures", str(BUNDLED_SIGNATURES), "--data-dir", str(tmp_path / "scan"),
                          "--protocol", "xmpp", "--sender", f"{CAROL}@localhost", "--recipient",
                          f"{DAVE}@localhost"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1, cli.stderr            # 1: something blocked
    shown = browser.find_element(By.ID, "pg-explain").get_attribute("textContent").splitlines()
    expected = cli.stdout.rstrip("\n").splitlines()
    assert shown[0] == "report<b>.com" and shown[1:] == expected[1:], (shown, expected)
    assert "  sha256   " + EICAR_SHA256 in shown
    shot(browser, shots, "playground-file")

    after = [(console.data_dir / name).stat().st_size for name in ("alerts.jsonl", "archive.sqlite3")] + [
        (console.data_dir / "quarantine" / "ledger.jsonl").read_bytes()]
    assert after == before, "the playground wrote to the data folder"
    plays = [e["imguard"]["console"] for e in console.access() if e["event"]["action"] == "console_playground"]
    assert [(p["kind"], p["decision"]) for p in plays[-2:]] == [("message", "block"), ("file", "block")]

    browser.get(console.url + "/playground")
    browser.execute_script("document.querySelector('#playground input[name=csrf]').remove()")
    browser.find_element(By.ID, "pg-text").send_keys("hello")
    submit(browser, None, {}, "pg-submit")
    assert "refused: this form has no valid CSRF token" in body_text(browser)
