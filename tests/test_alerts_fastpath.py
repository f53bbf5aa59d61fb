"""The fast path of an allowed chat message (AlertLog.write_message, EventBus.write_message) writes the very
bytes of the general path, write(message_event(...)), and counts the same metrics, for every context, text
and policy version; and it is taken only where it cannot change behaviour."""

import random
import threading

import pytest

from imguard import alerts
from imguard.metrics import Metrics
from imguard.model import ALERT, ALLOW, BLOCK, MASK, ChatContext, Decision, RuleMatch
from imguard.pipeline import Pipeline
from imguard.sinks import EventBus, Sink, build_sinks

FIXED_TIMESTAMP = "2026-11-27T05:40:16.443Z"
FIXED_EVENT_ID = "0123456789abcdef00000001"

ODD_NAMES = ["", "alice@corp.example", "nick!user@host.example", 'we"ird\\name\n\ttab', "ünïcødé 名前 😀",
             "\u2028line\u2029para\x85next", "\x00\x01\x1f\x7f", "</script>&<>'", " ", "[::1]", "a:b:c"]
ADDRESSES = ["", "10.0.0.5:40000", "[2001:db8::1]:5222", "2001:db8::1", "10.0.0.5", "host.example:",
             ":80", "host.example:http", "[fe80::1%eth0]:6667", "ünï:1"]
TEXTS = [None, "", "hello", "ünïcødé 名前 😀", "line\nbreak\r\n", "\u2028\u2029\x85", "a\u2028b\u2029c\x85d",
         "\x00\x01\x08\x0b\x0c\x1b\x1f\x7f", '"quoted" \\ {"fake": "json"}', "\ud800", "lone \udcff tail",
         "x" * 100_000, "é\u2028" * 5_000, "\U0001f600" * 3, "\ufeff\ufffe\uffff", "\t", "\u0080\u00a0\u200b"]
VERSIONS = ["", "v1", "3f2a9c1d", "ünï\u2028\x85\"v\"", "\ud800"]


def random_contexts(count: int, seed: int = 20261127) -> list[ChatContext]:
    rng = random.Random(seed)
    contexts = [ChatContext(), ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                                           recipients=("bob@ext.example",), client_address="10.0.0.5:40000",
                                           server_address="192.0.2.10:5222", connection_id="c1")]
    for _ in range(count):
        contexts.append(ChatContext(
            protocol=rng.choice(["", "xmpp", "irc", "msnp", "matrix"]),
            direction=rng.choice(["", "outbound", "inbound", "internal"]),
            sender=rng.choice(ODD_NAMES),
            recipients=tuple(rng.choice(ODD_NAMES) for _ in range(rng.choice([0, 0, 1, 1, 2, 5]))),
            conversation=rng.choice(["", "#room", "room\u2028x", "!abc:matrix.org"]),
            client_address=rng.choice(ADDRESSES), server_address=rng.choice(ADDRESSES),
            connection_id=rng.choice(["", "c42", "conn\u2029"]),
            transfer_mechanism=rng.choice(["", "upload", "dcc"])))
    return contexts


class SubContext(ChatContext):
    pass


def unusual_contexts() -> list[ChatContext]:
    """Contexts the fast path must leave to the general path (or render identically anyway)."""
    return [
        ChatContext(sender="lone \ud800 surrogate"),                       # encode() falls back to json
        ChatContext(recipients=["a list", "of recipients"]),               # mutable: cannot be cached by identity
        ChatContext(connection_id=12345, transfer_mechanism=None),         # not strings
        ChatContext(sender=alerts._MARK + "-text"),                        # contains a stand-in
        ChatContext(sender='"' + alerts._TEXT_MARK + '"', conversation=alerts._SHA256_MARK),
        SubContext(protocol="xmpp", sender="alice"),
    ]


def decisions() -> list[Decision]:
    rule = RuleMatch("no-secrets", BLOCK, "high", "enforce", title="No secrets")
    shadow = RuleMatch("maybe", ALERT, "low", "shadow", title="Maybe")
    plain = [Decision(action=ALLOW, policy_version=v) for v in VERSIONS]
    others = [Decision(action=BLOCK, matches=[rule], policy_version="v1"),
              Decision(action=ALLOW, shadow=[shadow], policy_version="v1"),
              Decision(action=ALLOW, notice="fyi"),
              Decision(action=MASK, matches=[RuleMatch("mask", MASK, "low", "enforce")], masked_text="***"),
              Decision(action=ALLOW, masked_text="x")]
    return plain + others


@pytest.fixture
def fixed_time_and_id(monkeypatch):
    """Both paths stamp the same @timestamp and event.id, so whole lines compare."""
    monkeypatch.setattr(alerts, "_now", lambda: FIXED_TIMESTAMP)
    monkeypatch.setattr(alerts, "new_event_id", lambda: FIXED_EVENT_ID)


def general_line(text, ctx, decision, instance="gw1") -> bytes:
    event = alerts.message_event(text, ctx, decision)
    event["observer"]["name"] = instance
    return alerts.encode(event)


def cases(contexts, texts=TEXTS, all_decisions=None):
    all_decisions = all_decisions or decisions()
    rng = random.Random(7)
    for ctx in contexts:
        for decision in rng.sample(all_decisions, 3) + [all_decisions[0]]:
            for text in rng.sample(texts, 4) + [None, "hello"]:
                yield text, ctx, decision


class CountingLog(alerts.AlertLog):
    """Counts the events that went through the general path (write)."""
    general = 0

    def write(self, event):
        self.general += 1
        super().write(event)


def has_surrogate(value) -> bool:
    return value is not None and any("\ud800" <= ch <= "\udfff" for ch in value)


def test_the_fast_line_is_the_general_line_byte_for_byte(tmp_path, fixed_time_and_id):
    log = CountingLog(tmp_path / "fast.jsonl", instance="gw1")
    unusual = unusual_contexts()
    expected = []
    rendered_fast = 0
    for text, ctx, decision in cases(random_contexts(300) + unusual):
        expected.append(general_line(text, ctx, decision))
        log.write_message(text, ctx, decision)
        # Left to the general path: other decisions, the unusual contexts, what orjson refuses.
        if (alerts.is_plain_message(decision) and not any(ctx is other for other in unusual)
                and not has_surrogate(decision.policy_version) and not has_surrogate(text)):
            rendered_fast += 1
    log.close()
    written = (tmp_path / "fast.jsonl").read_bytes().splitlines(keepends=True)
    assert len(written) == len(expected)
    for number, (line, wanted) in enumerate(zip(written, expected, strict=True)):
        assert line == wanted, f"line {number}"
    # The comparison means something only because the fast path wrote these lines itself.
    assert rendered_fast > 3000
    assert log.general == len(expected) - rendered_fast


def test_every_text_and_version_on_every_shape_of_address(tmp_path, fixed_time_and_id):
    """The full grid where it matters most: each address form x each text x each plain version."""
    log = alerts.AlertLog(tmp_path / "fast.jsonl", instance="näme \u2028 \"gw\"")
    expected = []
    for client in ADDRESSES:
        for server in ADDRESSES[::-1]:
            ctx = ChatContext(protocol="irc", sender="nick", recipients=("#a", "b"), client_address=client,
                              server_address=server)
            for version in VERSIONS:
                decision = Decision(action=ALLOW, policy_version=version)
                for text in TEXTS:
                    expected.append(general_line(text, ctx, decision, instance=log.instance))
                    log.write_message(text, ctx, decision)
    log.close()
    assert (tmp_path / "fast.jsonl").read_bytes() == b"".join(expected)


def test_the_gateway_bus_writes_and_counts_as_the_general_path(tmp_path, fixed_time_and_id):
    """build_sinks as the gateway builds it: the same alerts.jsonl and the same /metrics after N messages."""
    fast_metrics, general_metrics = Metrics(), Metrics()
    fast = build_sinks(None, tmp_path / "fast", instance="gw1", metrics=fast_metrics, plain_flush_seconds=0.2)
    general = build_sinks(None, tmp_path / "general", instance="gw1", metrics=general_metrics,
                          plain_flush_seconds=0.2)
    for text, ctx, decision in cases(random_contexts(60) + unusual_contexts()):
        fast.write_message(text, ctx, decision)
        general.write(alerts.message_event(text, ctx, decision))
    fast.close()
    general.close()
    fast_bytes = (tmp_path / "fast" / "alerts.jsonl").read_bytes()
    assert fast_bytes == (tmp_path / "general" / "alerts.jsonl").read_bytes()
    assert fast_bytes.count(b"\n") > 1000
    assert fast_metrics.render() == general_metrics.render()
    assert fast_metrics.value("imguard_messages_total", action=ALLOW) > 500


def test_the_same_context_object_keeps_its_fragments_and_follows_a_new_version_or_name(tmp_path,
                                                                                       fixed_time_and_id):
    log = alerts.AlertLog(tmp_path / "a.jsonl", instance="gw1")
    ctx = random_contexts(1)[-1]
    expected = []
    for n in range(50):
        decision = Decision(action=ALLOW, policy_version=f"v{n % 3}")     # a reload, and threads on the old one
        if n == 40:
            log.instance = "gw2"
        expected.append(general_line(f"message {n}", ctx, decision, instance=log.instance))
        log.write_message(f"message {n}", ctx, decision)
    log.close()
    assert (tmp_path / "a.jsonl").read_bytes() == b"".join(expected)
    assert len(log._message_fragments) == 1


def test_the_fragment_cache_is_bounded_and_never_confuses_two_contexts(tmp_path, monkeypatch, fixed_time_and_id):
    monkeypatch.setattr(alerts, "MESSAGE_FRAGMENTS_MAX", 8)
    log = alerts.AlertLog(tmp_path / "a.jsonl")
    decision = Decision(action=ALLOW, policy_version="v1")
    expected = []
    for n in range(200):
        # A fresh context each time, dropped at once: CPython may hand the next one the same id().
        ctx = ChatContext(protocol="xmpp", sender=f"user{n}", client_address=f"10.0.0.{n % 256}:{n}")
        expected.append(general_line("hi", ctx, decision, instance=log.instance))
        log.write_message("hi", ctx, decision)
        assert len(log._message_fragments) <= 8
    log.close()
    assert (tmp_path / "a.jsonl").read_bytes() == b"".join(expected)


def test_plain_messages_are_gathered_like_any_plain_event(tmp_path):
    log = alerts.AlertLog(tmp_path / "a.jsonl", plain_flush_seconds=60)
    ctx = random_contexts(1)[0]
    log.write_message("hi", ctx, Decision(action=ALLOW))
    assert (tmp_path / "a.jsonl").read_bytes() == b""                 # gathered
    log.write(alerts.anomaly_event(ctx, "malformed", "x"))             # an alert writes what was gathered
    assert (tmp_path / "a.jsonl").read_bytes().count(b"\n") == 2
    log.write_message("bye", ctx, Decision(action=ALLOW))
    log.close()
    assert (tmp_path / "a.jsonl").read_bytes().count(b"\n") == 3


class RecordingSink(Sink):
    name = "recording"

    def __init__(self):
        self.offered: list[dict] = []

    def accepts(self, event):
        self.offered.append(event)
        return False

    def send(self, event):
        raise AssertionError("accepts() said no")


def test_a_bus_with_a_remote_sink_gives_the_sink_the_event(tmp_path, fixed_time_and_id):
    sink = RecordingSink()
    bus = EventBus(alerts.AlertLog(tmp_path / "a.jsonl", instance="gw1"), [sink], queue_dir=tmp_path / "queue",
                   metrics=Metrics())
    ctx = random_contexts(1)[0]
    bus.write_message("hi", ctx, Decision(action=ALLOW, policy_version="v1"))
    bus.close()
    assert [e["imguard"]["message"]["text"] for e in sink.offered] == ["hi"]
    assert (tmp_path / "a.jsonl").read_bytes() == general_line("hi", ctx, Decision(action=ALLOW, policy_version="v1"))
    assert bus.metrics.value("imguard_messages_total", action=ALLOW) == 1


def test_a_failed_local_write_is_reported_not_raised(tmp_path, capsys):
    metrics = Metrics()
    bus = EventBus(alerts.AlertLog(tmp_path / "a.jsonl"), metrics=metrics)

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    bus.local._append = refuse
    bus.write_message("hi", ChatContext(), Decision(action=ALLOW))
    bus.close()
    assert metrics.value("imguard_anomalies_total", kind="alert_log_write_failed") == 1
    assert metrics.value("imguard_messages_total", action=ALLOW) == 1
    assert "No space left" in capsys.readouterr().err


class AllowAll:
    version = "v9"

    def decide_message(self, text, ctx):
        return Decision(action=ALLOW, policy_version=self.version)


class RestampingLog:
    """A log with only write(event), which it changes before writing (as the replay once restamped events)."""

    def __init__(self, log):
        self.log = log

    def write(self, event):
        event["@timestamp"] = "2001-01-01T00:00:00.000000Z"
        self.log.write(event)

    def close(self):
        self.log.close()


def test_check_message_uses_write_message_only_where_the_log_has_it(tmp_path, fixed_time_and_id):
    ctx = ChatContext(protocol="xmpp", direction="outbound", sender="alice")
    pipeline = Pipeline(inspector=None, policy=AllowAll(), alert_log=alerts.AlertLog(tmp_path / "a.jsonl"))
    pipeline.check_message("hello", ctx)
    pipeline.keep_text = False
    pipeline.check_message("secret", ctx)
    pipeline.close()
    decision = Decision(action=ALLOW, policy_version="v9")
    instance = pipeline.alert_log.instance
    assert (tmp_path / "a.jsonl").read_bytes() == (general_line("hello", ctx, decision, instance)
                                                  + general_line(None, ctx, decision, instance))
    restamping_log = RestampingLog(alerts.AlertLog(tmp_path / "b.jsonl"))
    restamped = Pipeline(inspector=None, policy=AllowAll(), alert_log=restamping_log)
    restamped.check_message("hello", ctx)
    restamped.close()
    assert b'"@timestamp":"2001-01-01T00:00:00.000000Z"' in (tmp_path / "b.jsonl").read_bytes()


def test_threads_writing_messages_and_other_events_keep_lines_whole_and_identical(tmp_path, fixed_time_and_id):
    log = alerts.AlertLog(tmp_path / "a.jsonl", plain_flush_seconds=0.05)
    contexts = random_contexts(20)
    decision = Decision(action=ALLOW, policy_version="v1")
    wanted = {general_line(f"m{n}", ctx, decision, log.instance) for n in range(5) for ctx in contexts}

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(500):
            log.write_message(f"m{rng.randrange(5)}", rng.choice(contexts), decision)
            if rng.random() < 0.05:
                log.write(alerts.anomaly_event(rng.choice(contexts), "malformed", "x"))

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines(keepends=True)
    messages = [line for line in lines if b'"dataset":"imguard.message"' in line]
    assert len(messages) == 2000
    assert set(messages) <= wanted
