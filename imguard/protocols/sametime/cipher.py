"""Sametime channel encryption: RC2 (RFC 2268) in CBC as libmeanwhile uses it, and its two ciphers' keys.
Pure, standard library only (`cryptography`'s RC2 takes only 16-byte keys at 128 effective bits; Sametime's keys are
5 or 16 bytes at 1024 effective bits, so RC2 is written here, small, and checked against RFC 2268's test vectors).

What libmeanwhile does (its cipher.c and channel.c, read for the structures):
- every channel cipher is RC2 with 1024 effective key bits (the key expansion's last step masks nothing), in CBC
  with the fixed IV 01 23 45 67 89 ab cd ef at the channel's start, one chain per channel and direction that runs on
  across messages (the next message's IV is the last ciphertext block of the one before); each message padded to the
  next multiple of 8 with the count of padding bytes (1 to 8), as PKCS#7 is;
- cipher 0x0000, "RC2/40": the key is the first 5 bytes of the *sender's* login id (a party encrypts with its own,
  decrypts with the other party's, which its channel's create or accept names): both are on the wire, so whoever
  reads the connection reads these channels;
- cipher 0x0001, "RC2/128": Diffie-Hellman in the 512-bit group below (generator 3), each party's public key in its
  encrypt item (the offer of the channel's creator, the accept of its acceptor); the key is the last 16 bytes of the
  shared secret. Nothing authenticates the public keys, so a gateway in the middle gives each leg its own.
"""

from __future__ import annotations

import secrets
import struct

RC2_40 = 0x0000
RC2_128 = 0x0001

BLOCK = 8
IV = bytes.fromhex("0123456789abcdef")
EFFECTIVE_BITS = 1024                   # what libmeanwhile's key expansion amounts to (RFC 2268's T1)
RC2_40_KEY_BYTES = 5

DH_PRIME = int("CF84AFCE86DDFA527F136D10357528EEFBA0AFEF808F29174E3B6A9E970001717C8F106C41C161A6CE91057B34DA62CB"
               "B87BFDC1B35C1B910FEA72249D566B9F", 16)
DH_BASE = 3
DH_BYTES = 64

# RFC 2268 section 2: PITABLE, the digits of pi as a permutation of 0..255
_PI = bytes.fromhex(
    "d978f9c419ddb5ed28e9fd794aa0d89dc67e37832b76538e624c6488448bfba2179a59f587b34f1361456d8d09817d32"
    "bd8f40eb86b77b0bf09521225c6b4e8254d66593ce60b21c7356c014a78cf1dc1275ca1f3bbee4d1423dd430a33cb626"
    "6fbf0eda4669075727f21d9bbc944303f811c7f690ef3ee706c3d52fc8661ed708e8eade8052eef784aa72ac354d6a2a"
    "961ad2715a1549744b9fd05e0418a4ecc2e0416e0f51cbcc2491af50a1f47039997c3a8523b8b47afc02365b25559731"
    "2d5dfa98e38a92ae05df2910676cbac9d300e6cfe19ea82c6316013f58e289a90d38341bab33ffb0bb480c5fb9b1cd2e"
    "c5f3db47e5a59c770aa62068fe7fc1ad")
assert len(_PI) == 256 and len(set(_PI)) == 256

_MASK = 0xFFFF


class CipherError(ValueError):
    """Data that does not decrypt (a length not a multiple of 8, padding that does not fit: the wrong key)."""


def expand_key(key: bytes, effective_bits: int = EFFECTIVE_BITS) -> tuple[int, ...]:
    """RFC 2268 section 2: the 64 16-bit subkeys K[0..63] of `key` (1 to 128 bytes) at `effective_bits`."""
    if not 1 <= len(key) <= 128 or not 1 <= effective_bits <= 1024:
        raise ValueError("an RC2 key is 1 to 128 bytes, its effective bits 1 to 1024")
    t = len(key)
    t8 = (effective_bits + 7) // 8
    tm = 0xFF % (1 << (8 + effective_bits - 8 * t8))
    buf = bytearray(key) + bytearray(128 - t)
    for i in range(t, 128):
        buf[i] = _PI[(buf[i - 1] + buf[i - t]) & 0xFF]
    buf[128 - t8] = _PI[buf[128 - t8] & tm]
    for i in range(127 - t8, -1, -1):
        buf[i] = _PI[buf[i + 1] ^ buf[i + t8]]
    return struct.unpack("<64H", bytes(buf))


def _rol(x: int, s: int) -> int:
    return ((x << s) | (x >> (16 - s))) & _MASK


def _ror(x: int, s: int) -> int:
    return ((x >> s) | (x << (16 - s))) & _MASK


_SHIFTS = (1, 2, 3, 5)


def encrypt_block(k: tuple[int, ...], block: bytes) -> bytes:
    """RFC 2268 section 3: sixteen mixing rounds, a mashing round after the 5th and the 11th."""
    r = list(struct.unpack("<4H", block))
    j = 0
    for rnd in range(16):
        for i in range(4):
            r[i] = _rol((r[i] + k[j] + (r[i - 1] & r[i - 2]) + (~r[i - 1] & r[i - 3])) & _MASK, _SHIFTS[i])
            j += 1
        if rnd in (4, 10):
            for i in range(4):
                r[i] = (r[i] + k[r[i - 1] & 63]) & _MASK
    return struct.pack("<4H", *r)


def decrypt_block(k: tuple[int, ...], block: bytes) -> bytes:
    """RFC 2268 section 4: the rounds of encrypt_block undone, in reverse."""
    r = list(struct.unpack("<4H", block))
    j = 63
    for rnd in range(15, -1, -1):
        for i in (3, 2, 1, 0):
            r[i] = (_ror(r[i], _SHIFTS[i]) - k[j] - (r[i - 1] & r[i - 2]) - (~r[i - 1] & r[i - 3])) & _MASK
            j -= 1
        if rnd in (5, 11):
            for i in (3, 2, 1, 0):
                r[i] = (r[i] - k[r[i - 1] & 63]) & _MASK
    return struct.pack("<4H", *r)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class Chain:
    """One direction of one channel: its key and the CBC chain as it stands (libmeanwhile's per-instance IV)."""

    def __init__(self, key: tuple[int, ...], iv: bytes = IV):
        self.key, self.iv = key, iv

    def encrypt(self, data: bytes) -> bytes:
        pad = BLOCK - len(data) % BLOCK
        data += bytes([pad]) * pad
        out = bytearray()
        for i in range(0, len(data), BLOCK):
            self.iv = encrypt_block(self.key, _xor(data[i:i + BLOCK], self.iv))
            out += self.iv
        return bytes(out)

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext; the chain moves on only if it decrypts (else CipherError, the chain as it was)."""
        if not data or len(data) % BLOCK:
            raise CipherError(f"{len(data)} bytes of ciphertext, not a multiple of {BLOCK}")
        out, iv = bytearray(), self.iv
        for i in range(0, len(data), BLOCK):
            block = data[i:i + BLOCK]
            out += _xor(decrypt_block(self.key, block), iv)
            iv = block
        pad = out[-1]
        if not 1 <= pad <= BLOCK or out[-pad:] != bytes([pad]) * pad:
            raise CipherError("the padding does not fit: not this key, or not this point of the chain")
        self.iv = iv
        return bytes(out[:-pad])


def rc2_40_key(login_id: str) -> tuple[int, ...] | None:
    """RC2/40's key of a party: the first 5 bytes of its login id (libmeanwhile reads 5 bytes whatever its length: a
    4-byte id gives its NUL as the 5th; a shorter one, bytes past it that nobody on the wire can know: None)."""
    data = login_id.encode("utf-8")
    if len(data) < RC2_40_KEY_BYTES - 1:
        return None
    return expand_key((data + b"\x00")[:RC2_40_KEY_BYTES])


class DhKeyPair:
    """A Diffie-Hellman key pair in Sametime's group: what a gateway gives each leg of an RC2/128 channel."""

    def __init__(self, private: int | None = None):
        while True:
            self.private = private if private is not None else secrets.randbits(512) | 1
            self.public = pow(DH_BASE, self.private, DH_PRIME)
            if private is not None or self.public.bit_length() > 8 * (DH_BYTES - 1):
                break           # a full 64-byte public key: the offer keeps its length when one is swapped for it

    def public_bytes(self) -> bytes:
        return self.public.to_bytes((self.public.bit_length() + 7) // 8 or 1, "big")

    def key_with(self, remote_public: bytes) -> tuple[int, ...] | None:
        """RC2/128's key with the party whose public key is `remote_public` (None: not a usable key)."""
        remote = int.from_bytes(remote_public, "big")
        if not 1 < remote < DH_PRIME - 1:
            return None
        shared = pow(remote, self.private, DH_PRIME)
        return expand_key(shared.to_bytes(DH_BYTES, "big")[-16:])
