"""`imguard sniff` on a live interface (loopback here): the same sessions and policy as the gateway, alert-only."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.inspect_samples import EICAR

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sniff_sees_irc_chat_and_a_dcc_file_and_alerts_on_eicar(tmp_path):
    """A chat line and an EICAR file sent by DCC cross loopback; sniff reports both and writes the alert."""
    irc_port, dcc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imguard", "sniff", "lo", "--filter",
                             f"tcp port {irc_port} or tcp port {dcc_port}", "--seconds", "8", "--json",
                             "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        line = proc.stderr.readline()
        assert "sniffing on lo" in line, line + proc.stderr.read()
        time.sleep(1.0)             # tcpdump has opened the socket when it says so; give it a moment to filter

        server = socket.create_server(("127.0.0.1", irc_port))
        dcc = socket.create_server(("127.0.0.1", dcc_port))

        def irc_server():
            conn, _ = server.accept()
            while conn.recv(65536):
                pass
            conn.close()

        def dcc_sender():
            conn, _ = dcc.accept()
            conn.sendall(EICAR)
            conn.recv(4)                    # the receiver's acknowledgement of 68 bytes
            conn.close()

        threads = [threading.Thread(target=irc_server), threading.Thread(target=dcc_sender)]
        for t in threads:
            t.start()
        client = socket.create_connection(("127.0.0.1", irc_port))
        client.sendall(b"NICK alice\r\nUSER alice 0 * :Alice\r\nPRIVMSG #team :good morning team\r\n")
        time.sleep(0.2)
        client.sendall(f"PRIVMSG bob :\x01DCC SEND eicar.com {0x7F000001} {dcc_port} {len(EICAR)}\x01\r\n".encode())
        time.sleep(0.3)
        receiver = socket.create_connection(("127.0.0.1", dcc_port))
        received = b""
        while len(received) < len(EICAR):
            chunk = receiver.recv(65536)
            if not chunk:
                break
            received += chunk
        receiver.sendall(len(received).to_bytes(4, "big"))
        receiver.close()
        client.close()
        for t in threads:
            t.join(5)
        server.close()
        dcc.close()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert received == EICAR            # passive: the tap never changes what crosses
    assert proc.returncode == 1, err    # something would have been blocked
    summary = json.loads(out.splitlines()[-1])
    texts = [(m["sender"], m["text"]) for m in summary["messages"]]
    assert ("alice", "good morning team") in texts
    [transfer] = [t for t in summary["transfers"] if t["name"] == "eicar.com"]
    assert transfer["action"] == "block" and transfer["size"] == len(EICAR)
    alerts = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    blocked = [a for a in alerts if a.get("file", {}).get("name") == "eicar.com"]
    assert blocked and blocked[0]["event"]["action"] == "block" and "malware" in blocked[0]["rule"]["id"]


def test_sniff_on_a_missing_interface_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "imguard", "sniff", "no-such-if0", "--seconds", "2",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert "no-such-if0" in r.stderr and "Traceback" not in r.stderr
