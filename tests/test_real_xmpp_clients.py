"""XMPP clients other than slixmpp, through the real `imguard run` to a real Prosody: what their users see.

- profanity (Debian `profanity` 0.13, a curses client on libstrophe), driven under tmux with send-keys as a user
  types: it logs in through the gateway (STARTTLS, verifying imguard's CA from its own `/tls certpath`), and
  `/sendfile` uploads by XEP-0363 with its own HTTP code (libcurl) to the slot's PUT URL, which the gateway
  rewrote to its upload relay. EICAR is refused and profanity says so in its window; a clean file is stored by
  Prosody byte-identical, and its link reaches the receiver (a slixmpp client straight to Prosody) after the
  refused one: the sentinel.
- Finch (libpurple 2.14's XMPP), under tmux: a message the policy blocks comes back as an error message carrying
  the original body (imguard/protocols/xmpp/session.py, _refuse_message). libpurple shows a message error only
  when the error stanza carries a <body>: libpurple/protocols/jabber/message.c, jabber_message_parse() reads the
  first <body> in jabber:client and the <error>'s <text>, and handle_error() begins `if(!jm->body) return;`
  before it opens the "XMPP Message Error" window, "Message delivery to <from> failed: <text>". Without the body
  Finch showed nothing at all. Here Finch's window shows it, and the blocked text never reaches the receiver
  (its sentinel, sent after, does).

Finch trusts the gateway by the certificate it is shown, pinned in its own store the way libpurple stores an
accepted certificate (~/.purple/certificates/x509/tls_peers/<host>); libpurple 2.14 reads CA certificates only
from system folders.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.peers.prosody import Prosody
from tests.test_e2e_xmpp import BLOCKED_WORD, CLEAN, EICAR
from tests.test_sametime import Finch
from tests.xmpp_clients import STARTTLS, Client, Endpoint, sha256

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 20.0


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            message = f"{tool} is not installed: run `tools/setup.sh test`"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)


def account(prosody: Prosody, role: str) -> str:
    """A fresh account (imguard merges repeats of an identical alert from one sender)."""
    user = f"{role}-{uuid.uuid4().hex[:6]}"
    prosody.add_account(user)
    return user


def outside(prosody: Prosody, user: str):
    """A slixmpp client straight to Prosody: the other party, outside the gateway."""
    endpoint = Endpoint("127.0.0.1", prosody.c2s_port, STARTTLS, ca_file=prosody.ca_file)
    return Client.connected(endpoint, f"{prosody.jid(user)}/outside", prosody.password(user))


class Terminal:
    """A curses client in its own tmux session (200x50), typed into with send-keys."""

    def __init__(self, name: str, command: str):
        self.name, self.command = f"imguard-{name}-{uuid.uuid4().hex[:6]}", command

    def start(self) -> None:
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "200", "-y", "50", self.command],
                       check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True,
                              text=True).stdout

    def type(self, line: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", line], check=True)
        subprocess.run(["tmux", "send-keys", "-t", self.name, "Enter"], check=True)

    async def wait_screen(self, text: str, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.screen():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    def stop(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


# --- profanity: XEP-0363 upload by /sendfile ----------------------------------------------------------------------

def test_profanity_sendfile_eicar_refused_and_clean_file_stored(prosody, gateway, tmp_path):
    """profanity, logged in through imguard, `/sendfile`s EICAR to bob: the gateway refuses the PUT (403), profanity's
    window says the upload failed, the gateway records the block, and Prosody never got the PUT (its own log). Then it
    `/sendfile`s a clean file: bob (outside, straight to Prosody) gets its link, the file fetched from Prosody is
    byte-identical, and the gateway scanned it on the way."""
    need("profanity", "tmux", "openssl")
    alice, bob = account(prosody, "alice"), account(prosody, "bob")
    home = tmp_path / "profanity"
    certs = home / "certs"
    certs.mkdir(parents=True)
    # libstrophe reads a CA folder the OpenSSL way: the certificate under its subject hash.
    subject_hash = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", str(gateway.ca_file)],
                                  capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(gateway.ca_file, certs / f"{subject_hash}.0")
    eicar, clean = tmp_path / f"eicar-{alice}.com", tmp_path / f"numbers-{alice}.bin"
    eicar.write_bytes(EICAR)
    clean.write_bytes(CLEAN)
    env = (f"HOME={home} XDG_CONFIG_HOME={home}/config XDG_DATA_HOME={home}/data "
           f"http_proxy=http://127.0.0.1:{gateway.http_port}")      # its HTTP through the gateway too, if it uses one
    term = Terminal("profanity", f"env {env} profanity 2>{home}/stderr")
    since = gateway.mark()

    async def scenario():
        async with outside(prosody, bob) as receiver:
            term.start()
            assert await term.wait_screen("Type '/help'"), term.screen()
            term.type(f"/tls certpath set {certs}")
            assert await term.wait_screen("Certificate path set"), term.screen()
            term.type(f"/connect {prosody.jid(alice)} server 127.0.0.1 port {gateway.c2s_port} tls force")
            assert await term.wait_screen("password"), term.screen()
            term.type(prosody.password(alice))
            assert await term.wait_screen("logged in successfully"), term.screen()
            term.type(f"/msg {prosody.jid(bob)} hello from profanity")
            assert await receiver.wait_message("hello from profanity"), receiver.bodies()

            term.type(f"/sendfile {eicar}")
            assert await term.wait_screen(f"Uploading '{eicar}' failed"), term.screen()
            assert "Server returned 403" in term.screen(), term.screen()
            blocked = await gateway.wait_alert(lambda e: e.get("file", {}).get("name") == eicar.name
                                               and e["event"].get("action") in ("block", "quarantine"), since=since)
            assert blocked and blocked["file"]["hash"]["sha256"] == sha256(EICAR), blocked
            assert blocked["source"]["user"]["name"] == prosody.jid(alice), blocked["source"]

            term.type(f"/sendfile {clean}")
            link = await receiver.wait_for(lambda r: next((m["body"] for m in r.messages
                                                           if m["body"].endswith(clean.name)), None), TIMEOUT)
            assert link, f"bob got no link to {clean.name}: {receiver.bodies()}\n{term.screen()}"
            assert not [b for b in receiver.bodies() if eicar.name in b], "a link to the refused file was sent"
            assert link.startswith(f"http://127.0.0.1:{prosody.http_port}/"), link      # Prosody's own URL
            status, data = await receiver.http_get(link)
            assert status == 200 and sha256(data) == sha256(CLEAN), "Prosody does not hold what profanity sent"
            allowed = await gateway.wait_alert(lambda e: e.get("file", {}).get("name") == clean.name
                                               and e["event"].get("action") in ("allow", "alert"), since=since)
            assert allowed and allowed["file"]["hash"]["sha256"] == sha256(CLEAN), "the clean upload was not scanned"
            # Prosody's own account of the uploads it was sent (its debug log names each request): the clean PUT
            # is there, EICAR's never came.
            puts = await prosody_puts(prosody, clean.name)
            assert any(clean.name in p for p in puts) and not any(eicar.name in p for p in puts), puts

    try:
        asyncio.run(scenario())
    finally:
        term.stop()
    gateway.check_alive()


async def prosody_puts(prosody: Prosody, expected: str, timeout: float = TIMEOUT) -> list[str]:
    """The HTTP PUTs Prosody's log records, once one naming `expected` is among them."""
    log = prosody.directory / "prosody.log"
    deadline = time.monotonic() + timeout
    while True:
        puts = [line for line in log.read_text(errors="replace").splitlines() if "Firing event: PUT /" in line]
        if any(expected in p for p in puts) or time.monotonic() > deadline:
            return puts
        await asyncio.sleep(0.2)


# --- Finch: the bounce of a blocked message, as libpurple shows it -------------------------------------------------

def starttls_certificate(port: int, domain: str = "localhost") -> str:
    """The certificate (PEM) a client is shown after XMPP STARTTLS on 127.0.0.1:`port`: here, the gateway's."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' "
                     "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>".encode())
        got = b""
        while b"</stream:features>" not in got:
            got += sock.recv(65536)
        sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        while b"<proceed" not in got:
            got += sock.recv(65536)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE      # read it, the client judges it
        with context.wrap_socket(sock, server_hostname=domain) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))


def test_the_bounce_has_what_libpurple_reads():
    """The stanza itself, read the way libpurple's jabber_message_parse() reads one: type 'error'; among the
    children, a <body> in jabber:client (its text is what handle_error() shows; without it, it returns) and an
    <error> whose <text> is the reason; the <thread> comes back too. Only the message's own body and thread are
    echoed (escaped, xml:lang kept), not its XHTML-IM copy or other payloads."""
    from xml.etree import ElementTree as ET

    from imguard.model import BLOCK, Decision
    from tests.test_xmpp_session import STANZAS, Checker, logged_in, sent

    s = logged_in(Checker({"secret": Decision(action=BLOCK, notice="No secrets <here>.")}))
    xhtml = "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>x</body></html>"
    bounce = sent(s.data_received(True, (
        "<message type='chat' to='bob@localhost/pc' id='m7'><thread>th-1</thread>"
        f"<body xml:lang='en'>the secret &amp; &lt;more&gt;</body>{xhtml}"
        "<active xmlns='http://jabber.org/protocol/chatstates'/></message>").encode()), True)
    el = ET.fromstring(bounce.replace(b"<message ", b"<message xmlns='jabber:client' ", 1))
    assert (el.get("type"), el.get("id"), el.get("from")) == ("error", "m7", "bob@localhost/pc")
    assert [c.tag for c in el] == ["{jabber:client}thread", "{jabber:client}body", "{jabber:client}error"]
    body = el.find("{jabber:client}body")
    assert body.text == "the secret & <more>" and body.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    assert el.find("{jabber:client}thread").text == "th-1"
    error = el.find("{jabber:client}error")
    assert error.find(f"{{{STANZAS}}}policy-violation") is not None
    assert error.find(f"{{{STANZAS}}}text").text == "No secrets <here>."


def window_text(screen: str, title: str) -> str:
    """The text of the gnt window titled `title` on a captured screen, down to its buttons, its lines joined by
    single spaces."""
    lines = screen.splitlines()
    top = next(i for i, line in enumerate(lines) if f"┤{title}├" in line)
    left = lines[top].index("┌")
    words = []
    for line in lines[top + 1:]:
        inside = line[left + 1:].split("│")[0]
        if line[left:left + 1] != "│" or "┌" in inside:
            break
        words += inside.split()
    return " ".join(words)


class XmppFinch(Finch):
    """Finch with one XMPP account, logging in to 127.0.0.1:`port` with STARTTLS required; `certificate` is the one
    it trusts there."""

    def __init__(self, home: Path, port: int, jid: str, password: str, certificate: str):
        self.home, self.name = home, f"imguard-finch-{uuid.uuid4().hex[:6]}"
        self.dbus = ""          # Finch.start reads it (tests/test_sametime.py): no D-Bus session here
        peers = home / ".purple" / "certificates" / "x509" / "tls_peers"
        peers.mkdir(parents=True)
        (peers / "127.0.0.1").write_text(certificate)
        (home / ".purple" / "accounts.xml").write_text(f"""<?xml version='1.0' encoding='UTF-8' ?>
<account version='1.0'><account><protocol>prpl-jabber</protocol><name>{jid}/finch</name><password>{password}</password>
<settings><setting name='connect_server' type='string'>127.0.0.1</setting>
<setting name='port' type='int'>{port}</setting>
<setting name='connection_security' type='string'>require_tls</setting></settings>
<settings ui='gnt-purple'><setting name='auto-login' type='bool'>1</setting></settings></account></account>""")

    async def shows(self, text: str, timeout: float = TIMEOUT) -> bool:
        """wait_screen that lets the event loop run (the slixmpp peer lives on it)."""
        deadline = time.monotonic() + timeout
        while text not in self.screen():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True


def test_finch_shows_the_bounce_of_a_blocked_message(prosody, gateway, tmp_path):
    """alice uses Finch through imguard; bob (outside) writes to her, and her reply names the blocked project: it
    never reaches bob, and Finch opens its "XMPP Message Error" window with the delivery failure, the policy's
    notice and her text. Her next message (the sentinel) reaches bob."""
    need("finch", "tmux")
    alice, bob = account(prosody, "alice"), account(prosody, "bob")
    tag = uuid.uuid4().hex[:6]
    finch = XmppFinch(tmp_path / "finch", gateway.c2s_port, prosody.jid(alice), prosody.password(alice),
                      starttls_certificate(gateway.c2s_port))
    since = gateway.mark()

    async def scenario():
        async with outside(prosody, bob) as receiver:
            finch.start()
            deadline = time.monotonic() + TIMEOUT
            while True:                 # until alice is online: bob's message opens her conversation window
                receiver.send_chat(prosody.jid(alice), f"hello alice {tag}")
                if await finch.shows(f"hello alice {tag}", 2):
                    break
                assert time.monotonic() < deadline, f"Finch did not log in through imguard:\n{finch.screen()}"
            finch.say(f"the {BLOCKED_WORD} plan {tag}")
            assert await finch.shows("XMPP Message Error"), f"Finch opened no message error:\n{finch.screen()}"
            for _ in range(4):          # the new window is listed in the task bar: bring it to the front
                if await finch.shows("Message delivery to", 1):
                    break
                finch.keys("M-n")
            shown = window_text(finch.screen(), "XMPP Message Error")
            assert f"Message delivery to {prosody.jid(bob)}" in shown, finch.screen()
            # the rule's notice (the error's <text/>), then her text (the echoed <body>)
            assert "failed: Your message was blocked: it names a confidential project." in shown, finch.screen()
            assert shown.endswith(f"the {BLOCKED_WORD} plan {tag}"), finch.screen()
            blocked = await gateway.wait_alert(lambda e: e["event"].get("dataset") == "imguard.message"
                                               and e["event"].get("action") == "block"
                                               and e.get("source", {}).get("user", {}).get("name")
                                               == prosody.jid(alice), since=since)
            assert blocked and blocked.get("rule", {}).get("id") == "test-codename-block", blocked
            finch.say(f"sentinel {tag}")
            assert await receiver.wait_message(f"sentinel {tag}"), f"{receiver.bodies()}\n{finch.screen()}"
            assert not [b for b in receiver.bodies() if BLOCKED_WORD in b], receiver.bodies()

    try:
        asyncio.run(scenario())
    finally:
        finch.stop()
    gateway.check_alive()
