"""Hot reload (imguard/reload.py): rules and signatures reloaded on SIGHUP and on file changes, validated first.

Unit tests drive PolicyReloader on a real Pipeline; the last tests send SIGHUP to a real `imguard run` in front of
a real Prosody while an XMPP session stays connected through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from imguard import runtime
from imguard.model import ChatContext
from imguard.reload import PolicyReloader

ROOT = Path(__file__).resolve().parents[1]
CTX = ChatContext(protocol="xmpp", sender="alice@example.com", recipients=("bob@example.org",))
WORD = "orange-falcon"

NEW_RULE = f"""\
rules:
  - id: reload-codename-block
    title: Codename added by a reload
    severity: high
    action: block
    applies_to: message
    notify: "Blocked: {{recipients}} may not hear about that project."
    match:
      keywords: [{WORD}]
"""

BROKEN_RULE = """\
rules:
  - id: broken-rule
    title: A rule with a typo
    severity: high
    action: blokc
    applies_to: message
    match:
      keywords: [anything]
"""

NEW_SIGNATURE = """\
rule Reload_Marker : malware
{
    strings:
        $m = "imguard-reload-marker-7f3a"
    condition:
        $m
}
"""


def read_events(data_dir: Path) -> list[dict]:
    path = data_dir / "alerts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reload_events(data_dir: Path) -> list[dict]:
    return [e for e in read_events(data_dir) if e.get("event", {}).get("action") == "policy_reload"]


@pytest.fixture
def setup(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules, ignore=shutil.ignore_patterns("tests"))
    signatures = tmp_path / "signatures"
    shutil.copytree(ROOT / "signatures", signatures)
    data = tmp_path / "data"
    pipeline = runtime.build_pipeline(rules, signatures, data)
    return pipeline, rules, signatures, data


def test_good_reload_swaps_policy_and_inspector(setup):
    pipeline, rules, signatures, data = setup
    reloader = PolicyReloader(pipeline, [rules], signatures, data)
    old_policy, old_inspector = pipeline.policy, pipeline.inspector
    before = pipeline.check_message(f"about {WORD}", CTX)
    assert before.action == "allow"

    (rules / "50-reload.yaml").write_text(NEW_RULE)
    (signatures / "reload_marker.yar").write_text(NEW_SIGNATURE)
    assert reloader.reload("test") is True

    assert pipeline.policy is not old_policy and pipeline.inspector is not old_inspector
    after = pipeline.check_message(f"about {WORD}", CTX)
    assert after.action == "block" and after.rule_ids == ["reload-codename-block"]
    assert after.policy_version == pipeline.policy.version != before.policy_version
    report, decision = pipeline.check_file(b"xx imguard-reload-marker-7f3a xx", CTX, name="marker.txt")
    assert any(f.data.get("rule") == "Reload_Marker" for f in report.findings), report.findings
    assert decision.blocked

    (event,) = reload_events(data)
    assert event["event"]["outcome"] == "success" and event["event"]["kind"] == "event"
    policy = event["imguard"]["policy"]
    assert policy["previous_version"] == before.policy_version and policy["version"] == after.policy_version
    assert policy["signatures_version"] != policy["previous_signatures_version"]
    assert policy["source"] == "test"


def test_bad_rule_file_keeps_the_running_policy_and_raises_an_alert_with_file_and_line(setup):
    pipeline, rules, signatures, data = setup
    reloader = PolicyReloader(pipeline, [rules], signatures, data)
    (rules / "50-reload.yaml").write_text(NEW_RULE)
    assert reloader.reload() is True
    good = pipeline.policy

    (rules / "60-broken.yaml").write_text(BROKEN_RULE)
    assert reloader.reload("SIGHUP") is False
    assert pipeline.policy is good, "a broken file replaced the running policy"
    assert pipeline.check_message(f"about {WORD}", CTX).action == "block", "the running policy stopped working"

    alert = reload_events(data)[-1]
    assert alert["event"]["kind"] == "alert" and alert["event"]["outcome"] == "failure", alert["event"]
    assert alert["imguard"]["severity"] == "high"
    errors = alert["imguard"]["policy"]["errors"]
    assert any(e.startswith("60-broken.yaml:5:") or "60-broken.yaml:5" in e for e in errors), errors
    assert alert["imguard"]["policy"]["in_force"] == good.version
    assert reloader.last_errors == errors and reloader.failures == 1

    (rules / "60-broken.yaml").unlink()
    assert reloader.reload() is True and reloader.reloads == 2


def test_bad_signature_file_keeps_the_running_inspector(setup):
    pipeline, rules, signatures, data = setup
    reloader = PolicyReloader(pipeline, [rules], signatures, data)
    inspector = pipeline.inspector
    (signatures / "broken.yar").write_text("rule Broken {\n  condition:\n    $missing\n}\n")
    assert reloader.reload() is False
    assert pipeline.inspector is inspector
    errors = reload_events(data)[-1]["imguard"]["policy"]["errors"]
    assert any(re.search(r"broken\.yar:\d+: undefined string", e) for e in errors), errors


def test_several_rule_folders_are_combined_again(setup, tmp_path):
    pipeline, rules, signatures, data = setup
    extra = tmp_path / "extra-rules"
    extra.mkdir()
    reloader = PolicyReloader(pipeline, [rules, extra], signatures, data)
    (extra / "50-reload.yaml").write_text(NEW_RULE)
    assert reloader.reload() is True
    assert pipeline.check_message(f"about {WORD}", CTX).action == "block"


def test_watcher_reloads_after_a_change_and_reports_a_broken_version_once(setup):
    pipeline, rules, signatures, data = setup
    reloader = PolicyReloader(pipeline, [rules], signatures, data)

    polls = 0
    changed = reloader.changed

    def counted() -> bool:              # the watcher's polls, counted: the waits below are in polls, not seconds
        nonlocal polls
        polls += 1
        return changed()

    reloader.changed = counted

    async def after_polls(n: int) -> None:
        target = polls + n
        for _ in range(200):
            if polls >= target:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the watcher polled {polls} times, {target} expected")

    async def scenario():
        task = asyncio.create_task(reloader.watch(0.1))
        try:
            await after_polls(3)
            assert reloader.reloads == 0, "nothing changed, yet the watcher reloaded"
            (rules / "50-reload.yaml").write_text(NEW_RULE)
            for _ in range(50):
                if reloader.reloads:
                    break
                await asyncio.sleep(0.1)
            assert reloader.reloads == 1
            assert pipeline.check_message(f"about {WORD}", CTX).action == "block"
            (rules / "60-broken.yaml").write_text(BROKEN_RULE)
            for _ in range(50):
                if reloader.failures:
                    break
                await asyncio.sleep(0.1)
            await after_polls(5)            # several more polls: the broken version is not reported again
            assert reloader.failures == 1
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert [e["event"]["outcome"] for e in reload_events(data)] == ["success", "failure"]


# --- through a real `imguard run` ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reload_gateway(prosody, peers_dir):
    from tests.peers.gateway import Gateway
    gw = Gateway.start(peers_dir / f"imguard-reload-{uuid.uuid4().hex[:6]}", prosody,
                       extra=["--reload-interval", "0"])       # SIGHUP only: the test decides when
    try:
        yield gw
    finally:
        gw.stop()


def test_sighup_reloads_rules_and_the_open_session_gets_the_new_policy(prosody, reload_gateway):
    """An XMPP session stays connected through the gateway across two reloads (a good and a broken one); the
    first message after the good reload is blocked by the rule it added, decided by the new policy version."""
    from tests.xmpp_clients import STARTTLS, Client, error_condition
    gw = reload_gateway
    since = gw.mark()

    async def scenario():
        endpoint = gw.endpoint(STARTTLS)
        tag = uuid.uuid4().hex[:6]
        async with Client.connected(endpoint, f"alice@localhost/r-{tag}", prosody.password("alice")) as alice, \
                Client.connected(endpoint, f"bob@localhost/r-{tag}", prosody.password("bob")) as bob:
            first = f"the {WORD} plan, take 1 {tag}"
            alice.send_chat(bob.jid, first)
            assert await bob.wait_message(first), "before the reload the message should pass"
            allowed = await gw.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == first,
                                          since=since)
            old_version = allowed["rule"]["version"]

            (gw.directory / "rules" / "95-reload.yaml").write_text(NEW_RULE)
            os.kill(gw.process.pid, signal.SIGHUP)
            done = await gw.wait_alert(lambda e: e.get("event", {}).get("action") == "policy_reload", since=since)
            assert done and done["event"]["outcome"] == "success", done
            assert done["imguard"]["policy"]["previous_version"] == old_version
            new_version = done["imguard"]["policy"]["version"]
            assert new_version != old_version

            assert alice.alive and bob.alive, "a reload dropped the connections in flight"
            second = f"the {WORD} plan, take 2 {tag}"
            sent = alice.send_chat(bob.jid, second)
            error = await alice.wait_message(id=sent, type="error")
            assert error is not None and error_condition(error) == "policy-violation", error
            blocked = await gw.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == second,
                                          since=since)
            assert blocked["event"]["action"] == "block" and blocked["rule"]["id"] == "reload-codename-block"
            assert blocked["rule"]["version"] == new_version

            # A broken file: refused with file:line, the policy just loaded stays in force, the session too.
            mark = gw.mark()
            (gw.directory / "rules" / "96-broken.yaml").write_text(BROKEN_RULE)
            os.kill(gw.process.pid, signal.SIGHUP)
            refused = await gw.wait_alert(lambda e: e.get("event", {}).get("action") == "policy_reload", since=mark)
            assert refused and refused["event"]["outcome"] == "failure", refused
            assert any("96-broken.yaml:5" in err for err in refused["imguard"]["policy"]["errors"]), refused
            third = f"the {WORD} plan, take 3 {tag}"
            sent = alice.send_chat(bob.jid, third)
            assert await alice.wait_message(id=sent, type="error"), "the running policy was lost"
            again = await gw.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == third,
                                        since=mark)
            assert again["rule"]["version"] == new_version
            plain = f"nothing special {tag}"
            alice.send_chat(bob.jid, plain)
            assert await bob.wait_message(plain), "the session did not survive the reloads"
            assert WORD not in " ".join(b for b in bob.bodies() if b != first)
        (gw.directory / "rules" / "96-broken.yaml").unlink()

    asyncio.run(scenario())
    gw.check_alive()
    assert not gw.errors_since(0) or all("reload" in line for line in gw.errors_since(0)), gw.logs()
