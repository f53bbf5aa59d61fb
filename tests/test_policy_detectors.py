"""Built-in text detectors: each returns the spans it found, so mask can rewrite exactly those."""

from __future__ import annotations

import pytest

from imguard.policy.detectors import DETECTORS, card_brand, find_cards, find_cloud_keys, find_private_keys, luhn_ok


def found(spans, text):
    return [text[s.start:s.end] for s in spans]


@pytest.mark.parametrize("number", [
    "4111111111111111",          # visa test number
    "4111 1111 1111 1111",
    "4111-1111-1111-1111",
    "5555 5555 5555 4444",       # mastercard
    "2223 0031 2200 3222",       # mastercard 2-series
    "3782 822463 10005",         # amex, 15 digits
    "6011 1111 1111 1117",       # discover
    "3530 1113 3330 0000",       # jcb
    "4222222222222",             # visa, 13 digits
])
def test_card_numbers_are_found(number):
    """Real test card numbers, with spaces or dashes, are found as one span covering the whole number."""
    text = f"pay with {number} please"
    assert found(find_cards(text), text) == [number]


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",       # Luhn fails
    "order 1234567890123",       # 13 digits, no known prefix / Luhn
    "0000 0000 0000 0000",       # passes Luhn, one repeated digit
    "9111 1111 1111 1111 11",    # unknown IIN
    "41111111111",               # too short
    "41111111111111111111111",   # too long (23 digits, not cut into a card)
    "call +1 415 555 0100",
])
def test_non_cards_are_not_found(text):
    assert find_cards(text) == []


def test_luhn_and_brand():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert card_brand("4111111111111111") == "visa"
    assert card_brand("378282246310005") == "amex"
    assert card_brand("9111111111111111") == ""


def test_several_cards_each_get_a_span():
    text = "a 4111111111111111 b 5555555555554444 c"
    assert found(find_cards(text), text) == ["4111111111111111", "5555555555554444"]


def test_private_keys_span_to_the_end_line():
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----"
    text = f"here:\n{key}\nbye"
    assert found(find_private_keys(text), text) == [key]
    for head in ("-----BEGIN PRIVATE KEY-----", "-----BEGIN OPENSSH PRIVATE KEY-----",
                 "-----BEGIN EC PRIVATE KEY-----", "-----BEGIN ENCRYPTED PRIVATE KEY-----",
                 "-----BEGIN PGP PRIVATE KEY BLOCK-----"):
        assert find_private_keys(head + "\nabc"), head
    assert find_private_keys("-----BEGIN PUBLIC KEY-----\nabc\n-----END PUBLIC KEY-----") == []
    assert find_private_keys("my private key is safe") == []


@pytest.mark.parametrize("token,kind", [
    ("AKIAIOSFODNN7EXAMPLE", "aws_key"),
    ("ghp_" + "a1B2" * 9, "github_token"),
    ("xoxb-123456789012-abcdefghijkl", "slack_token"),
    ("AIza" + "SyD-abcdefghijklmnopqrstuvwxyz01234", "google_api_key"),
])
def test_cloud_keys(token, kind):
    text = f"key={token} ok"
    spans = find_cloud_keys(text)
    assert found(spans, text) == [token] and spans[0].kind == kind
    assert found(DETECTORS[kind](text), text) == [token]


def test_cloud_key_lookalikes_are_not_found():
    assert find_cloud_keys("AKIA is short AKIAIOSFODNN7") == []
    assert find_cloud_keys("XAKIAIOSFODNN7EXAMPLEX") == []   # glued into a longer token
    assert find_cloud_keys("ghp_short xox-nothing") == []
    assert DETECTORS["aws_key"]("ghp_" + "a" * 36) == []


def test_detectors_handle_odd_text():
    for name, detector in DETECTORS.items():
        assert detector("") == [], name
        assert detector("\x00\udcff" * 100) == [], name
