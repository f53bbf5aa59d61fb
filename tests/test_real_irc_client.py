"""IRC DCC through the gateway, done by a real IRC client: WeeChat's own xfer plugin on both ends, no DCC written by
the test (tests/test_e2e_irc.py drives DCC with the `irc` library and test-written offers; this file checks that what
a real client does crosses the same way).

Two headless WeeChats (Debian `weechat-headless` with `weechat-plugins`: the fifo plugin is how the test types
`/dcc send`), each with its own home, both joined to #imguard on a real ngIRCd. The one inside the company connects
through the real `imguard run` (reverse:tcp, DCC offers rewritten to its relay), the one outside straight to
ngIRCd; each test runs both ways round:

- outbound: WeeChat inside sends, WeeChat outside receives (auto-accepting into a folder);
- inbound: WeeChat outside sends, WeeChat inside receives;

and a control with both straight to ngIRCd (no gateway), which proves the fixture delivers EICAR, so that its
absence through the gateway is the gateway's doing.

What is asserted comes from the clients themselves: the bytes in the receiver's download folder, the receiver's
own account of the transfer (its core log: "received ...: OK" or "FAILED"), and the notice WeeChat shows in its
server buffer (its logger plugin writes every buffer to a file); the gateway's alert log is checked beside them.
After a blocked file, a clean file is sent the same way and waited for (the sentinel): WeeChat keeps doing DCC.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.peers.ngircd import CHANNEL, IrcGateway, NgIrcd

pytestmark = pytest.mark.timeout(180)

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = b"quarterly numbers, nothing secret\n" * 300 + bytes(range(256)) * 16     # binary tail, 14.3 kB
TIMEOUT = 20.0
WAYS = ("outbound", "inbound")     # outbound: WeeChat inside sends; inbound: WeeChat inside receives


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weechat_binary() -> str:
    """weechat-headless, with its fifo plugin (how the test types commands); missing: a skip, a failure under CI."""
    binary = shutil.which("weechat-headless")
    if binary is None:
        missing = "weechat-headless is not installed"
    elif not list(Path("/usr/lib").glob("**/weechat/plugins/fifo.so")):
        missing = "WeeChat's fifo plugin is not installed (Debian: weechat-plugins)"
    else:
        return binary
    message = f"{missing}: run `tools/setup.sh test`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class WeeChat:
    """One headless WeeChat with its own home: connected to `port` as `nick`, joined to #imguard, auto-accepting DCC
    files into `downloads`. Commands go in through its fifo plugin; what it shows is read from its logger's files."""

    def __init__(self, home: Path, port: int, nick: str):
        self.home, self.port, self.nick = home, port, nick
        self.downloads = home / "downloads"
        self.fifo = home / "fifo"
        self.logs = home / "logs"
        self.process: subprocess.Popen | None = None

    def start(self) -> "WeeChat":
        self.downloads.mkdir(parents=True)
        commands = ";".join([
            f"/set fifo.file.path {self.fifo}", f"/set logger.file.path {self.logs}",
            "/set logger.file.flush_delay 0", "/set logger.level.core.weechat 9",
            "/set xfer.file.auto_accept_files on", f"/set xfer.file.download_path {self.downloads}",
            f"/server add s 127.0.0.1/{self.port} -notls", f"/set irc.server.s.nicks {self.nick}",
            f"/set irc.server.s.autojoin {CHANNEL}", "/connect s"])
        self.process = subprocess.Popen([weechat_binary(), "-d", str(self.home), "-r", commands],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def log(self, buffer: str) -> str:
        """What WeeChat wrote in `buffer` ("core.weechat", "irc.server.s", "irc.s.#imguard")."""
        path = self.logs / f"{buffer}.weechatlog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, buffer: str, text: str, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.log(buffer):
            if time.monotonic() > deadline or self.process.poll() is not None:
                return False
            time.sleep(0.1)
        return True

    def joined(self) -> None:
        assert self.wait_log(f"irc.s.{CHANNEL}", f"{self.nick} (", TIMEOUT), (
            f"WeeChat {self.nick} did not join {CHANNEL}:\n{self.log('irc.server.s')}")

    def command(self, text: str) -> None:
        """Type `text` in the server buffer (a /command): one line into WeeChat's fifo."""
        deadline = time.monotonic() + TIMEOUT
        while not (self.fifo.exists() and stat.S_ISFIFO(self.fifo.stat().st_mode)):
            assert time.monotonic() < deadline, f"WeeChat {self.nick} made no fifo at {self.fifo}"
            time.sleep(0.05)
        fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)      # ENXIO rather than a hang if nobody reads it
        try:
            os.write(fd, f"irc.server.s *{text}\n".encode())
        finally:
            os.close(fd)

    def send_file(self, to: "WeeChat", path: Path) -> None:
        self.command(f"/dcc send {to.nick} {path}")

    def transfer_result(self, name: str, sender: "WeeChat", timeout: float = TIMEOUT) -> str | None:
        """How the receiver's xfer plugin ended the transfer of `name` from `sender`: "OK", "FAILED" (None while
        it has not ended)."""
        line = f"xfer: file {name} received from {sender.nick} "
        deadline = time.monotonic() + timeout
        while True:
            for row in self.log("core.weechat").splitlines():
                if line in row:
                    return row.rsplit(":", 1)[1].strip()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def received(self, name: str, sender: "WeeChat") -> Path:
        """Where WeeChat stores `name` from `sender` (xfer.file.use_nick_in_filename: "<nick>.<name>")."""
        return self.downloads / f"{sender.nick}.{name}"

    def landed(self) -> list[str]:
        return sorted(p.name for p in self.downloads.iterdir())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def irc_world(tmp_path_factory):
    """A real ngIRCd and the real `imguard run` in front of it (DCC relay on 127.0.0.1), for this module."""
    weechat_binary()
    directory = tmp_path_factory.mktemp("real-irc-client")
    ircd = NgIrcd.start(directory / "ngircd")
    gw = None
    try:
        gw = IrcGateway.start(directory / "imguard", ircd)
        yield ircd, gw
    finally:
        if gw is not None:
            gw.stop()
        ircd.stop()


class Pair:
    """A sender and a receiver WeeChat for one test: which of them goes through the gateway is the way's."""

    def __init__(self, directory: Path, ircd: NgIrcd, gw: IrcGateway | None, way: str):
        tag = uuid.uuid4().hex[:5]
        self.tag, self.gw, self.directory = tag, gw, directory
        inside_port = gw.port if gw is not None else ircd.port
        sender_port = inside_port if way == "outbound" else ircd.port
        receiver_port = ircd.port if way == "outbound" else inside_port
        # fresh nicks: imguard merges repeats of an identical alert from the same sender
        self.sender = WeeChat(directory / "sender", sender_port, f"ws{tag}")
        self.receiver = WeeChat(directory / "receiver", receiver_port, f"wr{tag}")
        self.inside = self.sender if way == "outbound" else self.receiver
        self.since = gw.mark() if gw is not None else 0

    def __enter__(self) -> "Pair":
        for w in (self.sender, self.receiver):
            w.start()
        for w in (self.sender, self.receiver):
            w.joined()
        return self

    def __exit__(self, *exc) -> None:
        for w in (self.sender, self.receiver):
            w.stop()
        if self.gw is not None:
            self.gw.check_alive()

    def file(self, stem: str, data: bytes, suffix: str) -> Path:
        path = self.directory / f"{stem}-{self.tag}{suffix}"
        path.write_bytes(data)
        return path

    def deliver(self, path: Path) -> tuple[str | None, bytes | None]:
        """The sender offers `path`; the receiver's result for it and the bytes that landed (None: no file)."""
        self.sender.send_file(self.receiver, path)
        result = self.receiver.transfer_result(path.name, self.sender)
        landed = self.receiver.received(path.name, self.sender)
        return result, landed.read_bytes() if landed.exists() else None

    def failure(self) -> str:
        parts = [f"--- {w.nick} {b}:\n{w.log(b)[-3000:]}" for w in (self.sender, self.receiver)
                 for b in ("core.weechat", "irc.server.s")]
        return "\n".join(parts) + ("\n" + self.gw.logs() if self.gw is not None else "")


def file_alert(gw: IrcGateway, since: int, name: str, actions: tuple[str, ...]) -> dict | None:
    return gw.wait_alert(lambda e: e.get("file", {}).get("name") == name and e["event"].get("action") in actions,
                         since=since)


@pytest.mark.parametrize("way", WAYS)
def test_clean_file_by_weechat_dcc_arrives_byte_identical(irc_world, tmp_path, way):
    """A harmless file sent by WeeChat's `/dcc send` crosses the gateway's DCC relay and lands in the receiving
    WeeChat's folder byte-identical; the gateway scanned it on the way (its allow event names the file, the hash,
    both nicks and the mechanism)."""
    ircd, gw = irc_world
    with Pair(tmp_path, ircd, gw, way) as pair:
        path = pair.file("numbers", CLEAN, ".bin")
        result, data = pair.deliver(path)
        assert result == "OK", f"the receiver's xfer ended with {result!r}\n{pair.failure()}"
        assert data is not None and sha256(data) == sha256(CLEAN), f"landed: {pair.receiver.landed()}"
        alert = file_alert(gw, pair.since, path.name, ("allow", "alert"))
        assert alert, f"the gateway recorded no decision on {path.name}: it did not cross the relay\n{pair.failure()}"
        assert alert["file"]["hash"]["sha256"] == sha256(CLEAN)
        ctx = alert["imguard"]["context"]
        assert ctx["transfer_mechanism"] == "dcc" and ctx["direction"] == way, ctx
        assert alert["source"]["user"]["name"].split("!")[0] == pair.sender.nick, alert["source"]
        assert pair.receiver.nick in ctx["recipients"], ctx


@pytest.mark.parametrize("way", WAYS)
def test_eicar_by_weechat_dcc_never_lands_and_the_inside_user_is_told(irc_world, tmp_path, way):
    """EICAR sent by WeeChat's `/dcc send`: the receiving WeeChat's own xfer ends FAILED and nothing of it is in its
    folder; the WeeChat inside the gateway is told in its server buffer by imguard's NOTICE (outbound: its file
    was blocked; inbound: a file sent to it was blocked; DCC gives no way to tell an outside sender). Then a clean
    file, sent the same way, lands (the sentinel): both clients keep doing DCC."""
    ircd, gw = irc_world
    with Pair(tmp_path, ircd, gw, way) as pair:
        path = pair.file("eicar", EICAR, ".com")
        result, data = pair.deliver(path)
        assert result == "FAILED", f"the receiver's xfer of the blocked file ended {result!r}\n{pair.failure()}"
        assert data is None or EICAR not in data, f"the blocked file landed: {pair.receiver.landed()}"
        alert = file_alert(gw, pair.since, path.name, ("block", "quarantine"))
        assert alert, f"no block event for {path.name}\n{pair.failure()}"
        assert alert["file"]["hash"]["sha256"] == sha256(EICAR) and alert.get("rule", {}).get("id"), alert
        ctx = alert["imguard"]["context"]
        assert ctx["transfer_mechanism"] == "dcc" and ctx["direction"] == way, ctx
        notice = (f"Your file {path.name} was blocked" if way == "outbound"
                  else f"the file '{path.name}' from {pair.sender.nick} was blocked")
        assert pair.inside.wait_log("irc.server.s", notice), (
            f"WeeChat {pair.inside.nick} (inside) shows no notice {notice!r}\n{pair.failure()}")
        outside = pair.receiver if way == "outbound" else pair.sender
        assert "was blocked" not in outside.log("irc.server.s"), "imguard wrote to the outside user's connection"

        sentinel = pair.file("sentinel", CLEAN + pair.tag.encode(), ".txt")
        result, data = pair.deliver(sentinel)
        assert result == "OK" and data == CLEAN + pair.tag.encode(), f"the sentinel file: {result}\n{pair.failure()}"
        assert not pair.receiver.received(path.name, pair.sender).exists() or \
            EICAR not in pair.receiver.received(path.name, pair.sender).read_bytes()


def test_control_without_the_gateway_weechat_delivers_eicar(irc_world, tmp_path):
    """Both WeeChats straight to ngIRCd: EICAR lands byte-identical and its sender is told nothing. The same clients
    and commands as above, so what the gateway routes stop is the gateway's doing."""
    ircd, _ = irc_world
    with Pair(tmp_path, ircd, None, "outbound") as pair:
        path = pair.file("eicar", EICAR, ".com")
        result, data = pair.deliver(path)
        assert result == "OK" and data == EICAR, f"{result!r}, {pair.receiver.landed()}\n{pair.failure()}"
        assert "was blocked" not in pair.sender.log("irc.server.s")
