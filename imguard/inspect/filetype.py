"""True file type: libmagic's MIME type and description, reduced to a *family* that policy speaks,
and the comparison of that true type with what the sender claimed (name extension, declared MIME).

libmagic runs on the first `magic_bytes` of the content only (8 KiB gave the same answer as the whole
buffer on every file of the research corpus), with one libmagic cookie per thread: cookies are not
thread-safe, and python-magic's per-instance lock would serialise the gateway's workers. Where libmagic's
description fixes its MIME type (plain text, "data", the common binary formats), one call gives both
(`mime_of_description`, `MagicPool.identify`).
"""

from __future__ import annotations

import ctypes
import re
import threading
from typing import Any

import magic

# Type families. One word per kind of content that policy distinguishes.
EXECUTABLE = "executable"       # PE (exe, dll, scr, sys), ELF, Mach-O (incl. fat), MSI, Java class
ARCHIVE = "archive"             # zip, jar, apk, tar, gzip, bzip2, xz, 7z, rar, cab, iso, ...
OFFICE = "office"               # OOXML, OLE (doc, xls, ppt), OpenDocument, RTF
OFFICE_MACRO = "office_macro"   # an office document that carries a VBA project (vbaProject.bin / _VBA_PROJECT)
PDF = "pdf"
SCRIPT = "script"               # shell, batch, JavaScript, VBScript, PowerShell, HTA, LNK, Python, Perl, ...
IMAGE = "image"
AUDIO = "audio"
VIDEO = "video"
TEXT = "text"                   # plain text, HTML, XML, JSON, CSV, source code that is not a script
EMPTY = "empty"                 # zero bytes
OTHER = "other"                 # anything else, including data libmagic does not recognise
FAMILIES = (EXECUTABLE, ARCHIVE, OFFICE, OFFICE_MACRO, PDF, SCRIPT, IMAGE, AUDIO, VIDEO, TEXT, EMPTY, OTHER)

_EXACT_MIME = {
    # executables
    "application/x-dosexec": EXECUTABLE, "application/x-executable": EXECUTABLE,
    "application/x-sharedlib": EXECUTABLE, "application/x-pie-executable": EXECUTABLE,
    "application/x-mach-binary": EXECUTABLE, "application/x-msdownload": EXECUTABLE,
    "application/vnd.microsoft.portable-executable": EXECUTABLE, "application/x-msi": EXECUTABLE,
    "application/x-java-applet": EXECUTABLE, "application/x-object": EXECUTABLE,
    "application/x-elf": EXECUTABLE, "application/x-ms-dos-executable": EXECUTABLE,
    # archives
    "application/zip": ARCHIVE, "application/x-zip-compressed": ARCHIVE, "application/java-archive": ARCHIVE,
    "application/x-tar": ARCHIVE, "application/gzip": ARCHIVE, "application/x-gzip": ARCHIVE,
    "application/x-bzip2": ARCHIVE, "application/x-xz": ARCHIVE, "application/x-lzma": ARCHIVE,
    "application/x-7z-compressed": ARCHIVE, "application/x-rar": ARCHIVE, "application/vnd.rar": ARCHIVE,
    "application/x-rar-compressed": ARCHIVE, "application/vnd.ms-cab-compressed": ARCHIVE,
    "application/x-iso9660-image": ARCHIVE, "application/x-cpio": ARCHIVE, "application/x-archive": ARCHIVE,
    "application/zstd": ARCHIVE, "application/x-lzip": ARCHIVE, "application/x-compress": ARCHIVE,
    "application/vnd.android.package-archive": ARCHIVE, "application/x-arj": ARCHIVE,
    "application/x-lz4": ARCHIVE, "application/x-ace-compressed": ARCHIVE,
    "application/vnd.debian.binary-package": ARCHIVE, "application/x-rpm": ARCHIVE, "application/x-xar": ARCHIVE,
    "application/x-lzh-compressed": ARCHIVE, "application/x-lha": ARCHIVE, "application/x-lzh": ARCHIVE,
    "application/zlib": ARCHIVE, "application/x-ms-wim": ARCHIVE, "application/vnd.ms-htmlhelp": ARCHIVE,
    "application/x-chm": ARCHIVE, "application/x-apple-diskimage": ARCHIVE, "application/x-stuffit": ARCHIVE,
    "application/x-stuffitx": ARCHIVE, "application/x-zoo": ARCHIVE, "application/x-alz": ARCHIVE,
    "application/x-zstd": ARCHIVE, "application/x-lzop": ARCHIVE, "application/x-lrzip": ARCHIVE,
    "application/x-qemu-disk": ARCHIVE, "application/x-virtualbox-vdi": ARCHIVE,
    "application/x-virtualbox-vhd": ARCHIVE, "application/x-virtualbox-vmdk": ARCHIVE,
    "application/x-xz-compressed-tar": ARCHIVE, "application/x-compressed-tar": ARCHIVE,
    # office
    "application/msword": OFFICE, "application/vnd.ms-excel": OFFICE, "application/vnd.ms-powerpoint": OFFICE,
    "application/x-ole-storage": OFFICE, "application/CDFV2": OFFICE, "application/vnd.ms-office": OFFICE,
    "application/rtf": OFFICE, "text/rtf": OFFICE, "application/vnd.visio": OFFICE,
    "application/vnd.ms-outlook": OFFICE,
    "application/pdf": PDF,
    # scripts
    "text/x-shellscript": SCRIPT, "application/x-sh": SCRIPT, "text/x-msdos-batch": SCRIPT,
    "application/x-bat": SCRIPT, "text/javascript": SCRIPT, "application/javascript": SCRIPT,
    "application/x-javascript": SCRIPT, "text/vbscript": SCRIPT, "text/x-vbscript": SCRIPT,
    "application/x-ms-shortcut": SCRIPT, "application/hta": SCRIPT, "text/x-powershell": SCRIPT,
    "text/x-script.python": SCRIPT, "text/x-python": SCRIPT, "text/x-perl": SCRIPT, "text/x-ruby": SCRIPT,
    "text/x-php": SCRIPT, "application/x-powershell": SCRIPT, "text/x-tcl": SCRIPT, "text/x-lua": SCRIPT,
    "text/x-awk": SCRIPT, "application/x-shellscript": SCRIPT,
    # text-like application types
    "application/json": TEXT, "application/xml": TEXT, "application/x-ndjson": TEXT,
    "application/csv": TEXT, "application/x-subrip": TEXT, "message/rfc822": TEXT,
    "application/x-empty": EMPTY, "inode/x-empty": EMPTY,
}

_PREFIX_MIME = (
    ("application/vnd.ms-word.", OFFICE_MACRO), ("application/vnd.ms-excel.sheet.macroenabled", OFFICE_MACRO),
    ("application/vnd.ms-powerpoint.presentation.macroenabled", OFFICE_MACRO),
    ("application/vnd.openxmlformats-officedocument.", OFFICE), ("application/vnd.oasis.opendocument.", OFFICE),
    ("application/vnd.ms-", OFFICE),
    ("image/", IMAGE), ("audio/", AUDIO), ("video/", VIDEO), ("text/", TEXT),
)


def family_of(mime: str) -> str:
    """The family of a MIME type (true or claimed); OTHER when it says nothing useful."""
    mime = mime.split(";", 1)[0].strip()
    if not mime:
        return OTHER
    exact = _EXACT_MIME.get(mime) or _EXACT_MIME.get(mime.lower())
    if exact:
        return exact
    low = mime.lower()
    for prefix, family in _PREFIX_MIME:
        if low.startswith(prefix):
            return family
    if low.endswith("+xml") or low.endswith("+json"):
        return TEXT
    return OTHER


# libmagic descriptions of containers: what a file whose MIME type says nothing (application/octet-stream)
# may still be. Such a file is not opened, so it is unscannable, under the name libmagic gives it.
_CONTAINER_WORDS = re.compile(r"\b(archive|compressed data|file ?system|disk image|boot sector|installer|package|"
                              r"cabinet|squashfs|cramfs|romfs|volume)\b", re.IGNORECASE)


_CONTAINER_NAMES = {
    "application/vnd.ms-htmlhelp": "CHM", "application/x-chm": "CHM", "application/x-ms-wim": "WIM",
    "application/x-apple-diskimage": "DMG", "application/x-iso9660-image": "ISO 9660",
    "application/vnd.debian.binary-package": "deb", "application/x-rpm": "RPM", "application/x-archive": "ar",
    "application/vnd.ms-cab-compressed": "CAB", "application/x-7z-compressed": "7z", "application/vnd.rar": "RAR",
    "application/x-rar": "RAR", "application/x-rar-compressed": "RAR", "application/x-lzh-compressed": "LHA",
    "application/x-qemu-disk": "QCOW", "application/x-virtualbox-vdi": "VDI", "application/x-virtualbox-vhd": "VHD",
    "application/x-virtualbox-vmdk": "VMDK",
}


def container_name(mime: str, description: str) -> str:
    """A short name for a container format, from its MIME type or (when that says nothing) libmagic's
    description; "" when neither names one."""
    mime = mime.split(";", 1)[0].strip().lower()
    if mime in _CONTAINER_NAMES:
        return _CONTAINER_NAMES[mime]
    if mime and family_of(mime) == ARCHIVE:
        return mime.rsplit("/", 1)[-1].removeprefix("x-").removeprefix("vnd.")
    if description and _CONTAINER_WORDS.search(description):
        return description.split(",", 1)[0].strip()[:80]
    return ""


def sniff_family(head: bytes) -> str:
    """A family from magic bytes, for the formats that matter most when libmagic only says "data"
    (a bare ELF or PE header without the fields libmagic checks)."""
    if head[:4] == b"\x7fELF":
        return EXECUTABLE
    if head[:4] in (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe"):
        return EXECUTABLE
    if head[:2] == b"MZ" and len(head) >= 0x40:
        pe = int.from_bytes(head[0x3C:0x40], "little")
        if head[pe:pe + 4] == b"PE\0\0":
            return EXECUTABLE
    return ""


def refine_family(family: str, mime: str, head: bytes) -> str:
    """Content cues libmagic does not turn into a MIME type: an HTML Application is a script."""
    if family == OTHER:
        return sniff_family(head) or OTHER
    if family == TEXT and mime == "text/html" and b"<hta:application" in head.lower():
        return SCRIPT
    return family


# Extensions whose claimed type we can check, and the families each is allowed to be.
_TEXT_OK = frozenset({TEXT, SCRIPT, EMPTY})
_OFFICE_OK = frozenset({OFFICE, OFFICE_MACRO, ARCHIVE})   # OOXML/ODF are zips: libmagic may call them either
_EXTENSIONS: dict[str, frozenset[str]] = {}
for _exts, _families in (
    ("exe dll scr sys cpl ocx drv efi msi so elf dylib", {EXECUTABLE}),
    ("zip jar apk tar gz tgz bz2 tbz2 xz txz 7z rar cab iso img vhd vhdx dmg wim lz lzma zst cpio deb rpm lzh"
     " lha xar zz", {ARCHIVE}),
    ("docx xlsx pptx odt ods odp docm xlsm pptm dotx dotm xltx xltm potx potm ppsx ppsm", _OFFICE_OK),
    ("doc xls ppt dot xlt pot pps rtf msg", {OFFICE, OFFICE_MACRO}),
    ("pdf", {PDF}),
    ("jpg jpeg png gif bmp webp tif tiff ico heic heif avif svg", {IMAGE}),
    ("mp3 wav ogg oga flac m4a aac opus amr", {AUDIO}),
    ("mp4 m4v mov avi mkv webm 3gp wmv mpg mpeg", {VIDEO}),
    ("txt log csv tsv md json xml html htm yaml yml ini cfg conf rst", _TEXT_OK),
    ("sh bash bat cmd ps1 psm1 vbs vbe js jse wsf hta py pl rb php lnk", _TEXT_OK | {SCRIPT}),
):
    for _ext in _exts.split():
        _EXTENSIONS[_ext] = frozenset(_families)
_EXTENSIONS["svg"] = frozenset({IMAGE, TEXT})
_EXTENSIONS["msi"] = frozenset({EXECUTABLE, OFFICE})   # an MSI is an OLE file; libmagic may say either
_EXTENSIONS["lnk"] = frozenset({SCRIPT})
_EXTENSIONS["ogg"] = frozenset({AUDIO, VIDEO})
_EXTENSIONS["webm"] = frozenset({AUDIO, VIDEO})

# Pairs of families that are not a mismatch when one is claimed and the other detected.
_COMPATIBLE = (frozenset({TEXT, SCRIPT}), frozenset({OFFICE, OFFICE_MACRO}), frozenset({OFFICE, ARCHIVE}),
               frozenset({OFFICE_MACRO, ARCHIVE}), frozenset({AUDIO, VIDEO}))


def extension_of(name: str) -> str:
    """The claimed extension: lower case, without the dot; "" when the name has none."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if "." not in base.strip("."):
        return ""
    return base.rsplit(".", 1)[-1].lower()


def families_for_extension(extension: str) -> frozenset[str] | None:
    """The families a file with this extension may truly be, or None when we have no opinion."""
    return _EXTENSIONS.get(extension)


def compatible(claimed_family: str, detected_family: str) -> bool:
    return claimed_family == detected_family or frozenset({claimed_family, detected_family}) in _COMPATIBLE


def mismatch(extension: str, claimed_mime: str, detected_family: str) -> list[str]:
    """Why the claimed type contradicts the detected one (empty list: no contradiction).

    Lenient on purpose: a .docx that libmagic calls a zip, a .txt holding Python, a .jpg that is a PNG
    are ordinary. An empty file contradicts nothing."""
    if detected_family == EMPTY:
        return []
    reasons = []
    allowed = families_for_extension(extension)
    if allowed is not None and not any(compatible(family, detected_family) for family in allowed):
        reasons.append(f"extension .{extension} expects {'/'.join(sorted(allowed))}")
    claimed_family = family_of(claimed_mime) if claimed_mime else OTHER
    generic = claimed_mime.split(";", 1)[0].strip().lower() in ("application/octet-stream", "binary/octet-stream", "")
    if not generic and claimed_family != OTHER and not compatible(claimed_family, detected_family):
        reasons.append(f"claimed MIME {claimed_mime} is {claimed_family}")
    return reasons


# LOKI/THOR's `filetype` external uses short upper-case names (signature-base rules test `filetype == "EXE"`).
_LOKI_FILETYPES = {
    "application/x-dosexec": "EXE", "application/vnd.microsoft.portable-executable": "EXE",
    "application/x-msdownload": "EXE", "application/x-executable": "ELF", "application/x-sharedlib": "ELF",
    "application/x-pie-executable": "ELF", "application/x-mach-binary": "MACHO", "application/zip": "ZIP",
    "application/java-archive": "JAR", "application/x-rar": "RAR", "application/vnd.rar": "RAR",
    "application/x-7z-compressed": "7Z", "application/gzip": "GZIP", "application/x-bzip2": "BZIP2",
    "application/x-xz": "XZ", "application/x-tar": "TAR", "application/pdf": "PDF", "application/msword": "DOC",
    "application/x-ole-storage": "OLE", "application/CDFV2": "OLE", "application/rtf": "RTF", "text/rtf": "RTF",
    "text/x-script.python": "Python", "text/x-python": "Python", "text/x-shellscript": "SH",
    "text/x-msdos-batch": "BAT", "application/x-ms-shortcut": "LNK", "text/html": "HTML", "image/png": "PNG",
    "image/jpeg": "JPEG", "image/gif": "GIF", "application/x-msi": "MSI",
}


def loki_filetype(mime: str, family: str) -> str:
    """The value of the `filetype` YARA external: LOKI's short names where one exists, else the family
    in upper case ("EXE", "ELF", "ZIP", "PDF", "OFFICE", "TEXT", ...)."""
    return _LOKI_FILETYPES.get(mime) or (("EXE" if family == EXECUTABLE else family.upper()) if family else "")


_MAGIC_MIME_TYPE = 0x10            # libmagic's flag: answer the MIME type, not the description
_MAGIC_PARAM_NAME_MAX = 1          # the parameter python-magic raises to 64 (its issue 190); the same here


class _Cookie:
    """One libmagic cookie called through ctypes directly: no python-magic lock or coercion per call, and
    the GIL released for the whole call (ctypes does that). Set up exactly as python-magic sets up its own
    (same library, same flags, same name_max), so the answers are the same (tests/test_inspect_fastpath.py)."""

    _functions: tuple[Any, ...] | None = None

    def __init__(self, flags: int) -> None:
        lib = magic.libmagic
        if _Cookie._functions is None:
            # lib[name] gives a fresh function object: python-magic's own prototypes are left alone.
            open_, load, buffer, error, setparam, close = (lib[name] for name in (
                "magic_open", "magic_load", "magic_buffer", "magic_error", "magic_setparam", "magic_close"))
            open_.restype, open_.argtypes = ctypes.c_void_p, [ctypes.c_int]
            load.restype, load.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]
            buffer.restype, buffer.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
            error.restype, error.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
            setparam.restype, setparam.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
            close.restype, close.argtypes = None, [ctypes.c_void_p]
            _Cookie._functions = (open_, load, buffer, error, setparam, close)
        open_, load, self._buffer, self._error, setparam, self._close = _Cookie._functions
        self.flags = flags
        self.cookie = open_(flags)
        if not self.cookie or load(self.cookie, None) != 0:
            raise magic.MagicException(self._error(self.cookie) if self.cookie else b"magic_open failed")
        setparam(self.cookie, _MAGIC_PARAM_NAME_MAX, ctypes.byref(ctypes.c_size_t(64)))   # as python-magic

    def from_buffer(self, head: bytes) -> str:
        if type(head) is not bytes:
            head = bytes(head)
        result = self._buffer(self.cookie, head, len(head))
        if result is None:
            message = self._error(self.cookie)
            if message is None and self.flags & _MAGIC_MIME_TYPE:     # as python-magic's _handle509Bug
                return "application/octet-stream"
            raise magic.MagicException(message)
        return result.decode("utf-8", "backslashreplace")

    def __del__(self) -> None:
        if getattr(self, "cookie", None):
            self._close(self.cookie)
            self.cookie = None


# libmagic descriptions that fix its MIME type (issue 21): for these, the description is asked for and the MIME
# type read here, one libmagic call instead of two. The MIME type and the description come from the same walk of
# the magic database (the same tests match either way); they can differ only when a matching entry has a MIME
# type and no description, or the reverse ("Python script" is text/plain or text/x-script.python). So only
# descriptions libmagic writes itself when no entry of the database matched (plain text, "data"), and the
# leading words of formats whose one entry gives one MIME type, are listed; every other description costs the
# second call. tests/test_filetype_fastpath.py checks every pair against libmagic's MIME call over its corpus.
_MIME_OF_DESCRIPTION = tuple((re.compile(pattern, re.DOTALL), mime) for pattern, mime in (
    (r"(ASCII|ISO-8859|Non-ISO extended-ASCII|Unicode text, UTF-8( \(with BOM\))?) text(, with .*)?", "text/plain"),
    (r"data|very short file \(no magic\)", "application/octet-stream"),
    (r"PNG image data, .*", "image/png"),
    (r"JPEG image data, .*", "image/jpeg"),
    (r"GIF image data, version 8[79]a, .*", "image/gif"),
    (r"PDF document, version .*", "application/pdf"),
    (r"Zip archive data, .*", "application/zip"),
    (r"gzip compressed data(, .*)?", "application/gzip"),
    (r"bzip2 compressed data, .*", "application/x-bzip2"),
    (r"XZ compressed data, .*", "application/x-xz"),
    (r"7-zip archive data, .*", "application/x-7z-compressed"),
    (r"POSIX tar archive( \(GNU\))?", "application/x-tar"),
    (r"PE32\+? executable \(.*", "application/vnd.microsoft.portable-executable"),
    (r"ELF (32|64)-bit (LSB|MSB) executable, .*", "application/x-executable"),
    (r"ELF (32|64)-bit (LSB|MSB) shared object, .*", "application/x-sharedlib"),
    (r"Mach-O (64-bit )?(x86_64|arm64|i386) executable.*", "application/x-mach-binary"),
))


def mime_of_description(description: str) -> str:
    """The MIME type libmagic gives a head whose description is `description`, when the description fixes it;
    "" when only libmagic's MIME call can tell."""
    for pattern, mime in _MIME_OF_DESCRIPTION:
        if pattern.fullmatch(description):
            return mime
    return ""


class MagicPool:
    """libmagic cookies, one pair (MIME, description) per thread.

    The default calls libmagic through ctypes (`_Cookie`); `reference=True` goes through python-magic,
    the reference the fast path is tested against. libmagic itself is the cost either way (0.3 ms of CPU
    on 4 KB of binary data, 0.5-2 ms on 0.2-4 KB of text: its text rules are regular expressions run over
    the whole head), python-magic's wrapper adds little; what the direct calls save is the lock and the
    Python frames around each call, and they need nothing from python-magic but its loaded library."""

    def __init__(self, reference: bool = False) -> None:
        self._local = threading.local()
        self.reference = reference

    def _cookies(self) -> tuple[Any, Any]:
        cookies = getattr(self._local, "cookies", None)
        if cookies is None:
            if self.reference:
                cookies = (magic.Magic(mime=True), magic.Magic())
            else:
                cookies = (_Cookie(_MAGIC_MIME_TYPE), _Cookie(0))
            self._local.cookies = cookies
        return cookies

    def mime(self, head: bytes) -> str:
        """The MIME type of the content whose first bytes are `head`."""
        if not head:
            return "application/x-empty"
        try:
            return self._cookies()[0].from_buffer(head)
        except magic.MagicException:     # libmagic gave up on this input: say so, do not crash
            return "application/octet-stream"

    def description(self, head: bytes) -> str:
        """libmagic's text description of the content whose first bytes are `head`."""
        if not head:
            return "empty"
        try:
            return self._cookies()[1].from_buffer(head)
        except magic.MagicException as exc:
            return f"libmagic error: {exc}"

    def identify(self, head: bytes) -> tuple[str, str]:
        """(MIME type, description). The fast path asks libmagic for the description, and for the MIME type too
        only when the description does not fix it (mime_of_description); the reference asks for both."""
        if self.reference:
            return self.mime(head), self.description(head)
        description = self.description(head)
        return mime_of_description(description) or self.mime(head), description
