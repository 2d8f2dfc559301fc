"""tunnel_core.versions: the mux protocol version, agreed on as a WebSocket subprotocol (docs/protocol.md §1.1)."""

from __future__ import annotations

import pytest

from tunnel_core.errors import ProtocolError
from tunnel_core.frames import VERSION
from tunnel_core.versions import (
    SPOKEN,
    negotiated_version,
    offered_subprotocols,
    select_subprotocol,
    subprotocol,
)


def test_this_implementation_offers_version_1_and_frames_carry_it() -> None:
    assert SPOKEN == (1,) and VERSION == 1
    assert offered_subprotocols() == ("dicom-tunnel.1",)
    assert subprotocol(2) == "dicom-tunnel.2"


@pytest.mark.parametrize("selected", [None, ""])
def test_a_peer_that_negotiates_nothing_speaks_version_1(selected: str | None) -> None:
    assert negotiated_version(selected) == 1


def test_the_relay_answers_with_the_first_offered_version_it_speaks() -> None:
    # an agent that speaks 3, 2 and 1 offers them newest first; a relay that speaks 2 and 1 takes 2
    offered = offered_subprotocols((3, 2, 1))
    assert offered == ("dicom-tunnel.3", "dicom-tunnel.2", "dicom-tunnel.1")
    assert select_subprotocol(offered, spoken=(2, 1)) == "dicom-tunnel.2"
    assert select_subprotocol(offered) == "dicom-tunnel.1"
    assert select_subprotocol(["chat", " dicom-tunnel.1 "]) == "dicom-tunnel.1"  # header items may carry spaces
    assert select_subprotocol(["chat", "dicom-tunnel.7"]) is None  # nothing in common: no subprotocol, version 1


@pytest.mark.parametrize("selected", ["dicom-tunnel.2", "dicom-tunnel.", "dicom-tunnel.x", "chat", "x-dicom-tunnel.1"])
def test_a_selected_subprotocol_this_side_does_not_speak_is_refused(selected: str) -> None:
    with pytest.raises(ProtocolError):
        negotiated_version(selected)
    assert negotiated_version("dicom-tunnel.1") == 1
