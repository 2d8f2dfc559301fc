"""tunnel_link.dicomconn: every await on the peer is bounded, and a protocol fault is aborted here."""

from __future__ import annotations

import asyncio

import pytest

from tunnel_core.dicom import association as ua
from tunnel_core.dicom.pdu import AssociateRQ, PresentationContext
from tunnel_core.errors import AssociationError
from tunnel_link.channels import ChannelClosed
from tunnel_link.dicomconn import DicomConnection


class StuckChannel:
    """A peer that neither sends nor takes anything (a full window that never opens)."""

    def __init__(self, inbound: bytes = b"") -> None:
        self.inbound = [inbound] if inbound else []
        self.written: list[bytes] = []
        self.aborted = False

    async def read(self) -> bytes:
        if self.inbound:
            return self.inbound.pop(0)
        await asyncio.Event().wait()
        return b""

    async def write(self, data: bytes | memoryview) -> None:
        self.written.append(bytes(data))
        await asyncio.Event().wait()

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


def requestor() -> ua.Association:
    association = ua.Association(ua.Role.REQUESTOR)
    association.request(AssociateRQ("CLOUD", "MOD", (PresentationContext(1, "1.2.840.10008.1.1",
                                                                         ("1.2.840.10008.1.2",)),)))
    return association


async def test_a_peer_that_takes_nothing_times_the_write_out() -> None:
    conn = DicomConnection(StuckChannel(), requestor(), write_timeout=0.05)
    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError):
            await conn.flush()


async def test_a_silent_peer_times_the_read_out() -> None:
    conn = DicomConnection(StuckChannel(), ua.Association(ua.Role.ACCEPTOR))
    async with asyncio.timeout(5):
        with pytest.raises(TimeoutError):
            await conn.next_event(0.05)


async def test_a_peer_that_closes_without_releasing_is_channel_closed() -> None:
    class Closing(StuckChannel):
        async def read(self) -> bytes:
            return b""

    with pytest.raises(ChannelClosed):
        await DicomConnection(Closing(), ua.Association(ua.Role.ACCEPTOR)).next_event(1)


async def test_a_protocol_fault_is_aborted_before_it_reaches_the_caller() -> None:
    channel = StuckChannel(b"\x04\x00\x00\x00\x00\x02\x00\x00")  # P-DATA-TF before any A-ASSOCIATE-RQ
    conn = DicomConnection(channel, ua.Association(ua.Role.ACCEPTOR))
    async with asyncio.timeout(10):  # the A-ABORT's own write is bounded (ABORT_WRITE_TIMEOUT)
        with pytest.raises(AssociationError):
            await conn.next_event(1)
    assert channel.written and channel.written[0][0] == 0x07 and channel.aborted
