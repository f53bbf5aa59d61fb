"""The `imguard` command.

    imguard run     the inline gateway (imguard.gateway)
    imguard ca      print or export the gateway's CA certificate
    imguard scan    inspect files and folders and show the policy decision for each
    imguard rules   check or test a rules folder together with its signatures
    imguard config  check a configuration file of `imguard run`; print the example or docs/settings.md
    imguard console the web console for the security team and auditors (imguard.console)

Exit codes: 0 success (for scan: nothing blocked), 1 something was blocked or a rule test failed,
2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from imguard import __version__, settings
from imguard.runtime import BUNDLED_RULES, BUNDLED_SIGNATURES, ConfigError, add_config_arguments, default_data_dir

EXIT_OK, EXIT_BLOCKED, EXIT_USAGE = 0, 1, 2


def _print_config_errors(errors: list[str]) -> None:
    for error in errors:
        print(error, file=sys.stderr)     # `file:line: message`, as compilers print it


# --- imguard scan ------------------------------------------------------------------------------------

def _iter_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path   # a missing or unreadable path is reported by the inspector as unreadable


def _format_report(path: Path, report, decision, explain: bool) -> str:
    lines = [f"{path}"]
    lines.append(f"  type     {report.mime} ({report.family}) {report.description}".rstrip())
    lines.append(f"  size     {report.size}")
    lines.append(f"  sha256   {report.sha256}")
    lines.append(f"  sha1     {report.sha1}")
    lines.append(f"  md5      {report.md5}")
    for member in list(report.walk())[1:]:
        lines.append(f"  member   {member.path}  {member.mime} ({member.family}) {member.size} B")
    for finding in report.all_findings():
        where = f" [{finding.path}]" if finding.path and finding.path != report.path else ""
        lines.append(f"  finding  {finding.kind}: {finding.detail}{where}")
    rules = ", ".join(decision.rule_ids) or "-"
    lines.append(f"  decision {decision.action.upper()}  rules: {rules}")
    for match in decision.shadow:
        lines.append(f"  shadow   {match.rule_id} would {match.action}")
    if explain:
        from imguard.policy import explain as explain_decision
        lines.extend(f"  engine   {verdict['detail']}" for verdict in report.engine_verdicts)
        lines.extend("  " + line for line in explain_decision(decision).splitlines())
    return "\n".join(lines)


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.enabled = total > 1 and sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")


def scan_main(args: argparse.Namespace) -> int:
    from imguard.inspect import InspectLimits
    from imguard.inspect.signatures import SignatureSettings
    from imguard.model import ChatContext
    from imguard.runtime import build_pipeline

    limits = settings.from_arguments(InspectLimits, args)
    try:
        pipeline = build_pipeline(args.rules, args.signatures, args.data_dir or default_data_dir(),
                                  limits=limits, write_alerts=False,
                                  signature_settings=settings.from_arguments(SignatureSettings, args))
    except ConfigError as e:
        _print_config_errors(e.errors)
        return EXIT_USAGE
    files = list(_iter_files(args.paths))
    context = ChatContext(protocol=args.protocol, direction=args.direction, sender=args.sender,
                          recipients=tuple(args.recipient or ()))

    def check(path: Path):
        report, decision = pipeline.check_file(path, context, name=path.name)
        return path, report, decision

    blocked = False
    progress = _Progress(len(files))
    # Both cores: yara-python releases the GIL while it scans, so threads scan in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        for path, report, decision in pool.map(check, files):
            progress.step()
            blocked |= decision.blocked
            if args.json:
                print(json.dumps({"path": str(path), "report": report.to_dict(), "decision": decision.to_dict()},
                                 default=str), flush=True)
            else:
                progress.finish()
                print(_format_report(path, report, decision, args.explain), flush=True)
    progress.finish()
    return EXIT_BLOCKED if blocked else EXIT_OK


# --- imguard retrohunt ------------------------------------------------------------------------------

def retrohunt_main(args: argparse.Namespace) -> int:
    """Rescan the files seen since --since with the given signatures and rules; a retrohunt alert (alerts.jsonl
    and the sinks) for each that is now blocked; a progress bar on stderr, the summary on stdout.
    Exit 0: nothing newly blocked; 1: something is; 2: usage or configuration error."""
    from imguard import retrohunt
    from imguard.filestore import FileStoreSettings
    from imguard.inspect import InspectLimits
    from imguard.inspect.signatures import SignatureSettings
    from imguard.runtime import build_pipeline

    try:
        since = retrohunt.since_time(args.since)
    except ValueError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        pipeline = build_pipeline(args.rules, args.signatures, args.data_dir or default_data_dir(),
                                  limits=settings.from_arguments(InspectLimits, args),
                                  signature_settings=settings.from_arguments(SignatureSettings, args),
                                  filestore_settings=FileStoreSettings(retrohunt_on_reload=False))
    except ConfigError as e:
        _print_config_errors(e.errors)
        return EXIT_USAGE
    progress: _Progress | None = None

    def step(done: int, total: int) -> None:
        nonlocal progress
        if progress is None:
            progress = _Progress(total)
        progress.step()

    try:
        summary = retrohunt.hunt(pipeline, since, progress=step, workers=args.workers)
    finally:
        if progress is not None:
            progress.finish()
        pipeline.close()
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        rate = f", {summary.rescanned / summary.seconds:.0f} files/s" if summary.seconds and summary.rescanned else ""
        print(f"retro-hunt since {since}: {summary.files} files seen, {summary.rescanned} rescanned in "
              f"{summary.seconds:.1f}s{rate}")
        print(f"  now blocked      {len(summary.alerts)}")
        print(f"  already blocked  {summary.outcomes['already_blocked']}")
        print(f"  unchanged        {summary.outcomes['unchanged']}")
        print(f"  not kept         {len(summary.not_kept)} (seen, but retention removed the bytes: not rescannable)")
        if summary.outcomes["failed"]:
            print(f"  failed           {summary.outcomes['failed']} (see the log)")
        for event in summary.alerts:
            print(f"  {event['message']}")
        for sha256 in summary.not_kept:
            print(f"  not rescannable: {sha256}")
    return EXIT_BLOCKED if summary.alerts else EXIT_OK


# --- imguard rules ----------------------------------------------------------------------------------

def rules_check_main(args: argparse.Namespace) -> int:
    """Load rules (one folder or several, in order) with their signatures; say how many of each loaded, and warn
    about what loads but will not work as expected: no signature at all, files left out, slow rules."""
    from imguard.inspect.signatures import SignatureSettings
    from imguard.runtime import load_configuration

    sig_settings = settings.from_arguments(SignatureSettings, args)
    try:
        loaded = load_configuration(args.dirs, args.signatures, None, sig_settings)
    except ConfigError as e:
        _print_config_errors(e.errors)
        return EXIT_USAGE
    sigs, policy = loaded.signatures, loaded.policy
    print(f"rules: {len(policy.rules)} rules from {len(policy.files)} files in {len(args.dirs)} folder(s) "
          f"({', '.join(str(d) for d in args.dirs)}), policy version {policy.version}")
    print(f"signatures: {sigs.rule_count} YARA rules from {len(sigs.files)} files in {args.signatures}, "
          f"version {sigs.version}")
    from imguard.policy.hashlists import bundled_folder, folders_of, load_hash_lists
    lists, _ = load_hash_lists(folders_of(args.dirs, sig_settings.hash_lists), bundled_folder())  # loaded just above
    print(f"hash lists: {len(lists.lists)} lists, {sum(len(hl) for hl in lists.lists.values())} hashes: "
          f"{lists.summary()}")
    warnings = 0
    if sigs.rule_count == 0:
        warnings += 1
        print(f"warning: {args.signatures}: no YARA rule loaded: no file will match a signature "
              f"(only *.yar/*.yara at the top of the folder, or its index.yar, are read)", file=sys.stderr)
    for line in (*sigs.skipped, *sigs.unused):
        warnings += 1
        print(f"warning: {line}", file=sys.stderr)
    if sigs.warnings:
        warnings += 1
        print(f"warning: {len(sigs.warnings)} YARA compiler warnings (rules that may slow down every scan)"
              + ("" if args.show_warnings else "; --show-warnings prints them"), file=sys.stderr)
        if args.show_warnings:
            for line in sigs.warnings:
                print(f"  {line}", file=sys.stderr)
    print("OK" + (f" ({warnings} warning{'s' if warnings > 1 else ''})" if warnings else ""))
    return EXIT_OK


def rules_test_main(args: argparse.Namespace) -> int:
    from imguard.inspect import InspectLimits, Inspector
    from imguard.inspect.signatures import SignatureSettings
    from imguard.policy.testing import run_rule_tests, summary
    from imguard.runtime import load_configuration

    try:
        loaded = load_configuration(args.dir, args.signatures, None, settings.from_arguments(SignatureSettings, args))
    except ConfigError as e:
        _print_config_errors(e.errors)
        return EXIT_USAGE
    tests_dir = args.tests or (args.dir / "tests")
    results = run_rule_tests(tests_dir, loaded.policy, Inspector(loaded.signatures, InspectLimits()))
    for result in results:
        print(result)
    print(summary(results))
    return EXIT_OK if results and all(r.passed for r in results) else EXIT_BLOCKED


def rules_explain_main(args: argparse.Namespace) -> int:
    from imguard.model import ChatContext
    from imguard.policy import PolicyError, explain, load_policy

    try:
        policy = load_policy(args.dir)
    except PolicyError as e:
        _print_config_errors(e.errors)
        return EXIT_USAGE
    ctx = ChatContext(protocol=args.protocol, direction=args.direction, sender=args.sender,
                      recipients=tuple(args.recipient or ()))
    print(explain(policy.decide_message(args.text, ctx)))
    return EXIT_OK


# --- imguard quarantine -----------------------------------------------------------------------------

def quarantine_main(args: argparse.Namespace) -> int:
    from imguard.quarantine import QuarantineStore

    store = QuarantineStore((args.data_dir or default_data_dir()) / "quarantine")
    if args.quarantine_command == "list":
        entries = store.entries()
        if args.json:
            for entry in entries:
                print(json.dumps(entry.__dict__))
            return EXIT_OK
        print(f"{'sha256':64}  {'size':>9}  {'seen':>4}  {'last seen':25}  actions/rules  name")
        for e in entries:
            print(f"{e.sha256}  {e.size:>9}  {e.times_seen:>4}  {e.last_seen:25}  "
                  f"{','.join(e.actions)}/{','.join(e.rules)}  {e.name!r}")
        return EXIT_OK
    try:
        sidecar = store.show(args.sha256)
    except ValueError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return EXIT_USAGE
    if sidecar is None:
        print(f"imguard: {args.sha256} is not in the quarantine", file=sys.stderr)
        return EXIT_USAGE
    if args.quarantine_command == "show":
        print(json.dumps(sidecar, indent=2))
        return EXIT_OK
    # export: the bytes to a file the caller names, readable only by them (it may be malware).
    try:
        fd = os.open(args.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        print(f"imguard: cannot create {args.dest}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with os.fdopen(fd, "wb") as f:
        f.write(store.read(args.sha256))
    print(f"exported {args.sha256} to {args.dest}")
    return EXIT_OK


# --- imguard archive --------------------------------------------------------------------------------

def _open_archive(args: argparse.Namespace):
    """The archive of --archive-dsn, else DATA_DIR's SQLite; None (said on stderr) when there is none."""
    from imguard import archive

    if args.archive_dsn:
        return archive.Archive(dsn=args.archive_dsn)
    path = (args.data_dir or default_data_dir()) / "archive.sqlite3"
    if not path.exists():
        print(f"imguard: no archive at {path}", file=sys.stderr)
        return None
    return archive.Archive(path)


def _archive_record(args: argparse.Namespace, event: dict) -> None:
    """An archive event (hold, verify, retention) through the event pipeline: DATA_DIR/alerts.jsonl."""
    from imguard.sinks import build_sinks
    try:
        bus = build_sinks(None, args.data_dir or default_data_dir())
    except OSError as e:        # an auditor's account may read the archive but not write the data folder
        print(f"imguard: the {event['event']['action']} event was not recorded: {e}", file=sys.stderr)
        return
    try:
        bus.write(event)
    finally:
        bus.close()


def archive_audit_main(args: argparse.Namespace) -> int:
    """imguard archive verify | hold add|list|release | retention apply (imguard/archive_audit.py)."""
    import time as time_module

    from imguard import archive_audit as audit
    from imguard.quarantine import QuarantineStore

    store = _open_archive(args)
    if store is None:
        return EXIT_USAGE
    operator = audit.operator_name()
    data_dir = args.data_dir or default_data_dir()
    quarantine_dir = data_dir / "quarantine"
    try:
        if args.archive_command == "verify":
            heads = audit.load_heads(args.heads) if args.heads else None
            quarantine = QuarantineStore(quarantine_dir) if quarantine_dir.is_dir() else None
            result = audit.verify(store, quarantine, heads)
            print(audit.verification_report(result))
            if args.save_heads:
                audit.save_heads(args.save_heads, result)
            _archive_record(args, audit.archive_event(
                "archive_verify", "archive verified" if result.ok else
                f"archive verification failed: {result.problems[0]}", ["info"], category="database",
                outcome="success" if result.ok else "failure", operator=operator,
                verify={"chains": len(result.chains), "problems": result.problems[:20],
                        "unchained": result.unchained, "removed": result.removed}))
            return EXIT_OK if result.ok else EXIT_BLOCKED
        if args.archive_command == "hold":
            if args.hold_command == "add":
                try:
                    hold = audit.add_hold(store, args.scope, args.value, args.reason, operator)
                except ValueError as e:
                    print(f"imguard: {e}", file=sys.stderr)
                    return EXIT_USAGE
                _archive_record(args, audit.hold_event("archive_hold_add", hold, operator))
                print(hold.id)
                return EXIT_OK
            if args.hold_command == "release":
                hold = audit.release_hold(store, args.id, operator)
                if hold is None:
                    print(f"imguard: no hold {args.id} in force", file=sys.stderr)
                    return EXIT_USAGE
                _archive_record(args, audit.hold_event("archive_hold_release", hold, operator))
                print(f"released {hold.id}")
                return EXIT_OK
            for hold in audit.list_holds(store, released=args.all):
                print(json.dumps(hold.to_dict(), ensure_ascii=False))
            return EXIT_OK
        if args.archive_command == "export":
            from imguard import archive, archive_export
            query = archive.Query(person=args.person, text=args.text, since=args.since, until=args.until,
                                  protocol=args.protocol, conversation=args.conversation, sha256=args.sha256)
            quarantine = QuarantineStore(quarantine_dir) if quarantine_dir.is_dir() else None
            if args.format == "pcap":
                from imguard import archive_pcap
                result = archive_pcap.export_pcap(store, query, args.out, quarantine, args.cursor, args.event_id)
            elif args.event_id:
                print("imguard: --event-id selects a record for --pcap only", file=sys.stderr)
                return EXIT_USAGE
            else:
                result = archive_export.export(store, query, args.format, args.out, quarantine, args.cursor)
            message = (f"archive export ({args.format}): {result.documents} documents, {result.messages} messages, "
                       f"{result.files} files ({result.attached} attached), cursor {result.cursor}"
                       + "".join(f", {path}" for path in result.paths if args.format == "pcap"))
            _archive_record(args, audit.archive_event(
                "archive_export", message, ["access"], category="database", operator=operator,
                export={"format": args.format, "out": str(args.out), **result.to_dict(),
                        **({"event_id": args.event_id} if args.event_id else {}),
                        "query": {k: v for k, v in vars(query).items() if v not in ("", -1) and k != "limit"}}))
            print(message)
            return EXIT_OK
        # retention apply
        try:
            rules = [audit.RetentionRule.parse(text) for text in args.rule or ()]
        except ValueError as e:
            print(f"imguard: {e}", file=sys.stderr)
            return EXIT_USAGE
        parties = audit.Parties.from_rules(args.rules or [BUNDLED_RULES])
        quarantine = QuarantineStore(quarantine_dir) if quarantine_dir.is_dir() else None
        result = audit.apply_retention(store, rules, parties, time_module.time(), quarantine)
        event = audit.retention_event(result, rules, operator)
        _archive_record(args, event)
        print(event["message"])
        return EXIT_OK
    finally:
        store.close()


def archive_main(args: argparse.Namespace) -> int:
    from imguard import archive

    if args.archive_command != "search":
        return archive_audit_main(args)
    if args.archive_dsn:
        store = archive.Archive(dsn=args.archive_dsn)      # search only: no local queue needed
    else:
        path = (args.data_dir or default_data_dir()) / "archive.sqlite3"
        if not path.exists():
            print(f"imguard: no archive at {path}", file=sys.stderr)
            return EXIT_USAGE
        store = archive.Archive(path)
    records = store.search(archive.Query(person=args.person, text=args.text, since=args.since, until=args.until,
                                         protocol=args.protocol, sha256=args.sha256, limit=args.limit))
    sys.stdout.write(archive.to_csv(records) if args.format == "csv" else archive.to_jsonl(records))
    return EXIT_OK


# --- imguard config ---------------------------------------------------------------------------------

def config_main(args: argparse.Namespace) -> int:
    from imguard import config

    parser = build_parser()
    run = parser.commands["run"]
    if args.config_command == "check":
        errors = config.check(args.file, run)
        if errors:
            _print_config_errors(errors)
            return EXIT_USAGE
        print(f"{args.file}: OK")
        return EXIT_OK
    if args.config_command == "example":
        sys.stdout.write(config.example(run))
    else:
        sys.stdout.write(config.docs(parser, {name: parser.commands[name] for name in ("run", "scan", "pcap",
                                                                                          "sniff")}))
    return EXIT_OK


# --- the parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imguard", description="Instant-messaging security gateway.")
    parser.add_argument("--version", action="version", version=f"imguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    from imguard.gateway import cli as gateway_cli
    run = commands.add_parser("run", help="run the inline gateway")
    gateway_cli.add_run_arguments(run)
    run.add_argument("--config", type=Path, default=None, metavar="FILE",
                     help="read settings from this YAML file (keys: these options without their dashes; "
                          "`imguard config example`); an option given here wins over the file")
    run.set_defaults(handler=gateway_cli.run_main)
    ca = commands.add_parser("ca", help="print or export the gateway's CA certificate")
    gateway_cli.add_ca_arguments(ca)
    ca.set_defaults(handler=gateway_cli.ca_main)

    from imguard.replay import cli as replay_cli
    pcap = commands.add_parser("pcap", help="replay packet captures through the same sessions and policy",
                               description="Exit codes: 0 nothing blocked, 1 something blocked, 2 usage error or "
                                           "not a capture.")
    replay_cli.add_pcap_arguments(pcap)
    pcap.set_defaults(handler=replay_cli.replay_main)

    from imguard.replay import sniff as sniff_cli
    sniff = commands.add_parser("sniff", help="watch a SPAN port or tap: alert-only, through the same pipeline",
                                description="Exit codes: 0 nothing would have been blocked, 1 something would "
                                            "have, 2 usage error or the interface cannot be captured.")
    sniff_cli.add_sniff_arguments(sniff)
    sniff.set_defaults(handler=sniff_cli.sniff_main)

    from imguard.inspect import InspectLimits
    from imguard.inspect.signatures import SignatureSettings
    scan = commands.add_parser("scan", help="inspect files and folders and show the policy decision",
                               description="Exit codes: 0 nothing blocked, 1 something blocked, 2 usage or "
                                           "configuration error.")
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    add_config_arguments(scan, "data folder for the compiled-signature cache, CA, alerts")
    scan.add_argument("--json", action="store_true", help="one JSON object per file")
    scan.add_argument("--explain", action="store_true", help="show which conditions of each rule matched")
    scan.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="files scanned at once")
    scan.add_argument("--protocol", default="", help="chat context for the policy: protocol")
    scan.add_argument("--direction", default="", choices=["", "inbound", "outbound", "internal"],
                      help="chat context for the policy: direction")
    scan.add_argument("--sender", default="", help="chat context for the policy: sender")
    scan.add_argument("--recipient", action="append", help="chat context for the policy: recipient (repeatable)")
    settings.add_arguments(scan, InspectLimits, "inspection limits")
    settings.add_arguments(scan, SignatureSettings)
    scan.set_defaults(handler=scan_main)

    retrohunt = commands.add_parser(
        "retrohunt", help="rescan the files that crossed since --since with these signatures; alert on each now "
                          "blocked, naming who sent and received it",
        description="Exit codes: 0 nothing newly blocked, 1 a file is now blocked (a retrohunt alert), 2 usage or "
                    "configuration error.")
    retrohunt.add_argument("--since", default="7d", help="how far back: an age (7d, 12h, 30m, 2w) or an ISO date "
                                                         "(default: 7d)")
    add_config_arguments(retrohunt, "data folder whose archive, file store and quarantine are hunted; the "
                                    "alerts go to its alerts.jsonl")
    retrohunt.add_argument("--json", action="store_true", help="the summary as one JSON object")
    retrohunt.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="files rescanned at once")
    settings.add_arguments(retrohunt, InspectLimits, "inspection limits")
    settings.add_arguments(retrohunt, SignatureSettings)
    retrohunt.set_defaults(handler=retrohunt_main)

    from imguard import digest as digest_cli
    digest = commands.add_parser("digest", help="mail the security team a digest of the last day: blocks, top rules "
                                                "and senders, sinks' and gateways' health",
                                 description="Exit codes: 0 sent (or printed), 1 the mail could not be sent, 2 usage.")
    digest_cli.add_digest_arguments(digest)
    digest.set_defaults(handler=digest_cli.digest_main)

    quarantine = commands.add_parser("quarantine", help="list, show or export quarantined files")
    quarantine_commands = quarantine.add_subparsers(dest="quarantine_command", metavar="SUBCOMMAND", required=True)
    q_list = quarantine_commands.add_parser("list", help="every quarantined file, oldest first")
    q_list.add_argument("--json", action="store_true")
    q_show = quarantine_commands.add_parser("show", help="a file's report and every time it was seen")
    q_show.add_argument("sha256")
    q_export = quarantine_commands.add_parser("export", help="write a quarantined file's bytes to DEST (mode 0600)")
    q_export.add_argument("sha256")
    q_export.add_argument("dest", type=Path)
    for sub in (q_list, q_show, q_export):
        sub.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                         help=f"the gateway's data folder (default: {default_data_dir()})")
    quarantine.set_defaults(handler=quarantine_main)

    archive_parser = commands.add_parser("archive", help="search, verify, hold and apply retention to the "
                                                         "conversation archive")
    archive_commands = archive_parser.add_subparsers(dest="archive_command", metavar="SUBCOMMAND", required=True)
    search = archive_commands.add_parser("search", help="find messages and transfers; print them as JSON lines or CSV")
    search.add_argument("--person", default="", help="sender or recipient contains this")
    search.add_argument("--text", default="", help="message text or file name contains this")
    search.add_argument("--since", default="", help="from this ISO time (UTC), inclusive")
    search.add_argument("--until", default="", help="up to this ISO time (UTC), exclusive")
    search.add_argument("--protocol", default="")
    search.add_argument("--sha256", default="", help="a file's SHA-256")
    search.add_argument("--limit", type=int, default=1000)
    search.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    search.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help=f"the gateway's data folder (default: {default_data_dir()})")
    search.add_argument("--archive-dsn", default="", metavar="DSN",
                        help="search a PostgreSQL archive shared by several gateways instead of DATA_DIR's SQLite")
    verify = archive_commands.add_parser(
        "verify", help="prove every record's hash chain and the quarantine's ledger unbroken, or name the first "
                       "altered or missing record", description="Exit codes: 0 intact, 1 tampered, 2 no archive.")
    verify.add_argument("--heads", type=Path, default=None, metavar="FILE",
                        help="chain heads saved by an earlier verify: proves no chain was cut short since")
    verify.add_argument("--save-heads", type=Path, default=None, metavar="FILE",
                        help="write each chain's head here (keep it outside the gateway's reach)")
    hold = archive_commands.add_parser("hold", help="legal holds: keep a person's, group's or conversation's "
                                                    "records and files whatever the retention rules say")
    hold_commands = hold.add_subparsers(dest="hold_command", metavar="SUBCOMMAND", required=True)
    hold_add = hold_commands.add_parser("add", help="place a hold; prints its id")
    hold_add.add_argument("scope", choices=["person", "group", "conversation"])
    hold_add.add_argument("value", help="the person (address), group (rules/groups.yaml) or conversation")
    hold_add.add_argument("--reason", default="", help="the matter, for the record")
    hold_list = hold_commands.add_parser("list", help="holds in force, as JSON lines")
    hold_list.add_argument("--all", action="store_true", help="released holds too")
    hold_release = hold_commands.add_parser("release", help="release a hold")
    hold_release.add_argument("id")
    retention = archive_commands.add_parser("retention", help="apply retention by group (held records are kept)")
    retention_commands = retention.add_subparsers(dest="retention_command", metavar="SUBCOMMAND", required=True)
    retention_apply = retention_commands.add_parser("apply", help="delete what the rules let go; print the counts")
    retention_apply.add_argument("--rule", action="append", metavar="GROUP:max=DAYS|GROUP:min=DAYS",
                                 help="a retention rule (repeatable); GROUP from rules/groups.yaml, or * for all")
    retention_apply.add_argument("--rules", type=Path, action="append", default=None, metavar="DIR",
                                 help="the rules folder whose groups.yaml defines the groups (default: the bundled)")
    export = archive_commands.add_parser(
        "export", help="export for e-discovery: EML (one message per conversation-day) or RSMF 2.0.0, with the "
                       "quarantined files attached; or a capture (--pcap) for incident response; incremental with "
                       "--cursor")
    export.add_argument("--format", choices=["eml", "rsmf", "pcap"], default="eml")
    export.add_argument("--pcap", dest="format", action="store_const", const="pcap",
                        help="write the selected records as one pcapng capture Wireshark opens, rebuilt from the "
                             "archive in each protocol's framing (XMPP, IRC; see imguard/archive_pcap.py)")
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the documents are written")
    export.add_argument("--cursor", type=Path, default=None, metavar="FILE",
                        help="export only what was stored since the export that wrote FILE; then update it")
    export.add_argument("--person", default="", help="sender or recipient contains this")
    export.add_argument("--text", default="", help="message text or file name contains this")
    export.add_argument("--conversation", default="", help="this conversation (as archived)")
    export.add_argument("--since", default="", help="from this ISO time (UTC), inclusive")
    export.add_argument("--until", default="", help="up to this ISO time (UTC), exclusive")
    export.add_argument("--protocol", default="")
    export.add_argument("--sha256", default="", help="file records of this SHA-256 (a blocked transfer)")
    export.add_argument("--event-id", default="", metavar="ID",
                        help="this one record: its id (as `imguard archive search` prints it) or its uid")
    for sub in (verify, hold_add, hold_list, hold_release, retention_apply, export):
        sub.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                         help=f"the gateway's data folder (default: {default_data_dir()})")
        sub.add_argument("--archive-dsn", default="", metavar="DSN",
                         help="a PostgreSQL archive shared by several gateways instead of DATA_DIR's SQLite")
    archive_parser.set_defaults(handler=archive_main)

    from imguard.console import cli as console_cli
    console = commands.add_parser("console", help="the web console on the data folder (HTTPS, accounts: "
                                                  "`imguard console user add`)")
    console_cli.add_console_arguments(console)
    console.set_defaults(handler=console_cli.console_main)

    from imguard import matrix_scanner
    content_scanner = commands.add_parser("content-scanner", help="serve the Matrix content scanner API (MSC1453) "
                                                                  "with imguard's inspection and policy")
    matrix_scanner.add_arguments(content_scanner)
    content_scanner.set_defaults(handler=matrix_scanner.main)

    rules = commands.add_parser("rules", help="check or test policy rules")
    rules_commands = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    check = rules_commands.add_parser("check", help="validate rules and signatures together (file:line errors)",
                                      description="Exit codes: 0 loads (warnings go to stderr), 2 errors.")
    check.add_argument("dirs", nargs="*", type=Path, default=[BUNDLED_RULES], metavar="DIR",
                       help="rules folders, evaluated in this order (as `imguard run --rules`)")
    check.add_argument("--signatures", type=Path, default=BUNDLED_SIGNATURES, metavar="DIR")
    check.add_argument("--show-warnings", action="store_true", help="print every YARA compiler warning")
    settings.add_arguments(check, SignatureSettings)
    check.set_defaults(handler=rules_check_main)
    test = rules_commands.add_parser("test", help="run the rule test cases (DIR/tests/*.yaml)")
    test.add_argument("dir", nargs="?", type=Path, default=BUNDLED_RULES, metavar="DIR")
    test.add_argument("--signatures", type=Path, default=BUNDLED_SIGNATURES, metavar="DIR")
    test.add_argument("--tests", type=Path, default=None, metavar="DIR", help="test cases folder (default: DIR/tests)")
    settings.add_arguments(test, SignatureSettings)
    test.set_defaults(handler=rules_test_main)
    explain_parser = rules_commands.add_parser("explain", help="decide on one message and show why")
    explain_parser.add_argument("dir", nargs="?", type=Path, default=BUNDLED_RULES, metavar="DIR")
    explain_parser.add_argument("--text", required=True, help="the message text")
    explain_parser.add_argument("--sender", default="")
    explain_parser.add_argument("--recipient", action="append", help="a recipient (repeatable)")
    explain_parser.add_argument("--protocol", default="xmpp")
    explain_parser.add_argument("--direction", default="", choices=["", "inbound", "outbound", "internal"],
                                help="default: derived from the zones in the rules folder")
    explain_parser.set_defaults(handler=rules_explain_main)

    config_parser = commands.add_parser("config", help="check a configuration file; print the example or the "
                                                       "settings reference",
                                        description="Exit codes: 0 the file is valid, 2 it is not (file:line "
                                                    "errors on stderr).")
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    config_check = config_commands.add_parser("check", help="validate a configuration file of `imguard run`")
    config_check.add_argument("file", type=Path, metavar="FILE")
    config_commands.add_parser("example", help="print the commented example (deploy/imguard.yaml)")
    config_commands.add_parser("docs", help="print the settings reference (docs/settings.md)")
    config_parser.set_defaults(handler=config_main)
    parser.commands = commands.choices      # name -> parser: the configuration file reads `run`'s options
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:           # imguard run --config FILE
        from imguard import config
        try:
            values = config.read(args.config, parser.commands[args.command])
        except config.ConfigFileError as e:
            _print_config_errors(e.errors)
            return EXIT_USAGE
        args = config.parse_args(parser, parser.commands[args.command], argv, values)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
