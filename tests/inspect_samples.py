"""Harmless sample files for the inspection tests and the benchmark, built at run time.

Nothing here is malware: the EICAR string is the industry's harmless test string (assembled from two
halves so this source file is not itself flagged), executables are bare headers that run nothing, the
"macro" is an OLE header with a VBA stream name and no code.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
assert len(EICAR) == 68


def zip_bytes(members: dict[str, bytes] | list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    items = members.items() if isinstance(members, dict) else members
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in items:
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data, compress_type=compression)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1577836800
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_with_link(name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        archive.addfile(info)
    return buffer.getvalue()


def gz(data: bytes, name: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename=name or "", mode="wb", fileobj=buffer, mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def bz(data: bytes) -> bytes:
    return bz2.compress(data)


def xz(data: bytes) -> bytes:
    return lzma.compress(data)


def encrypted_zip(name: str = "secret.exe", data: bytes = b"not really encrypted") -> bytes:
    """A zip whose member has the 'encrypted' flag set (zipfile cannot write real ZipCrypto)."""
    raw = bytearray(zip_bytes({name: data, "readme.txt": b"hello"}, zipfile.ZIP_STORED))
    local = raw.find(b"PK\x03\x04")
    raw[local + 6] |= 1
    central = raw.find(b"PK\x01\x02")
    raw[central + 8] |= 1
    return bytes(raw)


def fake_vba_project() -> bytes:
    """An OLE compound-file header followed by the UTF-16 stream names of a VBA project. Runs nothing."""
    header = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 16 + struct.pack("<HHH", 0x3E, 3, 0xFFFE) + b"\0" * 482
    directory = "Root Entry".encode("utf-16-le") + b"\0" * 8 + "_VBA_PROJECT".encode("utf-16-le") + \
        b"\0" * 8 + "VBA".encode("utf-16-le") + b"\0\0" + "dir".encode("utf-16-le")
    source = b"\x01\x00Attribute VB_Name = \"ThisDocument\"\r\n"
    return header + directory + b"\0" * 64 + source + b"\0" * 256


def docm(with_macro: bool = True) -> bytes:
    members = [
        ("[Content_Types].xml",
         b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Types xmlns="http://schemas.openxmlformats.org/'
         b'package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
         b'relationships+xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.ms-word.document.'
         b'macroEnabled.main+xml"/></Types>'),
        ("_rels/.rels", b'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
                        b'relationships"/>'),
        ("word/document.xml", b'<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/'
                              b'wordprocessingml/2006/main"><w:body><w:p/></w:body></w:document>'),
    ]
    if with_macro:
        members.append(("word/vbaProject.bin", fake_vba_project()))
    return zip_bytes(members)


def pe() -> bytes:
    """A PE32 header with no sections: libmagic and the Executable_PE rule recognise it; it runs nothing."""
    dos = bytearray(b"MZ" + b"\0" * 0x3E)
    struct.pack_into("<I", dos, 0x3C, 0x80)
    dos += b"\0" * (0x80 - len(dos))
    coff = struct.pack("<HHIIIHH", 0x14C, 0, 0, 0, 0, 0xE0, 0x0102)
    optional = bytearray(0xE0)
    struct.pack_into("<H", optional, 0, 0x10B)
    struct.pack_into("<H", optional, 68, 2)          # subsystem: Windows GUI
    return bytes(dos) + b"PE\0\0" + coff + bytes(optional) + b"\0" * 256


def elf() -> bytes:
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0, 64, 56, 0, 64, 0, 0)
    return ident + header + b"\0" * 128


def macho() -> bytes:
    return struct.pack("<IiiIIII", 0xFEEDFACF, 0x01000007, 3, 2, 0, 0, 0) + b"\0" * 100


def macho_fat() -> bytes:
    return struct.pack(">II", 0xCAFEBABE, 2) + b"\0" * 100


def java_class() -> bytes:
    return struct.pack(">IHH", 0xCAFEBABE, 0, 52) + b"\0" * 100


def lnk() -> bytes:
    return struct.pack("<I", 0x4C) + bytes.fromhex("0114020000000000c000000000000046") + b"\0" * 56


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png() -> bytes:
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0\xff\0\0")
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg() -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 1, 1, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    scan = b"\x12\x34\xff\x00\x56\xff\xd0\x78"       # entropy data with a stuffed 0xFF00 and a restart marker
    return b"\xff\xd8" + app0 + sof + sos + scan + b"\xff\xd9"


def gif() -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" +
            b"\x21\xf9\x04\x01\x00\x00\x00\x00" +
            b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + b"\x3b")


def pdf(body: bytes = b"") -> bytes:
    return (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R " + body + b" >>\nendobj\n"
            b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"
            b"trailer\n<< /Root 1 0 R >>\n%%EOF\n")


def nested_zip(levels: int, core: bytes = EICAR, core_name: str = "eicar.com") -> bytes:
    """levels=1: a zip holding core; levels=2: a zip holding that zip; ..."""
    data, name = core, core_name
    for level in range(levels):
        data = zip_bytes({name: data})
        name = f"level{levels - level - 1}.zip"
    return data


def zeros_zip(size: int, name: str = "zeros.bin") -> bytes:
    """A zip bomb made of `size` zero bytes, deflated (about 1000:1), streamed into the zip writer so
    building it never holds the expanded content in memory."""
    buffer = io.BytesIO()
    chunk = bytes(1024 * 1024)
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open(info, "w", force_zip64=True) as out:
            left = size
            while left > 0:
                piece = chunk if left >= len(chunk) else chunk[:left]
                out.write(piece)
                left -= len(piece)
    return buffer.getvalue()


def pdf_with_streams(catalog_extra: bytes, streams: list[tuple[bytes, bytes]]) -> bytes:
    """A PDF whose catalog has `catalog_extra` and which carries `streams`: (dictionary entries, data)
    pairs; the data is written as given (compress it first for /FlateDecode)."""
    out = [b"%PDF-1.7\n", b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R " + catalog_extra + b" >>\nendobj\n",
           b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\n"]
    for number, (entries, data) in enumerate(streams, start=3):
        out.append(b"%d 0 obj\n<< " % number + entries + b" /Length %d >>\nstream\n" % len(data) + data +
                   b"\nendstream\nendobj\n")
    out.append(b"trailer\n<< /Root 1 0 R >>\n%%EOF\n")
    return b"".join(out)
