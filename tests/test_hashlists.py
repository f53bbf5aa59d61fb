"""Hash lists (imguard/policy/hashlists.py): files of known-bad or known-good hashes that policy conditions name
(`hash_list`, `file_hash_list`), reloaded like rules, reported by `imguard rules check`.

The digests the tests expect are computed here with hashlib (an independent source), and EICAR's SHA-256 is the
one its publisher documents.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from imguard import runtime
from imguard.inspect import Inspector
from imguard.inspect.signatures import SignatureSettings
from imguard.model import ChatContext
from imguard.policy import PolicyError, load_policy
from imguard.policy.hashlists import load_hash_lists, parse_hash_list
from imguard.reload import PolicyReloader

ROOT = Path(__file__).resolve().parents[1]
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"     # as eicar.org publishes it
CTX = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com", recipients=("bob@example.org",))
SAMPLE = b"a harmless file that a feed lists as bad \x00\x01" * 10
SAMPLE_SHA256 = hashlib.sha256(SAMPLE).hexdigest()

# abuse.ch MalwareBazaar's full_sha256.txt starts like this (header, then one hash per line).
BAZAAR_STYLE = f"""\
################################################################
# MalwareBazaar full malware samples dump (SHA256 hashes)      #
# Last updated: 2026-12-06 07:00:02 UTC                        #
#                                                              #
# Terms Of Use: https://bazaar.abuse.ch/faq/#tos               #
# For questions please contact bazaar [at] abuse.ch            #
################################################################
#
# sha256_hash
{SAMPLE_SHA256}
{"ab" * 32}
"""

FILE_RULES = """\
rules:
  - id: known-good
    title: Known-good installer
    severity: info
    action: allow
    applies_to: file
    match:
      file_hash_list: known-good
  - id: feed-block
    title: On the feed
    severity: critical
    action: block
    applies_to: file
    match:
      hash_list: feed
"""


def zipped(name: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(name, content)
    return buf.getvalue()


@pytest.fixture
def empty_signatures(tmp_path) -> Path:
    folder = tmp_path / "no-signatures"
    folder.mkdir()
    return folder


def decide(rules: Path, signatures: Path, data: bytes, name: str, settings: SignatureSettings | None = None):
    loaded = runtime.load_configuration([rules], signatures, None, settings)
    report = Inspector(loaded.signatures).inspect(data, CTX, name=name)
    return loaded.policy.decide_file(report, CTX)


def test_feed_formats_parse():
    """A MalwareBazaar dump, sha256sum output, MD5/SHA-1 and trailing comments are all read; names are kept."""
    errors: list[str] = []
    text = BAZAAR_STYLE + f"{hashlib.md5(SAMPLE).hexdigest()}  sample.bin\n" \
                          f"{hashlib.sha1(SAMPLE).hexdigest().upper()}\t# upper case, tab, comment\n"
    hl = parse_hash_list(text, "feed", "feed.txt", errors)
    assert errors == []
    assert len(hl) == 4
    found = hl.lookup(sha256=SAMPLE_SHA256)
    assert (found.digest, found.value, found.source) == ("sha256", SAMPLE_SHA256, "feed.txt:10")
    assert hl.lookup(md5=hashlib.md5(SAMPLE).hexdigest()).name == "sample.bin"
    assert hl.lookup(sha1=hashlib.sha1(SAMPLE).hexdigest()).name == "upper case, tab, comment"
    assert hl.lookup(sha256="cd" * 32) is None


def test_bad_lines_are_file_line_errors():
    errors: list[str] = []
    parse_hash_list(f"# ok\n{SAMPLE_SHA256}\n{SAMPLE_SHA256[:-1]}\nzz{SAMPLE_SHA256[2:]}\n", "x", "x.txt", errors)
    assert [e.split(": ")[0] for e in errors] == ["x.txt:3", "x.txt:4"]
    assert "is not a hash" in errors[0]


def test_file_and_member_on_the_list_are_blocked(tmp_path, empty_signatures):
    """hash_list matches the file itself and any archive member; the reason names the list, the entry and its line."""
    rules = tmp_path / "rules"
    (rules / "hashlists").mkdir(parents=True)
    (rules / "10.yaml").write_text(FILE_RULES)
    (rules / "hashlists" / "feed.txt").write_text(BAZAAR_STYLE)
    (rules / "hashlists" / "known-good.txt").write_text("")
    decision = decide(rules, empty_signatures, SAMPLE, "sample.bin")
    assert decision.action == "block"
    assert decision.matches[0].reasons == [f"file sample.bin sha256 {SAMPLE_SHA256} is in hash list feed (feed.txt:10)"]
    member = decide(rules, empty_signatures, zipped("inner/sample.bin", SAMPLE), "outer.zip")
    assert member.action == "block"
    assert "member outer.zip!inner/sample.bin" in member.matches[0].reasons[0]
    assert decide(rules, empty_signatures, b"something else entirely", "other.bin").action == "allow"


def test_known_good_is_the_file_itself_not_a_member(tmp_path, empty_signatures):
    """file_hash_list (the allow exception) holds for the transferred file only: a zip with a known-good member
    and a listed-bad one is still blocked, while the known-good file alone is allowed before the block rule."""
    good = b"the company's signed installer" * 20
    rules = tmp_path / "rules"
    (rules / "hashlists").mkdir(parents=True)
    (rules / "10.yaml").write_text(FILE_RULES)
    (rules / "hashlists" / "feed.txt").write_text(f"{SAMPLE_SHA256}\n{hashlib.sha256(good).hexdigest()}\n")
    (rules / "hashlists" / "known-good.txt").write_text(f"{hashlib.sha256(good).hexdigest()} installer\n")
    alone = decide(rules, empty_signatures, good, "setup.bin")
    assert alone.action == "allow" and [m.rule_id for m in alone.matches] == ["known-good"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("setup.bin", good)
        archive.writestr("sample.bin", SAMPLE)
    assert decide(rules, empty_signatures, buf.getvalue(), "both.zip").action == "block"


def test_unknown_list_is_a_load_error(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text(FILE_RULES)
    with pytest.raises(PolicyError) as err:
        load_policy(rules)
    assert any(e.startswith("10.yaml:8: file_hash_list: unknown hash list 'known-good'") for e in err.value.errors)
    assert any(e.startswith("10.yaml:15: hash_list: unknown hash list 'feed'") for e in err.value.errors)


def test_lists_from_the_setting_folder(tmp_path, empty_signatures):
    """The hash_lists setting adds folders (a feed a cron job refreshes); two lists of one name are refused."""
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    (feeds / "feed.txt").write_text(BAZAAR_STYLE)
    (feeds / "known-good.txt").write_text("")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.yaml").write_text(FILE_RULES)
    settings = SignatureSettings(hash_lists=str(feeds))
    assert decide(rules, empty_signatures, SAMPLE, "s.bin", settings).action == "block"
    (rules / "hashlists").mkdir()
    (rules / "hashlists" / "feed.txt").write_text("")
    with pytest.raises(runtime.ConfigError) as err:
        runtime.load_configuration([rules], empty_signatures, None, settings)
    assert any("a second hash list named 'feed'" in e for e in err.value.errors)
    _, errors = load_hash_lists([tmp_path / "missing"])
    assert errors == [f"{tmp_path / 'missing'}:1: hash list folder does not exist"]


def test_bundled_policy_blocks_eicar_by_hash_without_signatures(empty_signatures):
    """The bundled known-bad list holds EICAR: with no YARA rule at all, the bundled `malware` rule still blocks it,
    naming the list."""
    assert hashlib.sha256(EICAR).hexdigest() == EICAR_SHA256
    decision = decide(ROOT / "rules", empty_signatures, EICAR, "eicar.com")
    assert decision.action == "block"
    malware = [m for m in decision.matches if m.rule_id == "malware"]
    assert malware and f"sha256 {EICAR_SHA256} is in hash list known-bad" in malware[0].reasons[0]


def test_reload_takes_a_new_hash_and_refuses_a_bad_line(tmp_path, empty_signatures):
    """A list edited on disk is seen by the watcher and reloaded; a bad line is refused with file:line and the
    lists in force stay (the hash added before still blocks)."""
    rules = tmp_path / "rules"
    (rules / "hashlists").mkdir(parents=True)
    (rules / "10.yaml").write_text(FILE_RULES)
    feed = rules / "hashlists" / "feed.txt"
    feed.write_text("# empty feed\n")
    (rules / "hashlists" / "known-good.txt").write_text("")
    data = tmp_path / "data"
    pipeline = runtime.build_pipeline(rules, empty_signatures, data)
    try:
        reloader = PolicyReloader(pipeline, [rules], empty_signatures, data)
        assert pipeline.check_file(SAMPLE, CTX, "s.bin")[1].action == "allow"
        feed.write_text(f"# feed\n{SAMPLE_SHA256} sample\n")
        os.utime(feed, ns=(1, 10**18))
        assert reloader.changed()
        assert reloader.reload("test") is True
        assert pipeline.check_file(SAMPLE, CTX, "s.bin")[1].action == "block"
        feed.write_text(f"# feed\n{SAMPLE_SHA256} sample\nnot-a-hash\n")
        assert reloader.reload("test") is False
        assert reloader.last_errors == [f"{feed}:3: 'not-a-hash' is not a hash: a line is an MD5 (32 hex digits), "
                                        f"SHA-1 (40) or SHA-256 (64), then an optional name; '#' starts a comment"]
        assert pipeline.check_file(SAMPLE, CTX, "s.bin")[1].action == "block"
    finally:
        pipeline.close()


def test_rules_check_reports_the_lists(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules, ignore=shutil.ignore_patterns("tests"))
    (rules / "hashlists" / "feed.txt").write_text(BAZAAR_STYLE)
    run = subprocess.run([sys.executable, "-m", "imguard", "rules", "check", str(rules)], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "hash lists: 2 lists, 5 hashes: feed (2), known-bad (3)" in run.stdout
    (rules / "hashlists" / "feed.txt").write_text("oops\n")
    run = subprocess.run([sys.executable, "-m", "imguard", "rules", "check", str(rules)], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 2 and f"{rules / 'hashlists' / 'feed.txt'}:1: 'oops' is not a hash" in run.stderr


def test_copies_of_the_bundled_rule_files_still_load(tmp_path, empty_signatures):
    """A rules folder of copies of the bundled *.yaml (no hashlists/ beside them) loads: the bundled lists are
    defaults. A list of the same name in the folder replaces the bundled one (EICAR is then not on it)."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in (ROOT / "rules").glob("*.yaml"):
        shutil.copy(path, rules / path.name)
    assert decide(rules, empty_signatures, EICAR, "eicar.com").action == "block"
    (rules / "hashlists").mkdir()
    (rules / "hashlists" / "known-bad.txt").write_text(f"{SAMPLE_SHA256}\n")
    assert decide(rules, empty_signatures, EICAR, "eicar.txt").action == "allow"
    assert decide(rules, empty_signatures, SAMPLE, "s.bin").action == "block"
