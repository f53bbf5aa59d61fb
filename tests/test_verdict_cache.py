"""The verdict cache (imguard/inspect/cache.py): a file sent again is not inspected again, concurrent transfers of
one file wait for one inspection, the cache is bounded, keyed on what the report depends on, and emptied by a
signature reload; every transfer still gets its own decision and event.

The inspections are counted on a real Inspector (its uncached path wrapped), not a stand-in.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from imguard import runtime
from imguard.inspect import InspectLimits, Inspector, load_signatures
from imguard.inspect.cache import VerdictCache, context_externals_used
from imguard.model import REASON_TIMEOUT, UNSCANNABLE, ChatContext, FileReport, Finding
from imguard.reload import PolicyReloader

ROOT = Path(__file__).resolve().parents[1]
CTX = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com", recipients=("bob@example.org",))
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class CountingInspector(Inspector):
    """The real inspector, counting the inspections that really run (and optionally slowed down)."""

    def __init__(self, *args, delay: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runs = 0
        self.delay = delay
        self._count = threading.Lock()

    def inspect_uncached(self, content, context=ChatContext(), name="", claimed_mime="", extra_passwords=(), **known):
        with self._count:
            self.runs += 1
        time.sleep(self.delay)
        return super().inspect_uncached(content, context, name, claimed_mime, extra_passwords, **known)


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    return load_signatures(ROOT / "signatures", tmp_path_factory.mktemp("cache"))


def test_a_thousand_transfers_one_inspection(signatures):
    inspector = CountingInspector(signatures)
    first = inspector.inspect(EICAR, CTX, name="eicar.com")
    for _ in range(999):
        report = inspector.inspect(EICAR, CTX, name="eicar.com")
    assert inspector.runs == 1
    assert inspector.cache.stats.hits == 999 and len(inspector.cache) == 1
    assert report.to_dict() == first.to_dict() and report is not first
    assert [f.data["rule"] for f in report.findings if f.kind == "yara"] == ["EICAR_Test_File"]
    report.findings.append(Finding(UNSCANNABLE, "added by a caller", data={"reason": "truncated"}))
    assert inspector.inspect(EICAR, CTX, name="eicar.com").to_dict() == first.to_dict()   # each caller has a copy


def test_concurrent_transfers_wait_for_one_scan(signatures):
    inspector = CountingInspector(signatures, delay=0.3)
    reports: list[FileReport] = []
    barrier = threading.Barrier(8)

    def transfer() -> None:
        barrier.wait()
        reports.append(inspector.inspect(EICAR, CTX, name="eicar.com"))

    threads = [threading.Thread(target=transfer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert inspector.runs == 1
    assert inspector.cache.stats.misses == 1 and inspector.cache.stats.waits == 7
    assert len(reports) == 8 and len({id(r) for r in reports}) == 8
    assert all(r.to_dict() == reports[0].to_dict() for r in reports)


def test_key_holds_name_type_and_only_the_context_the_rules_use(signatures, tmp_path):
    """The bundled rules name no conversation external: another sender shares the entry. A rule set that tests
    `sender` gets one entry per sender, and the right answer for each."""
    assert context_externals_used(signatures.files) == ()
    inspector = CountingInspector(signatures)
    inspector.inspect(EICAR, CTX, name="eicar.com")
    inspector.inspect(EICAR, CTX.with_(sender="carol@example.com", direction="inbound"), name="eicar.com")
    assert inspector.runs == 1
    inspector.inspect(EICAR, CTX, name="eicar.txt")
    inspector.inspect(EICAR, CTX, name="eicar.txt", claimed_mime="text/plain")
    assert inspector.runs == 3
    folder = tmp_path / "sigs"
    folder.mkdir()
    (folder / "who.yar").write_text('rule From_Mallory : malware { condition: sender == "mallory@evil.example" }\n')
    by_sender = CountingInspector(load_signatures(folder, tmp_path / "c"))
    assert by_sender.cache.context_names == ("sender",)
    plain = b"the same bytes from two people"
    alice = by_sender.inspect(plain, CTX, name="a.txt")
    mallory = by_sender.inspect(plain, CTX.with_(sender="mallory@evil.example"), name="a.txt")
    assert by_sender.runs == 2
    assert [f.kind for f in alice.findings] == [] and [f.data["rule"] for f in mallory.findings] == ["From_Mallory"]


def test_a_timeout_is_not_kept(signatures):
    """A report that could not finish for a passing reason (timeout) goes to the callers but is not kept."""
    inspector = CountingInspector(signatures)
    real = Inspector.inspect_uncached
    calls = []

    def flaky(self, content, context=ChatContext(), name="", claimed_mime="", extra_passwords=(), **known):
        calls.append(name)
        report = real(self, content, context, name, claimed_mime, extra_passwords, **known)
        if len(calls) == 1:
            report.findings.append(Finding(UNSCANNABLE, "YARA scan ran out of time (10 s)",
                                           data={"reason": REASON_TIMEOUT}))
        return report
    inspector.inspect_uncached = flaky.__get__(inspector)
    assert any(f.kind == UNSCANNABLE for f in inspector.inspect(EICAR, CTX, name="e.com").findings)
    assert not any(f.kind == UNSCANNABLE for f in inspector.inspect(EICAR, CTX, name="e.com").findings)
    assert len(calls) == 2 and inspector.cache.stats.uncached == 1
    inspector.inspect(EICAR, CTX, name="e.com")
    assert len(calls) == 2


def test_bounded_by_entries_and_bytes(signatures):
    inspector = CountingInspector(signatures, limits=InspectLimits(verdict_cache_entries=3))
    for i in range(5):
        inspector.inspect(b"file %d" % i, CTX, name="f.txt")
    assert len(inspector.cache) == 3 and inspector.cache.stats.evictions == 2
    inspector.inspect(b"file 0", CTX, name="f.txt")            # evicted: inspected again
    assert inspector.runs == 6
    small = VerdictCache(max_entries=1000, max_bytes=3000)
    for i in range(20):
        small.get_or_inspect(("k", i), lambda: FileReport(name="x" * 500, path="x", size=1))
    assert small.size_bytes <= 3000 and 0 < len(small) < 20
    off = CountingInspector(signatures, limits=InspectLimits(verdict_cache_entries=0))
    assert off.cache is None
    off.inspect(EICAR, CTX, name="e.com")
    off.inspect(EICAR, CTX, name="e.com")
    assert off.runs == 2


def test_reload_empties_the_cache_and_every_transfer_has_its_event(tmp_path):
    """Through the pipeline: the same file twice is two decisions and two events (one inspection); after a new
    signature is loaded, the same bytes are inspected again and blocked."""
    rules, signatures, data = tmp_path / "rules", tmp_path / "signatures", tmp_path / "data"
    shutil.copytree(ROOT / "rules", rules, ignore=shutil.ignore_patterns("tests"))
    shutil.copytree(ROOT / "signatures", signatures)
    pipeline = runtime.build_pipeline(rules, signatures, data)
    try:
        content = b"imguard-verdict-cache-marker-51c2 in a plain text file\n"
        inspector = pipeline.inspector
        for _ in range(2):
            assert pipeline.check_file(content, CTX, "notes.txt")[1].action == "allow"
        assert inspector.cache.stats.hits == 1
        events = [json.loads(line) for line in (data / "alerts.jsonl").read_text().splitlines()]
        assert [e["file"]["name"] for e in events if e.get("file")] == ["notes.txt", "notes.txt"]
        (signatures / "marker.yar").write_text(
            'rule Cache_Marker : malware { meta: description = "test" severity = "high" '
            'strings: $m = "imguard-verdict-cache-marker-51c2" condition: $m }\n')
        assert PolicyReloader(pipeline, [rules], signatures, data).reload("test")
        assert pipeline.inspector is not inspector and len(pipeline.inspector.cache) == 0
        report, decision = pipeline.check_file(content, CTX, "notes.txt")
        assert decision.action == "block" and decision.rule_ids == ["malware"]
    finally:
        pipeline.close()
