"""The inspector: one file in, one FileReport out (true type, hashes, YARA, archive members, polyglots, and the
   findings of the external engines the settings turn on: ClamAV, ICAP).

    inspector = Inspector(load_signatures(Path("signatures")), InspectLimits())
    report = inspector.inspect(data, context, name="invoice.pdf", claimed_mime="application/pdf")

Everything the inspector establishes is a Finding; it never decides. Hostile or broken content gives an
explicit finding (UNSCANNABLE with a reason, LIMIT_HIT, ...) and never an exception: a report without
UNSCANNABLE findings means every byte that was there was looked at.

Thread-safe: the compiled rules are shared (yara-python's match() is thread-safe and releases the GIL),
libmagic cookies are per thread, and nothing else is shared but the hash helper pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yara

from imguard.inspect import archives, cache, clamav, filetype, icap, passwords, pdf, polyglot
from imguard.inspect.limits import InspectLimits
from imguard.inspect.signatures import TYPE_EXTERNALS, Signatures
from imguard.model import (ENCRYPTED, ENGINE_MATCH, LIMIT_HIT, POLYGLOT, REASON_CORRUPT, REASON_ENCRYPTED,
                           REASON_LIMIT, REASON_SCANNER_ERROR, REASON_TIMEOUT, REASON_TOO_LARGE, REASON_UNREADABLE,
                           REASON_UNSUPPORTED, TYPE_MISMATCH, UNSAFE_PATH, UNSCANNABLE, YARA_MATCH, ChatContext,
                           FileReport, Finding)

log = logging.getLogger(__name__)

# Buffers at least this big are hashed on a helper thread while libmagic and YARA run: hashlib and
# yara both release the GIL, so the three digests (~2.9 ms/MB, MD5 alone ~1.6 ms/MB) cost no wall time
# when a core is free (they still cost CPU: see bench/bench_inspect.py, "cpu ratio").
HASH_ASYNC_MIN = 512 * 1024
# Buffers at least this big are typed by libmagic on a helper thread while YARA scans them, when the rules read
# no type external (Inspector.type_blind): below it the scan (~0.1 ms at 4 KB) saves less than the hand-over to
# another thread costs (tens of microseconds idle, milliseconds on a busy machine).
TYPE_BESIDE_MIN = 64 * 1024
_HASH_CHUNK = 1024 * 1024
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_VBA_PROJECT_UTF16 = "_VBA_PROJECT".encode("utf-16-le")
_ENCRYPTED_PACKAGE_UTF16 = "EncryptedPackage".encode("utf-16-le")   # a password-protected OOXML file


DIGESTS = ("sha256", "sha1", "md5")      # the FileReport fields they fill


def _digests(data: bytes | memoryview, names: tuple[str, ...]) -> dict[str, str]:
    return {name: hashlib.new(name, data).hexdigest() for name in names}


def _set_digests(report: FileReport, digests: dict[str, str]) -> None:
    for name, value in digests.items():
        setattr(report, name, value)


def external_engines(limits: InspectLimits) -> tuple[Any, ...]:
    """The external engines the settings turn on: clamd (`clamd_address`) and ICAP (`icap_url`). Each has `name`,
    `max_size`, `describe()`, `scan(data, name) -> detection names` and `check(data, name) -> (detection names,
    what it answered in words)`, raising its ClamdError / IcapError."""
    found = (clamav.Clamd.from_settings(limits), icap.Icap.from_settings(limits))
    return tuple(engine for engine in found if engine is not None)


class _Walk:
    """State of one inspect() call: the shared budget and the conversation."""

    def __init__(self, limits: InspectLimits, context: ChatContext) -> None:
        self.budget = archives.Budget(limits.max_archive_members, limits.max_expanded_bytes,
                                      limits.max_zip_entries, limits.max_pdf_streams)
        self.context = context
        self.recipient = ",".join(context.recipients)
        self.passwords: tuple = ()      # passwords.Candidate: tried on encrypted zips
        self.sha256 = ""                # the top-level buffer's SHA-256 when the caller has it (the cache's key)


class Inspector:
    def __init__(self, signatures: Signatures, limits: InspectLimits = InspectLimits(), *,
                 reference: bool = False) -> None:
        """`reference=True`: libmagic through python-magic, the reference path that the direct calls of the
        default path are tested against (tests/test_inspect_fastpath.py)."""
        self.signatures = signatures
        self.limits = limits
        self._digests = tuple(name.strip().lower() for name in limits.digests.split(",") if name.strip())
        unknown = [name for name in self._digests if name not in DIGESTS]
        if unknown:
            raise ValueError(f"digests: unknown {', '.join(unknown)}; choose from {', '.join(DIGESTS)}")
        self._magic = filetype.MagicPool(reference=reference)
        # Rules that name neither `mime` nor `filetype` match the same whatever libmagic says: their scan need not
        # wait for it, and libmagic runs on a helper thread beside the hashes and the scan (issue 21). The
        # reference path keeps the order type, claims, scan.
        self.type_blind = not reference and not signatures.externals_used & set(TYPE_EXTERNALS)
        self._hash_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.engines = external_engines(limits)      # clamd, ICAP: each scans the whole file beside YARA
        self._engine_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="imguard-engine") \
            if self.engines else None
        self.cache = cache.for_inspector(self)      # verdict cache (inspect/cache.py); None when the limits turn it off
        self.zip_passwords = passwords.configured(getattr(limits, "zip_passwords", ""))

    # --- entry point ------------------------------------------------------------------------------

    def inspect(self, content: bytes | bytearray | memoryview | Path | str, context: ChatContext = ChatContext(),
                name: str = "", claimed_mime: str = "", extra_passwords: tuple = ()) -> FileReport:
        """Inspect one file (bytes in memory, or a path read here) and every member inside it; bytes seen before
        are answered from the verdict cache (inspect/cache.py: one inspection per key, a copy per caller)."""
        if self.cache is not None and not extra_passwords and isinstance(content, (bytes, bytearray, memoryview)):
            return self.cache.inspect(self, content, context if context is not None else ChatContext(), name,
                                      claimed_mime)
        return self.inspect_uncached(content, context, name, claimed_mime, extra_passwords)

    def inspect_uncached(self, content: bytes | bytearray | memoryview | Path | str,
                         context: ChatContext = ChatContext(), name: str = "", claimed_mime: str = "",
                         extra_passwords: tuple = (), sha256: str = "") -> FileReport:
        """inspect() without the cache. Encrypted zips are tried with the zip_passwords setting, then with
        `extra_passwords` (the conversation's, passwords.Candidate: the pipeline's second look). `sha256`: the
        hex SHA-256 of the bytes `content`, when the caller computed it already (the verdict cache's key)."""
        walk = _Walk(self.limits, context if context is not None else ChatContext())
        walk.sha256 = sha256 if isinstance(content, (bytes, bytearray, memoryview)) else ""
        walk.passwords = (self.zip_passwords + tuple(extra_passwords))[:getattr(self.limits, "zip_password_tries", 64)]
        if isinstance(content, (str, os.PathLike)):
            path = Path(content)
            name = name or path.name
            data, report = self._read_path(path, name, claimed_mime)
            if report is not None:
                return report
        elif isinstance(content, (bytearray, memoryview)):
            data = bytes(content)
        else:
            data = content
        scans = self._start_engines(data, name)
        try:
            report = self._inspect(data, name, name, 0, claimed_mime, walk)
        except Exception as exc:      # a bug of ours must not lose the file: report it unscanned, loudly
            log.exception("inspection of %r failed", name)
            report = FileReport(name=name, path=name, size=len(data), extension=filetype.extension_of(name),
                                claimed_mime=claimed_mime, findings=[Finding(
                                    UNSCANNABLE, f"internal inspection error: {type(exc).__name__}: {exc}",
                                    data={"reason": REASON_SCANNER_ERROR})])
        self._engine_findings(report, scans)
        return report

    # --- external engines (ClamAV, ICAP) ----------------------------------------------------------

    def _start_engines(self, data: bytes, name: str) -> list[tuple[Any, Future | Finding]]:
        """Each engine gets the whole file once (they unpack archives themselves), on its own thread, while
        YARA walks it here; a file over an engine's size limit is unscannable for that engine."""
        scans: list[tuple[Any, Future | Finding]] = []
        for engine in self.engines:
            if len(data) > engine.max_size:
                scans.append((engine, Finding(UNSCANNABLE, f"{engine.name}: {len(data)} bytes is over its size limit "
                                              f"({engine.max_size}): not scanned by {engine.describe()}", "",
                                              {"reason": REASON_TOO_LARGE, "engine": engine.name})))
            else:
                scans.append((engine, self._engine_pool.submit(engine.check, data, name)))
        return scans

    def _engine_findings(self, report: FileReport, scans: list[tuple[Any, Future | Finding]]) -> None:
        for engine, scan in scans:
            if isinstance(scan, Finding):
                report.findings.append(scan)
                report.engine_verdicts.append({"engine": engine.name, "verdict": UNSCANNABLE, "detail": scan.detail})
                continue
            try:
                names, words = scan.result()
            except (clamav.ClamdError, icap.IcapError) as exc:
                reason, detail = exc.reason, exc.detail
            except Exception as exc:      # a bug of ours: the file stays unscanned, loudly
                log.exception("%s scan of %r failed", engine.name, report.name)
                reason, detail = REASON_SCANNER_ERROR, f"{type(exc).__name__}: {exc}"
            else:
                report.findings.extend(Finding(ENGINE_MATCH, f"{engine.name} detection {signature} "
                                               f"({engine.describe()})", "",
                                               {"engine": engine.name, "signature": signature}) for signature in names)
                report.engine_verdicts.append({"engine": engine.name, "verdict": "detected" if names else "clean",
                                               "detail": words})
                continue
            log.warning("%s gave no verdict on %r: %s", engine.name, report.name, detail)
            report.findings.append(Finding(UNSCANNABLE, f"{engine.name}: {detail}", "",
                                           {"reason": reason, "engine": engine.name}))
            report.engine_verdicts.append({"engine": engine.name, "verdict": UNSCANNABLE,
                                           "detail": f"{engine.name}: no verdict ({reason}): {detail}"})

    # --- reading ----------------------------------------------------------------------------------

    def _read_path(self, path: Path, name: str, claimed_mime: str) -> tuple[bytes, FileReport | None]:
        """The file's bytes, or a finished report when it cannot or must not be read whole."""
        limits = self.limits
        report = FileReport(name=name, path=name, size=0, extension=filetype.extension_of(name),
                            claimed_mime=claimed_mime)
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise IsADirectoryError(0, "not a regular file") if stat.S_ISDIR(info.st_mode) \
                    else OSError(0, "not a regular file")
            with open(path, "rb") as handle:
                report.size = info.st_size
                if info.st_size <= limits.max_file_size:
                    data = handle.read(limits.max_file_size + 1)
                    if len(data) <= limits.max_file_size:
                        return data, None
                    report.size = max(report.size, len(data))     # it grew while we looked
                    handle.seek(0)
                head = handle.read(limits.magic_bytes)
                self._identify(report, head)
                self._check_claims(report, "")
                if report.size <= limits.max_hash_size:
                    hashes = [hashlib.new(name) for name in self._digests]
                    handle.seek(0)
                    while chunk := handle.read(_HASH_CHUNK):
                        for h in hashes:
                            h.update(chunk)
                    _set_digests(report, {h.name: h.hexdigest() for h in hashes})
                self._too_large(report, "")
                return b"", report
        except OSError as exc:
            report.findings.append(Finding(UNSCANNABLE, f"cannot read the file: {exc.strerror or exc}",
                                           data={"reason": REASON_UNREADABLE}))
            return b"", report

    # --- one buffer -------------------------------------------------------------------------------

    def _inspect(self, data: bytes, name: str, path: str, depth: int, claimed_mime: str, walk: _Walk,
                 partial: bool = False) -> FileReport:
        limits = self.limits
        report = FileReport(name=name, path=path, size=len(data), extension=filetype.extension_of(name),
                            claimed_mime=claimed_mime, depth=depth)
        where = path if depth else ""
        if len(data) > limits.max_file_size:
            self._identify(report, data[:limits.magic_bytes])
            self._check_claims(report, where)
            if len(data) <= limits.max_hash_size:
                _set_digests(report, self._hash(data, depth, walk))
            self._too_large(report, where)
            return report

        head = data[:limits.magic_bytes]
        if self.type_blind and len(data) >= TYPE_BESIDE_MIN:
            self._inspect_beside(report, data, head, where, walk, partial)
            return self._unpacked_container(report, where)
        # Off the critical path, on a helper thread, for big buffers: the hashes and libmagic's
        # description (only the MIME type is needed before the YARA scan, for its externals).
        # hashlib, libmagic (ctypes) and yara all release the GIL, so this runs on the other core.
        # Small buffers are hashed here (it costs less than the hand-over), and their type is one libmagic call
        # (0.2-3 ms of CPU) when its description fixes the MIME type (filetype.MagicPool.identify, issue 21).
        hash_there = len(data) >= HASH_ASYNC_MIN and not partial
        helper: Future | None = self._pool().submit(self._background, data, head, depth, walk) if hash_there else None
        if not partial and not hash_there:
            _set_digests(report, self._hash(data, depth, walk))
        try:
            if helper is None:
                report.mime, report.description = self._magic.identify(head)
            else:
                report.mime = self._magic.mime(head)
            report.family = filetype.refine_family(filetype.family_of(report.mime), report.mime, head)
            self._check_claims(report, where)
            report.findings += self._scan(report, data, where, walk)
            self._encrypted_container(report, data, where)
            if not partial:
                self._polyglots(report, data, where, walk)
                self._members(report, data, where, walk)
        finally:
            if helper is not None:
                digests, report.description = helper.result()
                _set_digests(report, digests)
        return self._unpacked_container(report, where)

    def _inspect_beside(self, report: FileReport, data: bytes, head: bytes, where: str, walk: _Walk,
                        partial: bool) -> None:
        """_inspect's steps for rules blind to the type: libmagic on a helper thread while the YARA scan (and the
        hashes: here when small, on another helper when big) runs here; the same report as the reference order."""
        pool = self._pool()
        typed = pool.submit(self._magic.identify, head)
        big = len(data) >= HASH_ASYNC_MIN and not partial
        hashed = pool.submit(self._hash, data, report.depth, walk) if big else None
        try:
            if not partial and hashed is None:
                _set_digests(report, self._hash(data, report.depth, walk))
            try:
                scanned = self._scan(report, data, where, walk)     # mime "" and filetype "": no rule reads them
            finally:
                report.mime, report.description = typed.result()
            report.family = filetype.refine_family(filetype.family_of(report.mime), report.mime, head)
            self._check_claims(report, where)
            report.findings += scanned
            self._encrypted_container(report, data, where)
            if not partial:
                self._polyglots(report, data, where, walk)
                self._members(report, data, where, walk)
        finally:
            if hashed is not None:
                _set_digests(report, hashed.result())

    def _unpacked_container(self, report: FileReport, where: str) -> FileReport:
        if report.family == filetype.OTHER and (fmt := filetype.container_name(report.mime, report.description)):
            # libmagic names a container (a filesystem, an installer, an archive) that no MIME type here maps.
            report.family = filetype.ARCHIVE
            report.findings.append(Finding(
                UNSCANNABLE, f"{fmt} ({report.description}) is not unpacked: its content was not inspected", where,
                {"reason": REASON_UNSUPPORTED, "format": fmt}))
        return report

    def _background(self, data: bytes, head: bytes, depth: int, walk: _Walk) -> tuple[dict[str, str], str]:
        return self._hash(data, depth, walk), self._magic.description(head)

    def _hash(self, data: bytes, depth: int, walk: _Walk) -> dict[str, str]:
        """The digests of `data`; the top level's SHA-256 is not computed twice when the caller had it."""
        if depth == 0 and walk.sha256 and "sha256" in self._digests:
            return dict(_digests(data, tuple(name for name in self._digests if name != "sha256")), sha256=walk.sha256)
        return _digests(data, self._digests)

    def _pool(self) -> ThreadPoolExecutor:
        if self._hash_pool is None:
            with self._pool_lock:
                if self._hash_pool is None:
                    self._hash_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="imguard-hash")
        return self._hash_pool

    def close(self) -> None:
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
        if self._engine_pool is not None:
            self._engine_pool.shutdown(wait=True)

    def _identify(self, report: FileReport, head: bytes) -> None:
        report.mime, report.description = self._magic.identify(head)
        report.family = filetype.refine_family(filetype.family_of(report.mime), report.mime, head)

    def _too_large(self, report: FileReport, where: str) -> None:
        value = self.limits.max_file_size
        report.findings.append(Finding(LIMIT_HIT, f"{report.size} bytes is over max_file_size ({value})", where,
                                       {"setting": "max_file_size", "value": value}))
        report.findings.append(Finding(UNSCANNABLE, "too large to scan", where, {"reason": REASON_TOO_LARGE}))

    def _check_claims(self, report: FileReport, where: str) -> None:
        reasons = filetype.mismatch(report.extension, report.claimed_mime, report.family)
        if reasons:
            report.findings.append(Finding(
                TYPE_MISMATCH, f"content is {report.family} ({report.mime}) but {'; '.join(reasons)}", where,
                {"claimed_extension": report.extension, "claimed_mime": report.claimed_mime,
                 "detected_mime": report.mime, "detected_family": report.family}))

    # --- YARA -------------------------------------------------------------------------------------

    def _scan(self, report: FileReport, data: bytes, where: str, walk: _Walk) -> list[Finding]:
        """The findings of the YARA scan of `data`."""
        context = walk.context
        externals: dict[str, Any] = {
            "filename": report.name.replace("\\", "/").rsplit("/", 1)[-1],
            "filepath": report.path,
            "extension": f".{report.extension}" if report.extension else "",
            "filetype": filetype.loki_filetype(report.mime, report.family),
            "owner": context.sender,
            "mime": report.mime,
            "protocol": context.protocol,
            "direction": context.direction,
            "sender": context.sender,
            "recipient": walk.recipient,
            "archive_depth": report.depth,
        }
        warnings: list[Any] = []
        found: list[Finding] = []

        def on_warning(kind: int, detail: Any) -> int:     # called (GIL held) only when YARA warns
            warnings.append((kind, detail))
            return yara.CALLBACK_CONTINUE

        try:
            matches = self.signatures.rules.match(data=data, externals=externals, timeout=self.limits.scan_timeout,
                                                  warnings_callback=on_warning)
        except yara.TimeoutError:
            found.append(Finding(UNSCANNABLE, f"YARA scan ran out of time ({self.limits.scan_timeout} s)", where,
                                 {"reason": REASON_TIMEOUT}))
            return found
        except yara.Error as exc:
            found.append(Finding(UNSCANNABLE, f"YARA scan failed: {exc}", where, {"reason": REASON_SCANNER_ERROR}))
            return found
        for kind, detail in warnings:
            if kind == yara.CALLBACK_TOO_MANY_MATCHES:
                # YARA stopped recording this string: conditions that count it may be wrong.
                found.append(Finding(
                    UNSCANNABLE, f"YARA string {detail.string} of {detail.namespace}.{detail.rule} matched too often; "
                    "results may be incomplete", where,
                    {"reason": REASON_SCANNER_ERROR, "warning": "too_many_matches", "rule": detail.rule,
                     "namespace": detail.namespace, "string": detail.string}))
        for match in matches:
            found.append(Finding(
                YARA_MATCH, f"YARA rule {match.namespace}.{match.rule} matched", where,
                {"rule": match.rule, "namespace": match.namespace, "tags": list(match.tags),
                 "meta": dict(match.meta), "strings": sorted({s.identifier for s in match.strings})}))
        return found

    def _encrypted_container(self, report: FileReport, data: bytes, where: str) -> None:
        """A password-protected office document (an OLE file holding an EncryptedPackage stream) hides
        its content, macros included: it cannot be inspected."""
        if report.mime == "application/encrypted" or (
                data.startswith(_OLE_MAGIC) and _ENCRYPTED_PACKAGE_UTF16 in data):
            report.encrypted = True
            report.findings.append(Finding(ENCRYPTED, "password-protected document: its content is encrypted", where))
            report.findings.append(Finding(UNSCANNABLE, "encrypted content cannot be inspected", where,
                                           {"reason": REASON_ENCRYPTED}))

    # --- appended data ----------------------------------------------------------------------------

    def _polyglots(self, report: FileReport, data: bytes, where: str, walk: _Walk) -> None:
        try:
            found = polyglot.appended_data(data, zip_prefix=archives.archive_kind(data, report.mime) is None)
            if report.family not in (filetype.ARCHIVE, filetype.OFFICE, filetype.OFFICE_MACRO):
                found += [(f"{fmt} self-extractor", offset) for fmt, offset in polyglot.embedded_archives(data)
                          if all(offset != other for _, other in found)]
        except (IndexError, ValueError):
            return
        for fmt, offset in found:
            trailing = data[offset:]
            trailing_mime = self._magic.mime(trailing[:self.limits.magic_bytes])
            report.findings.append(Finding(
                POLYGLOT,
                f"{len(trailing)} bytes of {trailing_mime} after the end of the {fmt} data at offset {offset}",
                where, {"format": fmt, "trailing_offset": offset, "trailing_bytes": len(trailing),
                        "trailing_type": trailing_mime}))
            member_name = f"<appended@{offset}>"
            if not self._may_open(report, where, walk):
                continue
            walk.budget.members_left -= 1
            report.members.append(self._inspect(trailing, member_name, f"{report.path}!{member_name}",
                                                report.depth + 1, "", walk))

    def _may_open(self, report: FileReport, where: str, walk: _Walk) -> bool:
        """Whether members of this report may be inspected; records the limit when not."""
        if report.depth >= self.limits.max_archive_depth:
            self._limit(report, where, "max_archive_depth", self.limits.max_archive_depth,
                        f"nested deeper than max_archive_depth ({self.limits.max_archive_depth}): not opened")
            return False
        if walk.budget.members_left <= 0:
            self._limit(report, where, "max_archive_members", self.limits.max_archive_members,
                        "member budget of the file used up: not opened")
            return False
        return True

    def _limit(self, report: FileReport, where: str, setting: str, value: int, detail: str) -> None:
        if any(f.kind == LIMIT_HIT and f.data.get("setting") == setting for f in report.findings):
            return
        report.findings.append(Finding(LIMIT_HIT, detail, where, {"setting": setting, "value": value}))
        if not any(f.kind == UNSCANNABLE and f.data.get("reason") == REASON_LIMIT for f in report.findings):
            report.findings.append(Finding(UNSCANNABLE, "not fully inspected: a limit was reached", where,
                                           {"reason": REASON_LIMIT}))

    # --- archives ---------------------------------------------------------------------------------

    def _members(self, report: FileReport, data: bytes, where: str, walk: _Walk) -> None:
        kind = archives.archive_kind(data, report.mime)
        image = archives.disk_image(data)     # whatever the head looks like: VHD and DMG are known by their end
        if image:
            # What the receiver mounts, we cannot see: a disk image or filesystem we do not open.
            report.family = filetype.ARCHIVE
            report.findings.append(Finding(
                UNSCANNABLE, f"{image} image: not opened, its files were not inspected", where,
                {"reason": REASON_UNSUPPORTED, "format": image}))
        if kind == archives.ISO9660 and report.family != filetype.ARCHIVE:
            report.mime, report.family = "application/x-iso9660-image", filetype.ARCHIVE
            report.findings = [f for f in report.findings if f.kind != TYPE_MISMATCH]
            self._check_claims(report, where)
        iso_view = kind not in (None, archives.ISO9660) and data[0x8001:0x8006] == b"CD001"
        if kind is None:
            if report.family == filetype.ARCHIVE and not image:   # chm, wim, stuffit...: the members stay unseen
                fmt = filetype.container_name(report.mime, "")
                report.findings.append(Finding(
                    UNSCANNABLE, f"{fmt} ({report.mime}) is not unpacked: its members were not inspected",
                    where, {"reason": REASON_UNSUPPORTED, "format": fmt}))
            elif report.family == filetype.PDF:
                self._pdf_streams(report, data, where, walk)
        elif self._may_open(report, where, walk):
            self._walk(report, data, where, walk, kind)
            if iso_view:
                # Also an ISO 9660 image (its descriptors sit at 32 KiB): what mounting it shows is walked too.
                report.findings.append(Finding(
                    POLYGLOT, f"{kind} data that is also an ISO 9660 image", where,
                    {"format": kind, "trailing_offset": 0x8000, "trailing_bytes": len(data) - 0x8000,
                     "trailing_type": "application/x-iso9660-image"}))
                self._walk(report, data, where, walk, archives.ISO9660)
        self._office_macro(report, data)

    def _walk(self, report: FileReport, data: bytes, where: str, walk: _Walk, kind: str) -> None:
        """Inspect the members of `data` as a `kind` container, and record what the container says."""
        limits = self.limits
        container = archives.Container()
        if kind == archives.ZIP:
            if not data.startswith(b"PK"):
                start = data.find(b"PK\x03\x04")
                report.findings.append(Finding(
                    POLYGLOT, f"a zip at offset {start} behind {start} bytes of {report.mime}", where,
                    {"format": "zip_prefix", "trailing_offset": start, "trailing_bytes": len(data) - start,
                     "trailing_type": "application/zip"}))
            members = archives.walk_zip(data, walk.budget, limits.max_file_size, limits.max_compression_ratio,
                                        container, walk.passwords)
        elif kind == archives.TAR:
            members = archives.walk_tar(data, walk.budget, limits.max_file_size, container)
        elif kind in archives.STREAMS:
            members = archives.walk_stream(data, kind, report.name, walk.budget, limits.max_file_size,
                                           limits.max_compression_ratio, container)
        else:
            members = archives.walk_libarchive(data, kind, walk.budget, limits.max_file_size,
                                               limits.max_compression_ratio, container, walk.passwords, limits)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except Exception as exc:    # an exotic library error on hostile input must not lose the report
                container.corrupt.append(f"{kind} walk failed: {type(exc).__name__}: {exc}")
                break
            report.members.append(self._member_report(report, member, walk))
        for detail in container.corrupt:
            report.findings.append(Finding(UNSCANNABLE, detail, where, {"reason": REASON_CORRUPT, "format": kind}))
        for detail in container.unsupported:
            report.findings.append(Finding(UNSCANNABLE, detail, where, {"reason": REASON_UNSUPPORTED, "format": kind}))
        if container.differences:
            # Two readers see two different archives: which one the receiver's tool sees is not ours to know.
            shown = "; ".join(container.differences[:5]) + ("; ..." if len(container.differences) > 5 else "")
            report.findings.append(Finding(
                UNSCANNABLE, f"{kind}: the central directory and the local headers disagree: {shown}", where,
                {"reason": REASON_CORRUPT, "format": kind, "differences": container.differences[:50]}))
        for setting, value, detail in container.limits:
            self._limit(report, where, setting, getattr(limits, setting, value), f"{setting}: {detail}")
        for member_name, detail in container.unsafe:
            report.findings.append(Finding(UNSAFE_PATH, f"member name {member_name!r}: {detail}",
                                           f"{report.path}!{member_name}", {"member": member_name}))

    def _pdf_streams(self, report: FileReport, data: bytes, where: str, walk: _Walk) -> None:
        """Embedded files of a PDF as members, and its decoded streams as one derived member."""
        if not self._may_open(report, where, walk):
            return
        limits = self.limits
        decoded = pdf.decode_streams(data, walk.budget, limits.max_file_size, limits.max_compression_ratio)
        for setting in dict.fromkeys(decoded.limits):
            self._limit(report, where, setting, getattr(limits, setting), f"{setting}: a PDF stream was not decoded")
        if decoded.undecoded:
            shown = "; ".join(decoded.undecoded[:5]) + ("; ..." if len(decoded.undecoded) > 5 else "")
            report.findings.append(Finding(UNSCANNABLE, f"PDF streams a reader decodes were not decoded: {shown}",
                                           where, {"reason": REASON_UNSUPPORTED, "format": "pdf"}))
        derived = [(f"<embedded@{offset}>", content, False) for offset, content in decoded.embedded]
        if decoded.view is not None:
            # Not a file of its own: no hashes, no walking (partial=True); YARA and the type only.
            derived.append(("<pdf-decoded>", decoded.view, True))
        for name, content, view in derived:
            if walk.budget.members_left <= 0:
                self._limit(report, where, "max_archive_members", limits.max_archive_members,
                            "member budget of the file used up: PDF streams not inspected")
                return
            walk.budget.members_left -= 1
            report.members.append(self._inspect(content, name, f"{report.path}!{name}", report.depth + 1, "", walk,
                                                partial=view))

    def _member_report(self, parent: FileReport, member: archives.Member, walk: _Walk) -> FileReport:
        path = f"{parent.path}!{member.name}"
        depth = parent.depth + 1
        if member.data is None:
            report = FileReport(name=member.name, path=path, size=member.size,
                                extension=filetype.extension_of(member.name), depth=depth, encrypted=member.encrypted)
        else:
            report = self._inspect(member.data, member.name, path, depth, "", walk, partial=member.partial)
            if member.partial:
                report.size = max(report.size, member.size)
        if member.encrypted and member.opened_with is not None:    # never the password: where it came from
            report.findings.append(Finding(ENCRYPTED, f"encrypted archive member, opened with the password from "
                                                      f"{member.opened_with.describe()}", path,
                                           member.opened_with.facts()))
        elif member.encrypted:
            report.findings.append(Finding(ENCRYPTED, "encrypted archive member", path, {}))
        if member.limit is not None:
            setting, _ = member.limit
            value = getattr(self.limits, setting)
            report.findings.append(Finding(LIMIT_HIT, f"{setting} ({value}) reached: {member.problem[1]}", path,
                                           {"setting": setting, "value": value}))
        if member.problem is not None:
            reason, detail = member.problem
            report.findings.append(Finding(UNSCANNABLE, detail, path, {"reason": reason}))
        return report

    def _office_macro(self, report: FileReport, data: bytes) -> None:
        """An office document that carries a VBA project is of the office_macro family."""
        if report.family not in (filetype.OFFICE, filetype.ARCHIVE):
            return
        names = {m.name.replace("\\", "/").rsplit("/", 1)[-1].lower() for m in report.members}
        if "vbaproject.bin" in names and (report.family == filetype.OFFICE or "[content_types].xml" in names):
            report.family = filetype.OFFICE_MACRO
        elif report.family == filetype.OFFICE and data.startswith(_OLE_MAGIC) and _VBA_PROJECT_UTF16 in data:
            report.family = filetype.OFFICE_MACRO
