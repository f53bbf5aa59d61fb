"""Building the running parts from configuration: signatures, policy, inspector, alert log -> Pipeline.

Shared by `imguard run`, `imguard scan`, `imguard rules` and `imguard pcap`, so every command loads
rules and signatures the same way and refuses a broken configuration with the same messages.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import imguard
from imguard.pipeline import Pipeline

PROJECT_ROOT = Path(imguard.__file__).resolve().parent.parent


def bundled(name: str) -> Path:
    """The bundled `rules` or `signatures` folder: the copy an installed wheel carries in imguard/bundled/ (setup.py
    puts it there), else the folder at the top of a checkout."""
    installed = Path(imguard.__file__).resolve().parent / "bundled" / name
    return installed if installed.is_dir() else PROJECT_ROOT / name


BUNDLED_RULES = bundled("rules")
BUNDLED_SIGNATURES = bundled("signatures")


def default_data_dir() -> Path:
    """$IMGUARD_DATA_DIR, else $XDG_DATA_HOME/imguard, else ~/.local/share/imguard."""
    if os.environ.get("IMGUARD_DATA_DIR"):
        return Path(os.environ["IMGUARD_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "imguard"


def ensure_data_dir(path: Path) -> Path:
    """Create the data folder (and its parents) if it is missing, mode 0700 whatever the umask: it holds the CA
    key, the archive of every message, the alerts and the quarantined files. An existing folder keeps the mode
    its owner gave it (the systemd unit's StateDirectoryMode)."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)       # mkdir's mode is filtered by the umask; chmod's is not
    return path


def add_config_arguments(parser: argparse.ArgumentParser, data_dir_holds: str) -> None:
    """--rules, --signatures and --data-dir, the same for every command that loads the configuration;
    `data_dir_holds` says what that command keeps in the data folder."""
    parser.add_argument("--rules", type=Path, default=BUNDLED_RULES, metavar="DIR",
                        help=f"policy rules folder (default: the bundled {BUNDLED_RULES})")
    parser.add_argument("--signatures", type=Path, default=BUNDLED_SIGNATURES, metavar="DIR",
                        help=f"YARA signatures folder (default: the bundled {BUNDLED_SIGNATURES})")
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help=f"{data_dir_holds} (default: {default_data_dir()})")


class ConfigError(Exception):
    """The configuration cannot be used; `errors` are `file:line: message` strings."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class Loaded:
    signatures: object
    policy: object


def load_configuration(rules_dirs: Path | Iterable[Path], signatures_dir: Path, cache_dir: Path | None,
                       signature_settings: object = None) -> Loaded:
    """Load and cross-check signatures and rules (one rules folder or several, in order); raise ConfigError
    listing every problem. `signature_settings` (inspect.SignatureSettings): namespace, missing modules."""
    from imguard.inspect import SignatureError, load_signatures
    from imguard.policy import PolicyError, load_policy

    errors: list[str] = []
    signatures = policy = None
    if not Path(signatures_dir).is_dir():
        errors.append(f"{signatures_dir}: signatures folder does not exist")
    else:
        try:
            signatures = load_signatures(Path(signatures_dir), cache_dir, signature_settings)
        except SignatureError as e:
            errors.extend(e.errors)
    folders = [Path(rules_dirs)] if isinstance(rules_dirs, (str, Path)) else [Path(d) for d in rules_dirs]
    missing = [f"{d}: rules folder does not exist" for d in folders if not d.is_dir()]
    errors.extend(missing)
    if not missing:
        try:
            known = signatures.rule_names if signatures is not None else None
            policy = load_policy(folders, known_yara_rules=known,
                                 hash_list_dirs=getattr(signature_settings, "hash_lists", ""))
        except PolicyError as e:
            errors.extend(e.errors)
    if errors:
        raise ConfigError(errors)
    return Loaded(signatures, policy)


def build_pipeline(rules_dir: Path | Iterable[Path] = BUNDLED_RULES, signatures_dir: Path = BUNDLED_SIGNATURES,
                   data_dir: Path | None = None, limits: object = None, write_alerts: bool = True,
                   quarantine_settings: object = None, sink_settings: object = None,
                   archive_settings: object = None, metrics: object = None,
                   plain_flush_seconds: float = 0.0, signature_settings: object = None,
                   filestore_settings: object = None) -> Pipeline:
    """The inspection-and-policy pipeline on the given configuration. With write_alerts, events go to
    data_dir/alerts.jsonl and the remote sinks the sink settings turn on, records to the archive
    (SQLite in data_dir, or PostgreSQL), and blocked files to data_dir/quarantine.
    plain_flush_seconds lets the local log gather plain events (see AlertLog); alerts are never delayed.
    Raises ConfigError for a broken rules or signatures folder or bad sink settings."""
    from imguard import archive as archive_module
    from imguard.inspect import InspectLimits, Inspector
    from imguard.quarantine import QuarantineSettings, QuarantineStore
    from imguard.sinks import build_sinks, check_settings

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    ensure_data_dir(data_dir)        # before the signature cache creates it with the umask's mode
    loaded = load_configuration(rules_dir, signatures_dir, data_dir / "cache", signature_settings)
    inspector = Inspector(loaded.signatures, limits if limits is not None else InspectLimits())
    alert_log = quarantine = archive = filestore = None
    if write_alerts:
        if sink_settings is not None and (errors := check_settings(sink_settings)):
            raise ConfigError(errors)
        archive = archive_module.open_archive(data_dir, archive_settings)
        alert_log = build_sinks(sink_settings, data_dir, metrics=metrics, plain_flush_seconds=plain_flush_seconds)
        quarantine = QuarantineStore(data_dir / "quarantine", quarantine_settings or QuarantineSettings())
        from imguard.filestore import FileStore, FileStoreSettings
        filestore_settings = filestore_settings or FileStoreSettings()
        if filestore_settings.filestore_enabled:
            filestore = FileStore(data_dir / "files", filestore_settings)
    return Pipeline(inspector=inspector, policy=loaded.policy, alert_log=alert_log, quarantine=quarantine,
                    archive=archive, filestore=filestore)
