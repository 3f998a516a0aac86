"""The handler's buffered reader for TorchServe's worker: the same messages as TorchServe's own reader, from a few
recv() calls instead of one per field."""

from __future__ import annotations

import random
import struct

import pytest
import ts
from ts.protocol import otf_message_handler

from serving import handler as handler_module
from serving.handler import READ_AHEAD, buffer_worker_reads, read_exactly

ORIGINAL_READER = otf_message_handler._retrieve_buffer if otf_message_handler._retrieve_buffer is not read_exactly \
    else None  # another test file's handler may have installed ours already in this process


def sized(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def predict_message(bodies: list[bytes], content_type: bytes = b"image/png") -> bytes:
    """A predict message in the frame format TorchServe's frontend writes (requests, their headers, their body)."""
    end = struct.pack("!i", -1)
    message = bytearray(b"I")
    for i, body in enumerate(bodies):
        message += sized(f"request-{i}".encode())
        for name, value in ((b"Host", b"127.0.0.1:8080"), (b"Content-Type", content_type), (b"X-Top-K", b"2")):
            message += sized(name) + sized(value)
        message += end + sized(b"body") + sized(content_type) + sized(body) + end
    return bytes(message + end)


class FrontendConnection:
    """What the worker's socket gives: at most what recv() asks for, in pieces as the kernel may split them."""

    def __init__(self, data: bytes, seed: int = 0, piece: int | None = 1500):
        """``piece``: the most one recv() returns, at random from 1 up; None: everything asked for that was sent."""
        self.data, self.recv_calls, self.random, self.piece = bytearray(data), 0, random.Random(seed), piece

    def recv(self, size: int) -> bytes:
        self.recv_calls += 1
        n = min(size, len(self.data), self.random.randint(1, self.piece) if self.piece else size)
        out = bytes(self.data[:n])
        del self.data[:n]
        return out


def read_with(reader, conn, monkeypatch):
    monkeypatch.setattr(otf_message_handler, "_retrieve_buffer", reader)
    return otf_message_handler.retrieve_msg(conn)


@pytest.mark.skipif(ORIGINAL_READER is None, reason="TorchServe's own reader was replaced before this module loaded")
@pytest.mark.parametrize("seed", range(5))
def test_the_same_batch_as_torchserve_reads_from_far_fewer_recv_calls(seed, monkeypatch):
    rng = random.Random(seed)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))) for _ in range(32)]
    bodies[3] = b"x" * (3 * READ_AHEAD + 17)  # a body larger than one read-ahead
    message = predict_message(bodies)
    theirs, ours = FrontendConnection(message, seed), FrontendConnection(message, seed)
    expected = read_with(ORIGINAL_READER, theirs, monkeypatch)
    assert read_with(read_exactly, ours, monkeypatch) == expected
    assert expected[1][3]["parameters"][0]["value"] == bodies[3] and len(expected[1]) == 32
    assert ours.recv_calls < theirs.recv_calls
    # The kernel hands over all that was sent: a few reads, where TorchServe's own reader makes ~17 per request.
    ours, theirs = FrontendConnection(message, piece=None), FrontendConnection(message, piece=None)
    assert read_with(read_exactly, ours, monkeypatch) == read_with(ORIGINAL_READER, theirs, monkeypatch) == expected
    assert ours.recv_calls <= 5 and theirs.recv_calls > 32 * 10


def test_bytes_read_ahead_are_kept_for_the_next_message(monkeypatch):
    first, second = predict_message([b"one"]), predict_message([b"two", b"three"], b"text/plain")
    conn = FrontendConnection(first + second, piece=None)  # both arrive in one read
    _, batch = read_with(read_exactly, conn, monkeypatch)
    assert [r["parameters"][0]["value"] for r in batch] == [b"one"]
    _, batch = otf_message_handler.retrieve_msg(conn)
    assert [r["parameters"][0]["value"] for r in batch] == ["two", "three"] and conn.recv_calls == 1


def test_the_worker_ends_when_the_frontend_goes_mid_message(monkeypatch):
    conn = FrontendConnection(predict_message([b"cut short"])[:-10])
    with pytest.raises(SystemExit) as ended:
        read_with(read_exactly, conn, monkeypatch)
    assert ended.value.code == 0  # as TorchServe's own reader ends it


def test_installed_only_on_the_torchserve_release_it_fits(monkeypatch):
    sentinel = lambda conn, length: b""  # noqa: E731 - stands in for TorchServe's reader
    monkeypatch.setattr(otf_message_handler, "_retrieve_buffer", sentinel)
    monkeypatch.setattr(ts, "__version__", "0.13.0", raising=False)
    assert buffer_worker_reads() is False and otf_message_handler._retrieve_buffer is sentinel
    monkeypatch.setattr(ts, "__version__", handler_module.BUFFERED_READER_TORCHSERVE, raising=False)
    assert buffer_worker_reads() is True and otf_message_handler._retrieve_buffer is read_exactly
    assert buffer_worker_reads() is True  # twice (a second model in the worker) changes nothing
