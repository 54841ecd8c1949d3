"""Hypothesis strategies for hostile requests: protobuf wire bytes written by
hand (so a string field can hold what the Python API refuses, e.g. a lone
surrogate), numbers at and past every limit, unicode edge cases, garbage."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

MODEL = "minilm-l6"

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1


# -- protobuf wire format -------------------------------------------------------------------

def varint(n: int) -> bytes:
    """Base-128 varint of n taken as a 64-bit two's complement (what protobuf does)."""
    n &= UINT64_MAX
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes, message, packed)."""
    return tag(field, 2) + varint(len(payload)) + payload


# Bytes that are not UTF-8: protobuf refuses them in a `string` field, so the server's parse must fail.
BAD_UTF8 = [b"\xed\xa0\x80", b"a\xed\xb3\xbfb", b"\xff", b"\xc0\x80", b"\x80", b"ok\xe2\x82", b"\xf4\x90\x80\x80"]


@st.composite
def wire_field(draw: st.DrawFn, fields: st.SearchStrategy[int] | None = None) -> bytes:
    """One well-formed field with any number and wire type (an unknown field, or a
    known number with the wrong type)."""
    number = draw(fields if fields is not None else st.one_of(
        st.integers(1, 20), st.integers(1, 2**29 - 1), st.sampled_from([18999, 19000, 19999, 20000, 2**29 - 1])))
    kind = draw(st.sampled_from(["varint", "fixed64", "bytes", "fixed32", "group"]))
    if kind == "varint":
        return tag(number, 0) + varint(draw(st.integers(INT64_MIN, UINT64_MAX)))
    if kind == "fixed64":
        return tag(number, 1) + draw(st.binary(min_size=8, max_size=8))
    if kind == "fixed32":
        return tag(number, 5) + draw(st.binary(min_size=4, max_size=4))
    if kind == "group":
        return tag(number, 3) + tag(number, 4)
    return ld(number, draw(st.binary(max_size=64)))


def unknown_fields(max_fields: int = 4) -> st.SearchStrategy[bytes]:
    return st.lists(wire_field(), max_size=max_fields).map(b"".join)


@st.composite
def corrupt(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` wire bytes broken the ways a bad peer breaks them."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "length", "wrong_type", "append"]))
    if how == "truncate" and valid:
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if how == "flip" and valid:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.binary(min_size=1, max_size=16)) + valid[at:]
    if how == "length":
        # A length prefix that claims more than there is (up to 2**62 bytes).
        field = draw(st.integers(1, 8))
        claimed = draw(st.sampled_from([len(valid) + 1, 2**31 - 1, 2**31, 2**32 + 5, 2**62]))
        return valid + tag(field, 2) + varint(claimed) + b"\x00" * draw(st.integers(0, 8))
    if how == "wrong_type":
        # A known field number with an invalid wire type (6, 7) or an unmatched group end.
        return valid + tag(draw(st.integers(1, 8)), draw(st.sampled_from([4, 6, 7])))
    return valid + draw(unknown_fields())


def garbage(max_size: int = 2048) -> st.SearchStrategy[bytes]:
    """Bytes that are rarely a valid message of anything."""
    return st.one_of(
        st.binary(max_size=max_size),
        st.sampled_from([
            b"\x00", b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f",  # a 4 GiB length for field 1
            b"\x0b" * 200 + b"\x0c" * 200,  # groups nested past the parser's depth limit
            b"\x12" + b"\x80" * 10 + b"\x01",  # an 11-byte varint
            b"\x08" + b"\xff" * 9 + b"\x01",  # int64 field 1 = -1 written as a 10-byte varint
            b"\x07", b"\x0f", b"\x00\x00\x00\x00",  # field 0, wire types 7 and 6
        ]),
        st.integers(64 * 1024, 1 << 20).map(lambda n: b"\x0a" + varint(n) + b"x" * n),  # one big string
        st.lists(wire_field(), min_size=1, max_size=8).map(b"".join),
    )


# -- values ---------------------------------------------------------------------------------

def int32s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(INT32_MIN, INT32_MAX),
                     st.sampled_from([0, -1, 1, 5, 6, 11, 12, 512, 513, INT32_MAX, INT32_MIN]))


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(INT64_MIN, INT64_MAX),
                     st.sampled_from([0, -1, 101, 102, 30521, 30522, 2**31, 2**32, 2**53 + 1, INT64_MAX, INT64_MIN]))


def floats32() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(width=32), st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0,
                                                           1e-45, 0.5, 1.0, 1.0000001, 3.4e38]))


def floats64() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 2.0**63]))


# Strings that break tokenizers and offset maps: normalization that changes length,
# zero-width and control characters, bidi overrides, combining marks, astral planes.
EDGE_TEXTS = [
    "", " ", "\n\t\r", "\x00", "\x00hello\x00", "\ufeffhello", "\u200b\u200c\u200d", "\u202eevil\u202c",
    "İstanbul", "ß straße", "ﬁne ﬂow", "ﬃ", "Å", "e\u0301" * 50, "a" + "\u0301" * 500, "🏳️‍🌈 👩‍👩‍👧‍👦",
    "\U0010ffff\U000e0001", "\ufffd\ufffe\uffff", "日本語のテキスト", "مرحبا بالعالم", "\u3000全角\u3000",
    "[CLS] [SEP] [MASK] [PAD] [UNK]", "##ing ##s", "a" * 300, "word " * 200, "x" * 5000, "\r\n" * 100,
    "\\u0000", "%s%n%x", "'; DROP TABLE models; --", "../../etc/passwd", "minilm-l6\x00", "MINILM-L6",
]


def texts(max_size: int = 200) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(EDGE_TEXTS),
        st.text(max_size=max_size),
        st.text(st.characters(codec="utf-8", categories=["Mn", "Cf", "Cc", "Zs", "Co", "So"]), max_size=max_size),
        st.lists(st.sampled_from(EDGE_TEXTS), min_size=2, max_size=6).map("".join),
    )


def huge_strings() -> st.SearchStrategy[str]:
    """Up to 1 MiB of one character (the bound keeps the suite's memory small)."""
    return st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001F600", "\x00", "/"]),
                     st.sampled_from([256, 4096, 65536, 1 << 20]))


def names() -> st.SearchStrategy[str]:
    """Model names and versions: the real one, near misses, edge text, huge."""
    return st.one_of(st.sampled_from(["", MODEL, MODEL.upper(), MODEL + " ", "1", "0", "-1", "*", ".", ".."]),
                     texts(64), huge_strings())


def bad_utf8() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(BAD_UTF8),
                     st.tuples(st.text(max_size=8), st.sampled_from(BAD_UTF8)).map(lambda t: t[0].encode() + t[1]))


def bytes_elements(items: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(i)) + i for i in items)
