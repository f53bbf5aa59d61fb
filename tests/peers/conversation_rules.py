"""What the conversation-control end-to-end tests (warn and continue, disclaimers, scan notices) share: their test
rules written to a folder of their own, a module gateway that must not exit by itself, a route that must log no
error, a module ngIRCd, the alert predicates they wait on, and a scan slowed on purpose (scan notices).

    RULES = rules_yaml(rule("test-warn", "Price list", "warn", "message", "keywords: [pricelist]"))

    @pytest.fixture(scope="module")
    def gateway(peers_dir, prosody):
        directory = peers_dir / "imguard-x"
        yield from serving(Gateway.start(directory, prosody, extra=rules_extra(directory, "x-rules", "50-x.yaml",
                                                                               RULES, "--warn-window-seconds", "4")))
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]


def rule(rule_id: str, title: str, action: str, applies_to: str, match: str, severity: str = "medium",
         notify: str | None = None) -> str:
    """One rule of a rules file, as YAML; `match` is its one `match:` line (`extension: [xlsq]`)."""
    lines = [f"  - id: {rule_id}", f"    title: {title}", f"    severity: {severity}", f"    action: {action}",
             f"    applies_to: {applies_to}"]
    if notify is not None:
        lines.append(f'    notify: "{notify}"')
    return "\n".join(lines + ["    match:", f"      {match}"]) + "\n"


def rules_yaml(*rules: str) -> str:
    return "\nrules:\n" + "".join(rules)


def rule_folder(directory: Path, folder: str, file: str, text: str) -> Path:
    """`text` as the one rules file `file` of `directory`/`folder` (given to the gateway by --rules)."""
    path = directory / folder
    path.mkdir(parents=True, exist_ok=True)
    (path / file).write_text(text)
    return path


def bundled_hash_lists(directory: Path) -> None:
    """The bundled rules name the bundled hash lists (rules/hashlists/); the fixtures copy only the rule files to
    `directory`/rules, so the lists go beside them first."""
    source = ROOT / "rules" / "hashlists"
    if source.is_dir():
        target = directory / "rules" / "hashlists"
        target.mkdir(parents=True, exist_ok=True)
        for path in source.glob("*.txt"):
            shutil.copy(path, target / path.name)


def rules_extra(directory: Path, folder: str, file: str, text: str, *extra: str) -> list[str]:
    """The gateway's arguments for test rules `text` added to the bundled ones (their hash lists beside them)."""
    bundled_hash_lists(directory)
    return ["--rules", str(rule_folder(directory, folder, file, text)), *extra]


def serving(gw) -> Iterator:
    """A module fixture's body: yields the started gateway, stops it after, and fails if it exited by itself."""
    try:
        yield gw
    finally:
        status = gw.stop()
        if gw.crashed:
            pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


def ngircd(directory: Path) -> Iterator:
    """A module fixture's body: a real ngIRCd in `directory`, stopped after."""
    from tests.peers.ngircd import NgIrcd
    server = NgIrcd.start(directory)
    try:
        yield server
    finally:
        server.stop()


def watched(gateway, route) -> Iterator:
    """A test fixture's body: yields `route` (through `gateway`); the gateway must stay up and log no error."""
    gateway.check_alive()
    offset = gateway.log_size()
    yield route
    gateway.check_alive()
    errors = gateway.errors_since(offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + gateway.logs()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_outcome(event: dict, state: str, sha256: str) -> bool:
    """The file's `warn_<state>` event (warn_justified, warn_expired, ...)."""
    return (event.get("event", {}).get("action") == f"warn_{state}"
            and event.get("file", {}).get("hash", {}).get("sha256") == sha256)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


# --- scan notices: a scan slowed on purpose ----------------------------------------------------------------------

def slow_yara_rule(name: str, test_file: str, times: int) -> str:
    """A YARA rule that walks every byte of a file over 256 KB `times` times and matches none (no file of
    `payload` has a 0xFE byte)."""
    return f"""\
rule {name}
{{
    meta:
        description = "{test_file}: walks every byte of a file over 256 KB {times} times; matches none"
    condition:
        filesize > 256KB and for any i in (0..filesize - 1) : (
            for any j in (0..{times - 1}) : (uint8(i) == 0xFE and uint8(i + j) == 0xFF))
}}
"""


def slow_signatures(directory: Path, file: str, yara_rule: str) -> Path:
    """The bundled signatures plus `yara_rule` (one that takes its time and matches none) as `file`, in
    `directory`/signatures (given to the gateway by --signatures)."""
    from tests.peers.gateway import BUNDLED_SIGNATURES
    signatures = directory / "signatures"
    shutil.copytree(BUNDLED_SIGNATURES, signatures)
    (signatures / file).write_text(yara_rule)
    return signatures


def slow_scan_extra(directory: Path, file: str, yara_rule: str, notice_after: float) -> list[str]:
    """The gateway's arguments for `slow_signatures` and --scan-notice-after-seconds `notice_after`."""
    return ["--signatures", str(slow_signatures(directory, file, yara_rule)),
            "--scan-notice-after-seconds", str(notice_after)]


def payload(size: int) -> bytes:
    """Unique content (the verdict cache would answer a second scan of the same bytes at once), with no 0xFE/0xFF
    byte, so a slow rule that looks for them walks all of it."""
    import uuid
    head = f"report {uuid.uuid4()}\n".encode()
    return head + (bytes(range(254)) * (size // 254 + 1))[:size - len(head)]
