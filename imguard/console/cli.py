"""`imguard console` (serve the console) and `imguard console user add NAME --role ROLE` (an account)."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import sys
from pathlib import Path

from imguard import settings
from imguard.settings import setting

EXIT_OK, EXIT_USAGE = 0, 2


@dataclasses.dataclass(frozen=True)
class ConsoleSettings:
    """web console"""

    console_host: str = setting("127.0.0.1", "Address the console listens on: loopback unless the admin says "
                                             "otherwise (it shows every employee's chat).")
    console_port: int = setting(8443, "HTTPS port of the console.")
    console_cert: str = setting("", "PEM certificate (chain) for the console's HTTPS; '' issues one from "
                                    "imguard's CA in DATA_DIR/ca for --console-host.")
    console_key: str = setting("", "PEM private key of --console-cert.")
    console_login_failures: int = setting(5, "Failed logins per account name before each further one locks "
                                             "that name (per client address: five times as many).")
    console_login_lock_seconds: float = setting(30.0, "First lock after too many failed logins; doubled per "
                                                      "further failure, at most 15 minutes.")
    console_session_idle_seconds: int = setting(1800, "A session unused this long is ended (login again).")
    console_export_max_records: int = setting(10_000, "Records in one CSV or JSON-lines export at most.")
    console_release_link_hours: float = setting(72.0, "A released file's one-time download link works this long "
                                                      "(and once).")
    console_public_url: str = setting("", "The console's address as the receivers reach it (https://host:port): the "
                                          "released file's one-time link the gateway sends into their chat points "
                                          "there; '' uses the address the approving analyst used.")
    console_playground_max_bytes: int = setting(25 * 1024 * 1024, "Largest file the rule playground inspects "
                                                                   "(a larger upload is refused).")
    console_review_sample_percent: float = setting(
        0.0, "Supervision: the percentage of each day's unflagged archived conversations drawn into the review "
             "queue (FINRA 3110-style random review); 0 draws none.")
    console_review_sample_seed: str = setting(
        "", "Seed of the daily supervision sample (the same seed and archive draw the same conversations); '' uses "
            "one drawn once and kept in the review trail.")
    console_review_sample_days: int = setting(
        7, "Completed days back whose sample the console draws when it finds them not drawn yet (after a stop).")


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    from imguard.archive import ArchiveSettings
    from imguard.runtime import default_data_dir

    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help=f"the gateway's data folder to read (default: {default_data_dir()})")
    settings.add_arguments(parser, ConsoleSettings)
    from imguard.runtime import BUNDLED_RULES, BUNDLED_SIGNATURES
    parser.add_argument("--rules", type=Path, default=BUNDLED_RULES, metavar="DIR",
                        help="the rules folder the rule playground decides with (the gateway's; default: the bundled)")
    parser.add_argument("--signatures", type=Path, default=BUNDLED_SIGNATURES, metavar="DIR",
                        help="the YARA signatures folder of the rule playground (default: the bundled)")
    settings.add_arguments(parser, ArchiveSettings)
    users = parser.add_subparsers(dest="console_command", metavar="SUBCOMMAND")
    user = users.add_parser("user", help="manage console accounts")
    user_commands = user.add_subparsers(dest="user_command", metavar="SUBCOMMAND", required=True)
    add = user_commands.add_parser("add", help="add an account (the password is asked, or read from a file)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["auditor", "analyst", "admin"],
                     help="auditor: alerts and conversations; analyst: also the quarantine (zip download, "
                          "release decisions) and the rule playground; admin: also users")
    add.add_argument("--password-file", type=Path, default=None, metavar="FILE",
                     help="read the password from the first line of FILE ('-': standard input)")
    add.add_argument("--replace", action="store_true", help="set a new role and password for an existing name")
    user_commands.add_parser("list", help="the accounts and their roles")
    for sub in (add, user_commands.choices["list"]):
        sub.add_argument("--data-dir", type=Path, default=None, metavar="DIR", dest="user_data_dir",
                         help="the data folder (default: as for `imguard console`)")


def console_main(args: argparse.Namespace) -> int:
    from imguard.runtime import default_data_dir

    data_dir = Path(getattr(args, "user_data_dir", None) or args.data_dir or default_data_dir())
    if args.console_command == "user":
        return _user_main(args, data_dir)
    return _serve(args, data_dir)


def _user_main(args: argparse.Namespace, data_dir: Path) -> int:
    from imguard.console.accounts import AccountError, Accounts, Role

    accounts = Accounts(data_dir / "console" / "users.json")
    if args.user_command == "list":
        for user in accounts.users():
            print(f"{user.name}\t{user.role.value}")
        return EXIT_OK
    if args.password_file is not None:
        source = sys.stdin.read() if str(args.password_file) == "-" else args.password_file.read_text()
        password = source.splitlines()[0] if source else ""
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("imguard: the passwords differ", file=sys.stderr)
            return EXIT_USAGE
    try:
        accounts.add(args.name, Role(args.role), password, replace=args.replace)
    except AccountError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.name}: {args.role} (in {accounts.path})")
    return EXIT_OK


def _serve(args: argparse.Namespace, data_dir: Path) -> int:
    import uvicorn

    from imguard.archive import ArchiveSettings
    from imguard.console.serve import TlsError, issue_certificate
    from imguard.console.views import Console

    chosen = settings.from_arguments(ConsoleSettings, args)
    archive_settings = settings.from_arguments(ArchiveSettings, args)
    if not data_dir.is_dir():
        print(f"imguard: no data folder at {data_dir}", file=sys.stderr)
        return EXIT_USAGE
    if bool(chosen.console_cert) != bool(chosen.console_key):
        print("imguard: --console-cert and --console-key go together", file=sys.stderr)
        return EXIT_USAGE
    if chosen.console_cert:
        cert, key = Path(chosen.console_cert), Path(chosen.console_key)
    else:
        try:
            cert, key = issue_certificate(data_dir, [chosen.console_host, "localhost"],
                                          data_dir / "console" / "tls")
        except TlsError as e:
            print(f"imguard: {e}", file=sys.stderr)
            return EXIT_USAGE
    console = Console(data_dir, chosen, archive_settings.archive_dsn, rules=args.rules, signatures=args.signatures)
    if not console.accounts.users():
        print(f"imguard: no console accounts yet: `imguard console user add NAME --role admin "
              f"--data-dir {data_dir}`", file=sys.stderr)
    host = chosen.console_host
    if not _loopback(host):
        print(f"imguard: the console listens on {host}, beyond this host: every employee's chat is one password "
              "away from that network", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"imguard console on https://{shown}:{chosen.console_port}/ reading {data_dir}"
          f"{' and ' + 'the PostgreSQL archive' if archive_settings.archive_dsn else ''}; certificate {cert}",
          flush=True)
    try:
        uvicorn.run(console.app, host=host, port=chosen.console_port, ssl_certfile=str(cert), ssl_keyfile=str(key),
                    log_level="warning", server_header=False, proxy_headers=False, access_log=False)
    finally:
        console.close()
    return EXIT_OK


def _loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
