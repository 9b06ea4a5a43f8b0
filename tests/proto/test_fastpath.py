"""The fixed-layout PageRequest and one-page PageBatch (proto/fastpath.py): what they build is
what the general decoders read, and what they recognise is exactly what those decoders would
accept; anything else is left to them (None), never half-accepted."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import MAX_BATCH_PAGES, PAGE_SIZE, PageBatch, PageRequest, ProtoError, build_page_batch, decode_any
from proto.fastpath import ONE_PAGE_ANSWER_BYTES, encode_request, one_page_head, parse_request, verified_one_page
from proto.version import MAX_GPA

GPA = 0x200000
PAGE = os.urandom(PAGE_SIZE)


@pytest.mark.parametrize("kind", ["demand", "readahead", "background"])
@pytest.mark.parametrize(("gpa", "count"), [(0, 1), (GPA, 7), (MAX_GPA - PAGE_SIZE, 1), (0, MAX_BATCH_PAGES)])
def test_a_fixed_layout_request_is_the_same_page_request_to_both_decoders(gpa: int, count: int, kind: str) -> None:
    encoded = encode_request(gpa, count, kind)
    assert PageRequest.decode(encoded) == PageRequest(gpa, count, kind)  # type: ignore[arg-type]
    assert parse_request(encoded) == (gpa, count, kind)


def _raw_request(gpa: int, count: int, kind: bytes = b"\xa6demand") -> bytes:
    """The fixed layout with any field values, valid or not."""
    template = encode_request(0, 1, "demand")
    head = template[: template.index(b"\xcf") + 1]
    middle = template[len(head) + 8 : len(head) + 8 + len(b"\xa5count\xcd")]
    return head + struct.pack(">Q", gpa) + middle + struct.pack(">H", count) + b"\xa4kind" + kind


@pytest.mark.parametrize(("frame", "why"), [
    (_raw_request(GPA, 0), "count 0"),
    (_raw_request(GPA, MAX_BATCH_PAGES + 1), "count over the batch limit"),
    (_raw_request(GPA + 1, 1), "a misaligned gpa"),
    (_raw_request(MAX_GPA, 1), "a gpa past MAX_GPA"),
    (_raw_request(MAX_GPA - PAGE_SIZE, 2), "pages running past MAX_GPA"),
    (_raw_request(GPA, 1, b"\xa5other"), "an unknown kind"),
    (_raw_request(GPA, 1)[:-1], "a truncated frame"),
    (_raw_request(GPA, 1) + b"\x00", "a byte too many"),
    (_raw_request(GPA, 1).replace(b"\xa3gpa", b"\xa3gpb"), "another key"),
    (PageRequest(GPA, 1, "demand").encode(), "the general (minimal) encoding"),
    (b"", "nothing"),
])
def test_anything_but_a_valid_fixed_layout_request_is_left_to_the_general_decoder(frame: bytes, why: str) -> None:
    assert parse_request(frame) is None, why


def test_the_invalid_fixed_layout_requests_get_the_general_decoders_clear_errors() -> None:
    with pytest.raises(ProtoError, match="count"):
        PageRequest.decode(_raw_request(GPA, 0))
    with pytest.raises(ProtoError, match="page-aligned"):
        PageRequest.decode(_raw_request(GPA + 1, 1))


def _answer(gpa: int = GPA, page: bytes = PAGE) -> bytes:
    return one_page_head(gpa, page) + page


def test_a_one_page_answer_is_a_page_batch_to_the_general_decoder_and_to_the_fast_check() -> None:
    answer = _answer()
    assert len(answer) == ONE_PAGE_ANSWER_BYTES
    general = decode_any(answer)
    assert isinstance(general, PageBatch)
    general.check_answers(PageRequest(GPA, 1, "demand"))
    general.verify()
    fast = verified_one_page(memoryview(answer), GPA)
    assert fast == general and fast.data == PAGE
    assert list(fast.runs())[0][:2] == (GPA, 1)


@given(gpa=st.integers(0, MAX_GPA // PAGE_SIZE - 1).map(lambda p: p * PAGE_SIZE),
       page=st.binary(min_size=1, max_size=64).map(lambda b: (b * (PAGE_SIZE // len(b) + 1))[:PAGE_SIZE]))
@settings(max_examples=50, deadline=None)
def test_the_fast_check_agrees_with_the_general_decoder(gpa: int, page: bytes) -> None:
    answer = _answer(gpa, page)
    assert verified_one_page(answer, gpa) == decode_any(answer)


def test_every_single_byte_flip_of_an_answer_is_refused_by_the_fast_check() -> None:
    answer = _answer()
    for at in range(len(answer)):
        flipped = bytearray(answer)
        flipped[at] ^= 0x01
        assert verified_one_page(flipped, GPA) is None, at


@pytest.mark.parametrize(("answer", "why"), [
    (_answer(GPA + PAGE_SIZE), "an answer for another gpa"),
    (_answer()[:-1], "a truncated answer"),
    (_answer() + b"\x00", "a byte too many"),
    (build_page_batch(GPA, 1, PAGE), "the general (minimal) encoding"),
    (b"", "nothing"),
])
def test_anything_but_the_exact_one_page_answer_is_left_to_the_general_decoder(answer: bytes, why: str) -> None:
    assert verified_one_page(answer, GPA) is None, why


def test_a_bad_checksum_left_to_the_general_decoder_is_named_there() -> None:
    answer = bytearray(_answer())
    answer[-1] ^= 0xFF
    assert verified_one_page(answer, GPA) is None
    batch = decode_any(bytes(answer))
    assert isinstance(batch, PageBatch)
    with pytest.raises(ProtoError, match="checksum"):
        batch.verify()
