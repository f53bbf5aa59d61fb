"""The console on a large data folder: 1,000,000 alerts and 1,000,000 archived records (issue 22).

    .venv/bin/python bench/bench_console.py [--alerts N] [--records N] [--repeat R] [--folder DIR] [--reuse]
                                            [--keep-index] [--postgres N [--only-postgres]]

What it builds (in DIR, default a fresh folder under /var/tmp, removed at the end unless --folder is given):
- alerts.jsonl: N alerts over 90 days, every line made by the gateway's own builders (imguard/alerts.py
  message_event, file_event) from decisions of the bundled policy (imguard/policy decide_message, decide_file):
  secrets sent outbound, executable links received, executables and EICAR-like files (YARA match) both ways,
  among 5,000 people on xmpp, irc, matrix, http and sip, each with a circle of contacts.
- archive.sqlite3: N records over the same 90 days through the archive's own writer (Archive(path).database()
  .write_rows: its schema, indexes, hash chain and search index), 95% chat messages with text drawn from a
  vocabulary (Zipf), 5% files.

What it measures, p50/p99 over --repeat queries each (the first query of each kind, which warms the page cache,
is not counted):
- the console's alert index built from alerts.jsonl (AlertIndex.refresh, alerts/s), and its search index of the
  archive made by the console's thread over the existing records, with a search timed meanwhile (what the first
  user of a console on an existing archive waits for: a scan, not the index);
- through the console's data layer (imguard/console/data.py): the alert list (newest page, page 100, filters by
  rule, person, protocol, sha256; page 2,000 by its link's cursor and by OFFSET), the Overview (90 days), and on
  the archive a conversation between two people (all of it, and the 24 hours before an alert, as an alert's page
  links it), a person search, text searches (a common word, a rare one, one that is nowhere: the worst case of a
  scan; page 50 of the common one by cursor and by OFFSET), a hash search;
- with --postgres N: N records of the same generator copied into a throwaway PostgreSQL server
  (tests/peers/sink_peers.py PostgresServer: Debian's initdb), the archive's migration timed on the filled table
  (its pg_trgm and prefix indexes), the same archive queries by the console's ArchiveReader(dsn=...) with those
  indexes and without them;
- a few requests through the real application (Starlette's TestClient on imguard.console.views.Console, logged in).

Baseline, same run: the archive searches as they ran before the console's search index (the same data.py code
with the index not used, `ArchiveReader.search_index = False`: LIKE over the records, newest first, stopping at a
page); and a full scan of each table
(`SELECT count(*) ... WHERE <column> LIKE '%<absent>%'`), what any query without an index pays.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))      # imguard, and tests.peers (--postgres)

from imguard import alerts  # noqa: E402
from imguard.archive import Archive  # noqa: E402
from imguard.console import data  # noqa: E402
from imguard.model import ChatContext, FileReport, Finding  # noqa: E402
from imguard.policy import load_policy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEOPLE = 5000
DAYS = 90
PROTOCOLS = (("xmpp", 40), ("matrix", 20), ("http", 20), ("irc", 15), ("sip", 5))
RARE_WORD = "nightingale"           # in RARE_COUNT messages: a search that finds a few among a million
RARE_COUNT = 25
ABSENT_WORD = "zqxjvw"              # nowhere: a search that must look at everything
COMMON_WORD = "meeting"
WORDS = ("the a to and of is it you for on in we that this can i be with at are have will not meeting please "
         "review deploy build release today tomorrow call lunch thanks ok sure report invoice customer ticket "
         "slides server backup budget draft contract order shipment schedule password link file update bug fix "
         "merge branch test green red yes no maybe later now soon friday monday client partner vendor").split()


def person(protocol: str, i: int, device: bool = False) -> str:
    if protocol == "xmpp":
        return f"user{i}@corp.example" + ("/laptop" if device else "")
    if protocol == "irc":
        return f"nick{i}!u{i}@10.1.{i % 250}.{i % 200}" if device else f"nick{i}"
    if protocol == "matrix":
        return f"@user{i}:corp.example"
    if protocol == "sip":
        return f"sip:user{i}@corp.example"
    return f"user{i}@corp.example"


class People:
    """Who talks to whom: each person has 20 contacts, and some people talk far more than others."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.protocols = [p for p, w in PROTOCOLS for _ in range(w)]
        self.contacts = {i: rng.sample(range(PEOPLE), 20) for i in range(PEOPLE)}
        self.cum_weights = list(itertools.accumulate(1 / (1 + i) ** 0.6 for i in range(PEOPLE)))

    def pair(self) -> tuple[str, int, int]:
        a = self.rng.choices(range(PEOPLE), cum_weights=self.cum_weights)[0]
        b = self.contacts[a][min(int(self.rng.expovariate(0.4)), 19)]
        return self.rng.choice(self.protocols), a, b


def _times(n: int, rng: random.Random, end: datetime) -> list[float]:
    start = (end - timedelta(days=DAYS)).timestamp()
    step = DAYS * 86400 / n
    return [start + i * step + rng.random() * step for i in range(n)]


def make_alerts(path: Path, n: int, rng: random.Random, end: datetime) -> dict:
    policy = load_policy(ROOT / "rules")
    people = People(rng)
    hashes = [hashlib.sha256(b"file %d" % i).hexdigest() for i in range(20000)]
    secrets = ["card 4111 1111 1111 1111 exp 12/29", "here is the key AKIAIOSFODNN7EXAMPLE for the bucket",
               "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "pay with 5500 0000 0000 0004 please"]
    decisions: dict = {}
    clock = [0.0]
    sample = {}
    with open(path, "wb") as out, alerts.capture_time(lambda: clock[0]):
        for when in _times(n, rng, end):
            clock[0] = when
            protocol, a, b = people.pair()
            kind = rng.random()
            if kind < 0.45:         # a secret sent outbound
                text, direction = rng.choice(secrets), "outbound"
            elif kind < 0.65:       # an executable link received
                text, direction = f"get it at https://files.example/{rng.randrange(10**6)}.exe", "inbound"
            else:
                text, direction = None, rng.choice(("outbound", "inbound"))
            ctx = ChatContext(protocol=protocol, direction=direction, sender=person(protocol, a, device=True),
                              recipients=(person(protocol, b),), client_address=f"10.0.{a % 250}.{a % 200}:5222",
                              server_address="192.0.2.10:5222", connection_id=f"c{a}")
            if text is not None:
                key = (text if not text.startswith("get it") else "link", direction)
                if key not in decisions:
                    decisions[key] = policy.decide_message(text, ctx)
                event = alerts.message_event(text, ctx, decisions[key])
            else:
                sha = hashes[min(int(rng.expovariate(1 / 2000)), len(hashes) - 1)]
                malware = rng.random() < 0.3
                findings = [Finding("yara", "YARA rule EICAR_Test_File matched",
                                    data={"rule": "EICAR_Test_File", "namespace": "bundled", "tags": ["malware"],
                                          "meta": {"category": "malware"}})] if malware else []
                report = FileReport(name=f"invoice-{rng.randrange(10**5)}.exe", path="x.exe", size=68 + a,
                                    sha256=sha, sha1=sha[:40], md5=sha[:32], mime="application/x-dosexec",
                                    family="executable", extension="exe", findings=findings)
                key = ("file", malware, direction)
                if key not in decisions:
                    decisions[key] = policy.decide_file(report, ctx)
                event = alerts.file_event(report, ctx, decisions[key])
                sample.setdefault("sha256", sha)
            assert event["event"]["kind"] == "alert", (key, event["event"])
            out.write(alerts.encode(event))
    sample["rules"] = sorted({r for d in decisions.values() for r in d.rule_ids})
    return sample


def make_archive(path: Path, n: int, rng: random.Random, end: datetime) -> float:
    store = Archive(path)
    db = store.database()
    batch: list[list] = []
    started = time.perf_counter()
    for row in archive_rows(n, rng, end):
        batch.append(row)
        if len(batch) == 500:
            db.write_rows(batch)
            batch = []
    if batch:
        db.write_rows(batch)
    elapsed = time.perf_counter() - started
    store.close()
    return n / elapsed


def archive_rows(n: int, rng: random.Random, end: datetime):
    """The archive's records (ROW_COLUMNS), oldest first."""
    people = People(rng)
    cum_weights = list(itertools.accumulate(1 / (1 + i) for i in range(len(WORDS))))
    rare = set(rng.sample(range(n), RARE_COUNT))
    for i, when in enumerate(_times(n, rng, end)):
        protocol, a, b = people.pair()
        stamp = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
        sender, recipient = person(protocol, a, device=True), person(protocol, b)
        common = [f"r{i}", stamp, "", protocol, "outbound", sender, recipient, "", f"10.0.{a % 250}.1:5222",
                  f"c{a}"]
        if rng.random() < 0.95:
            words = rng.choices(WORDS, cum_weights=cum_weights, k=rng.randrange(3, 20))
            if i in rare:
                words.insert(rng.randrange(len(words)), RARE_WORD)
            common[2] = "message"
            row = common + [" ".join(words), None, None, None, None, None, "allow", "", "v1"]
        else:
            sha = hashlib.sha256(b"archived %d" % i).hexdigest()
            common[2] = "file"
            row = common + [None, f"report-{i}.pdf", 1000 + i, sha, "application/pdf", "upload", "allow", "", "v1"]
        yield row


def measure(fn, repeat: int, budget: float = 20.0) -> tuple[float, float, object]:
    """p50, p99 of `repeat` calls (at least 3, fewer than `repeat` when they take more than `budget` seconds)."""
    result = fn()           # warm-up, not counted
    times: list[float] = []
    deadline = time.perf_counter() + budget
    for i in range(repeat):
        if i >= 3 and time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    return statistics.median(times), p99, result


def report(name: str, p50: float, p99: float, note: str = "") -> None:
    print(f"  {name:<58} p50 {p50:9.2f} ms  p99 {p99:9.2f} ms  {note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=1_000_000)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--reuse", action="store_true", help="keep the folder's data (built by an earlier run)")
    ap.add_argument("--keep-index", action="store_true", help="with --reuse: keep the alert index too (the archive's "
                    "search index is always made again)")
    ap.add_argument("--postgres", type=int, default=0, metavar="N",
                    help="also: N archived records in a throwaway PostgreSQL server (tests/peers: initdb), searched "
                         "by the console with the archive's pg_trgm indexes and without")
    ap.add_argument("--only-postgres", action="store_true", help="with --postgres: nothing else")
    args = ap.parse_args()
    end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    if args.postgres:
        postgres(args.postgres, args.repeat, end)
        if args.only_postgres:
            return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="imguard-bench-console-", dir="/var/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(22)
    print(f"folder {folder}: {args.alerts:,} alerts, {args.records:,} archived records, {args.repeat} queries each")
    alerts_file, archive_file = folder / "alerts.jsonl", folder / "archive.sqlite3"
    index_file = folder / "console" / "alerts-index.sqlite3"
    if not (args.reuse and alerts_file.exists() and archive_file.exists()):
        for old in (alerts_file, archive_file, index_file):
            for part in (old, Path(f"{old}-wal"), Path(f"{old}-shm")):
                part.unlink(missing_ok=True)
        t = time.perf_counter()
        make_alerts(alerts_file, args.alerts, rng, end)
        print(f"alerts.jsonl written: {alerts_file.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - t:.0f} s")
        rate = make_archive(archive_file, args.records, random.Random(23), end)
        print(f"archive written through Archive.database().write_rows: {rate:,.0f} records/s "
              f"({archive_file.stat().st_size / 2**20:,.0f} MiB)")
    elif not args.keep_index:
        index_file.unlink(missing_ok=True)

    # --- the alert index -------------------------------------------------------------------------------------
    print("build")
    t = time.perf_counter()
    index = data.AlertIndex(folder, index_file)
    added = index.refresh()
    elapsed = time.perf_counter() - t
    if added:
        print(f"  alert index from alerts.jsonl: {added:,} alerts in {elapsed:.1f} s = {added / elapsed:,.0f} alerts/s")
    else:
        print("  alert index kept from an earlier run (--keep-index)")
    search_file = folder / "console" / "archive-search.sqlite3"
    for part in (search_file, Path(f"{search_file}-wal"), Path(f"{search_file}-shm")):
        part.unlink(missing_ok=True)
    reader = data.ArchiveReader(archive_file)
    build_search_index(reader, archive_file, search_file, args.repeat)
    r = args.repeat
    db = index._db
    sha = db.execute("SELECT sha256 FROM alerts WHERE sha256 IS NOT NULL GROUP BY sha256 ORDER BY count(*) DESC "
                     "LIMIT 1").fetchone()[0]
    busy = db.execute("SELECT person, count(*) FROM alert_people GROUP BY person ORDER BY 2 DESC LIMIT 1").fetchone()
    rules = db.execute("SELECT rule_id, count(*) FROM alert_rules GROUP BY 1 ORDER BY 2").fetchall()
    print("alerts (AlertIndex, data.py)")
    for name, f in (("newest page", data.AlertFilter()), ("page 100", data.AlertFilter(page=100)),
                    (f"rule {rules[-1][0]} ({rules[-1][1]:,} alerts)", data.AlertFilter(rule=rules[-1][0])),
                    (f"rule {rules[0][0]} ({rules[0][1]:,} alerts)", data.AlertFilter(rule=rules[0][0])),
                    (f"rule {rules[0][0]}, page 20", data.AlertFilter(rule=rules[0][0], page=20)),
                    (f"person {busy[0]} ({busy[1]:,} alerts)", data.AlertFilter(person=busy[0])),
                    ("protocol sip", data.AlertFilter(protocol="sip")),
                    ("protocol sip, page 100", data.AlertFilter(protocol="sip", page=100)),
                    ("sha256 (the most frequent file)", data.AlertFilter(sha256=sha)),
                    ("severity critical, since 30 days", data.AlertFilter(
                        severity="critical", since=(end - timedelta(days=30)).isoformat()[:19]))):
        p50, p99, page = measure(lambda f=f: index.alerts(f), r)
        report(name, p50, p99, f"{len(page.rows)} rows")
    for f in (data.AlertFilter(rule=rules[-1][0]), data.AlertFilter()):   # deep: by the links' cursor, by OFFSET
        cursor = None
        for n in range(1, 2000):
            cursor = index.alerts(dataclasses.replace(f, before=cursor, page=n)).older
        deep = dataclasses.replace(f, before=cursor, page=2000)
        for how, g in (("by its link's cursor", deep), ("by OFFSET (before)", dataclasses.replace(f, page=2000))):
            p50, p99, page = measure(lambda g=g: index.alerts(g), r)
            report(f"{f.rule or 'all'}, page 2,000 {how}", p50, p99, f"{len(page.rows)} rows")
    since = (end - timedelta(days=DAYS)).strftime("%Y-%m-%d")
    p50, p99, o = measure(lambda: index.overview(since, bucket=10), r)
    report("overview, 90 days per day", p50, p99, f"total {o.total:,}")
    week = (end - timedelta(days=7)).strftime("%Y-%m-%dT%H")
    p50, p99, o = measure(lambda: index.overview(week), r)
    report("overview, 7 days per hour (the default)", p50, p99, f"total {o.total:,}")
    p50, p99, _ = measure(index.choices, r)
    report("the filters' choices (rules, protocols, directions)", p50, p99)
    p50, p99, n = measure(lambda: db.execute(f"SELECT count(*) FROM alerts WHERE summary LIKE '%{ABSENT_WORD}%'")
                          .fetchone()[0], 3)
    report("baseline: full scan of the alerts table", p50, p99)

    # --- the archive ------------------------------------------------------------------------------------------
    queries, conversation = archive_queries(reader)
    for label, use in (("after: with the search index", True), ("before: LIKE over the records", False)):
        print(f"archive (ArchiveReader, data.py), {label}")
        reader.search_index = use
        for name, fn in queries:
            p50, p99, rows = measure(fn, r)
            report(name, p50, p99, f"{len(rows)} rows")
    raw = reader._connection()
    p50, p99, _ = measure(lambda: raw.execute(
        f"SELECT count(*) FROM records WHERE text LIKE '%{ABSENT_WORD}%'").fetchone(), 3)
    report("baseline: full scan of the records table", p50, p99)
    reader.search_index = True

    # --- through the application ------------------------------------------------------------------------------
    _http(folder, r, conversation)
    index.close()
    reader.close()
    if args.folder is None:
        shutil.rmtree(folder)


def build_search_index(reader: data.ArchiveReader, archive_file: Path, search_file: Path, repeat: int) -> None:
    """The console's first minutes on an existing archive: its thread makes the search index while a search
    reads the records without it (what the first user waits for is that search, not the index)."""
    t = time.perf_counter()
    reader.start_indexing()
    during: list[float] = []
    while True:
        progress = reader.index_progress()
        if progress.state is data.IndexState.NONE:
            print("  no search index of the archive")
            return
        if progress.state is data.IndexState.READY and progress.indexed == progress.total:
            break
        if len(during) < repeat and progress.state is data.IndexState.BUILDING:
            started = time.perf_counter()
            reader.search(data.RecordQuery(text=RARE_WORD))
            during.append((time.perf_counter() - started) * 1000)
        else:
            time.sleep(0.2)
    elapsed = time.perf_counter() - t
    print(f"  the console's search index of the archive, by its thread: {progress.indexed:,} records in {elapsed:.1f} s"
          f" ({search_file.stat().st_size / 2**20:,.0f} MiB; the archive {archive_file.stat().st_size / 2**20:,.0f} "
          f"MiB)")
    if during:
        report(f"text search {RARE_WORD!r} meanwhile (read without the index)", statistics.median(during),
               max(during), f"{len(during)} searches, the first {during[0]:.0f} ms")


def archive_queries(reader: data.ArchiveReader) -> tuple[list, tuple[str, str, str, str]]:
    """The archive's queries, named, on either backend; and a conversation for the HTTP requests."""
    m = "%s" if reader.dsn else "?"
    with reader._lock:
        raw = reader._connection()

        def one(sql: str, *args):
            return raw.execute(sql, args).fetchone()
        a, b, _ = one("SELECT sender, recipients, count(*) FROM records WHERE id > (SELECT max(id) - 200000 FROM "
                      "records) GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 1")
        protocol = one(f"SELECT protocol FROM records WHERE sender = {m} LIMIT 1", a)[0]
        last = one(f"SELECT max(time) FROM records WHERE sender = {m} AND recipients = {m}", a, b)[0]
        quiet = data.bare(one("SELECT sender FROM records GROUP BY sender ORDER BY count(*), sender LIMIT 1")[0])
        file_sha = one("SELECT sha256 FROM records WHERE sha256 IS NOT NULL ORDER BY id DESC LIMIT 1")[0]
    around = (datetime.fromisoformat(last) - timedelta(hours=24)).isoformat()[:19]
    cursor = None                   # page 50 of the common term, as its links reach it
    for n in range(1, 50):
        cursor = reader.search_page(data.RecordQuery(text=COMMON_WORD, before=cursor, page=n)).older
    return [
        (f"conversation {data.bare(a)} / {b}, all", lambda: reader.conversation(protocol, a, b)),
        ("conversation, 24 h before its last message", lambda: reader.conversation(protocol, a, b, since=around)),
        (f"person search {data.bare(a)!r}", lambda: reader.search(data.RecordQuery(person=data.bare(a)))),
        (f"person search {quiet!r} (few records)", lambda: reader.search(data.RecordQuery(person=quiet))),
        (f"text search {COMMON_WORD!r} (common)", lambda: reader.search(data.RecordQuery(text=COMMON_WORD))),
        (f"text search {RARE_WORD!r} ({RARE_COUNT} records)", lambda: reader.search(data.RecordQuery(text=RARE_WORD))),
        (f"text search {ABSENT_WORD!r} (none)", lambda: reader.search(data.RecordQuery(text=ABSENT_WORD))),
        (f"text search {COMMON_WORD!r}, page 50 by its link's cursor", lambda: reader.search(
            data.RecordQuery(text=COMMON_WORD, before=cursor, page=50))),
        (f"text search {COMMON_WORD!r}, page 50 by OFFSET (before)", lambda: reader.search(
            data.RecordQuery(text=COMMON_WORD, page=50))),
        ("hash search", lambda: reader.search(data.RecordQuery(sha256=file_sha))),
    ], (data.bare(a), data.bare(b), protocol, around)


def postgres(n: int, repeat: int, end: datetime) -> None:
    """The shared PostgreSQL archive: N records (the same generator) copied into a throwaway server, the archive's
    migration made (its search indexes timed on the filled table), searched by the console with and without them."""
    import psycopg

    import re

    from imguard.archive import PG_SEARCH_SCHEMA, ROW_COLUMNS, pg_search_indexes
    from tests.peers.sink_peers import PostgresServer

    indexes = [re.search(r"EXISTS (\w+)", sql).group(1) for sql in PG_SEARCH_SCHEMA if "INDEX" in sql]
    server = PostgresServer.start()
    try:
        Archive(dsn=server.dsn).close()             # the schema, as a gateway makes it
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            for name in indexes:
                conn.execute(f"DROP INDEX {name}")
            t = time.perf_counter()
            with conn.cursor().copy(f"COPY records ({', '.join(ROW_COLUMNS)}) FROM STDIN") as copy:
                for row in archive_rows(n, random.Random(23), end):
                    copy.write_row(row)
            print(f"postgresql: {n:,} records copied in {time.perf_counter() - t:.0f} s")
            t = time.perf_counter()
            assert pg_search_indexes(conn)
            conn.execute("VACUUM ANALYZE records")
            size = conn.execute("SELECT pg_size_pretty(sum(pg_relation_size(indexrelid))) FROM pg_index "
                                "JOIN pg_class c ON c.oid = indexrelid WHERE relname LIKE '%trgm'").fetchone()[0]
            print(f"  the migration's search indexes (pg_trgm, prefixes) on them: {time.perf_counter() - t:.0f} s "
                  f"(trigram indexes {size})")
            reader = data.ArchiveReader(dsn=server.dsn)
            queries, _ = archive_queries(reader)
            for label in ("after: with the search indexes", "before: without them (the (time, id) index only)"):
                print(f"archive in PostgreSQL (ArchiveReader, data.py), {label}")
                for name, fn in queries:
                    p50, p99, rows = measure(fn, repeat)
                    report(name, p50, p99, f"{len(rows)} rows")
                for name in indexes:
                    conn.execute(f"DROP INDEX IF EXISTS {name}")
            reader.close()
    finally:
        server.stop()


def _http(folder: Path, repeat: int, conversation: tuple[str, str, str, str]) -> None:
    import re
    from urllib.parse import urlencode

    from starlette.testclient import TestClient

    from imguard.console.accounts import Role
    from imguard.console.views import Console

    console = Console(folder)
    console.accounts.add("bench", Role.AUDITOR, "a long enough secret", replace=True)
    client = TestClient(console.app, base_url="https://testserver")
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    assert client.post("/login", data={"csrf": csrf, "name": "bench", "password": "a long enough secret"},
                       follow_redirects=False).status_code == 303
    a, b, protocol, around = conversation
    print("through the application (Starlette TestClient, logged in; the whole page rendered)")
    for name, url in (("GET /alerts", "/alerts"), ("GET /alerts?page=100", "/alerts?page=100"),
                      ("GET /?days=90 (overview)", "/?days=90"),
                      ("GET /conversations?text=nightingale", "/conversations?text=" + RARE_WORD),
                      ("GET /conversations?person=" + a, "/conversations?" + urlencode({"person": a})),
                      ("GET /conversations/view (an alert's link)", "/conversations/view?" + urlencode(
                          {"protocol": protocol, "a": a, "b": b, "around": around}))):
        def get(url=url):
            answer = client.get(url)
            assert answer.status_code == 200, (url, answer.status_code)
        p50, p99, _ = measure(get, max(5, repeat // 3))
        report(name, p50, p99)
    console.close()


if __name__ == "__main__":
    main()
