"""tunnel_core.discovery: the Tunnel-Fleet header, byte by byte and with hypothesis, and choose_relays."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_core.discovery import (
    AGENT_HEADER,
    FLEET_HEADER,
    MAX_ENTRIES,
    MAX_HEADER_BYTES,
    DiscoveryError,
    FleetEntry,
    choose_relays,
    encode_fleet,
    parse_fleet,
)

A = FleetEntry("relay-a", "eu-1", "wss://10.0.0.1:8443/tunnel", "serving")
B = FleetEntry("relay-b", "eu-2", "wss://relay-b.example.org/tunnel", "serving")
C = FleetEntry("relay-c", "eu-1", "wss://[fd00::3]:9443/t", "draining")


def test_header_names() -> None:
    assert (FLEET_HEADER, AGENT_HEADER) == ("Tunnel-Fleet", "Tunnel-Agent")


def test_encoding_is_compact_json_byte_for_byte() -> None:
    assert encode_fleet([A, C]) == (
        '[{"name":"relay-a","zone":"eu-1","url":"wss://10.0.0.1:8443/tunnel","state":"serving"},'
        '{"name":"relay-c","zone":"eu-1","url":"wss://[fd00::3]:9443/t","state":"draining"}]')


def test_parse_keeps_the_relays_order_and_ignores_extra_keys_and_whitespace() -> None:
    text = ('[ {"state": "serving", "url": "wss://relay-b.example.org/tunnel", "zone": "eu-2", '
            '"name": "relay-b", "weight": 3},\n {"name":"relay-a","zone":"eu-1",'
            '"url":"wss://10.0.0.1:8443/tunnel","state":"serving"} ]')
    assert parse_fleet(text) == [B, A]
    assert parse_fleet(text)[0].host == "relay-b.example.org"
    assert C.host == "fd00::3"


def _one(**fields: object) -> str:
    entry = {"name": "relay-a", "zone": "", "url": "wss://h:1/t", "state": "serving", **fields}
    return json.dumps([entry])


MALFORMED = [
    "", " ", "[", "]", "null", "{}", "1", '"x"', "[]", "[1]", "[null]", "[[]]", "NaN", "[Infinity]",
    "1" * 5000,  # an integer too long to convert
    "[" * 4000 + "]" * 4000,  # nested deeper than the parser's recursion limit
    "[" * 20000,  # over the size limit
    '[{"name":"relay-a"}]',
    _one(name=""), _one(name="-a"), _one(name="a b"), _one(name="a" * 64), _one(name=7), _one(name=None),
    _one(zone="eu 1"), _one(zone="z" * 64), _one(zone=1),
    _one(state="SERVING"), _one(state="gone"), _one(state=True),
    _one(url="ws://h:1/t"), _one(url="https://h/t"), _one(url="wss:///t"), _one(url="wss://u:p@h/t"),
    _one(url="wss://h:0/t"), _one(url="wss://h:70000/t"), _one(url="wss://h:x/t"), _one(url="wss://h:/t"),
    _one(url="wss://h/t?q=1"), _one(url="wss://h/t#f"), _one(url="wss://h /t"), _one(url="wss://hé/t"),
    _one(url="wss://[::1/t"), _one(url="wss://h/" + "a" * 600), _one(url=["wss://h/t"]),
    json.dumps([{"name": "relay-a", "zone": "", "url": "wss://h/t", "state": "serving"}] * 2),  # name twice
    json.dumps([{"name": f"r{i}", "zone": "", "url": "wss://h/t", "state": "serving"}
                for i in range(MAX_ENTRIES + 1)]),
    '[{"name":"relay-\u00e9","zone":"","url":"wss://h/t","state":"serving"}]',
]


@pytest.mark.parametrize("text", MALFORMED)
def test_every_malformed_value_is_a_discovery_error(text: str) -> None:
    with pytest.raises(DiscoveryError):
        parse_fleet(text)


def test_non_text_is_a_discovery_error() -> None:
    with pytest.raises(DiscoveryError):
        parse_fleet(b"[]")  # type: ignore[arg-type]


def test_the_limits_are_exact() -> None:
    entries = [FleetEntry(f"r{i}", "", "wss://h/t", "serving") for i in range(MAX_ENTRIES)]
    assert parse_fleet(encode_fleet(entries)) == entries
    with pytest.raises(DiscoveryError):
        encode_fleet([*entries, FleetEntry("one-more", "", "wss://h/t", "serving")])
    long_url = "wss://h/" + "p" * 200
    fat = [FleetEntry(f"r{i}", "z" * 63, long_url, "serving") for i in range(MAX_ENTRIES)]
    with pytest.raises(DiscoveryError, match="bytes"):
        encode_fleet(fat)  # 32 entries of ~330 bytes: over 8 KiB
    padded = encode_fleet(entries[:1])
    assert parse_fleet(padded + " " * (MAX_HEADER_BYTES - len(padded))) == entries[:1]
    with pytest.raises(DiscoveryError):
        parse_fleet(padded + " " * (MAX_HEADER_BYTES - len(padded) + 1))


@pytest.mark.parametrize("entries", [[], [A, A], [FleetEntry("a", "", "ws://h/t", "serving")],
                                     [FleetEntry("a", "", "wss://h/t", "gone")]])
def test_encode_refuses_what_parse_would(entries: list[FleetEntry]) -> None:
    with pytest.raises(ValueError):
        encode_fleet(entries)


def test_encode_refuses_other_objects() -> None:
    with pytest.raises(DiscoveryError):
        encode_fleet([{"name": "a"}])  # type: ignore[list-item]


# --- property tests -----------------------------------------------------------------------------------

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
zones = st.sampled_from(["", "eu-1", "eu-2", "us.3", "z"])
hosts = st.one_of(st.from_regex(r"\A[a-z0-9][a-z0-9.-]{0,30}\Z"), st.just("[fd00::1]"), st.just("127.0.0.1"))
urls = st.builds(lambda h, p, path: f"wss://{h}{p}{path}", hosts,
                 st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
                 st.from_regex(r"\A(/[A-Za-z0-9._~-]{0,12}){0,3}\Z"))
states = st.sampled_from(["serving", "draining"])
entries_st = st.lists(st.builds(FleetEntry, names, zones, urls, states), min_size=1, max_size=MAX_ENTRIES,
                      unique_by=lambda e: e.name)


@given(entries_st)
def test_round_trip(entries: list[FleetEntry]) -> None:
    assert parse_fleet(encode_fleet(entries)) == entries


@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_discovery_error(text: str) -> None:
    try:
        parse_fleet(text)
    except DiscoveryError:
        pass


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
entry_like = st.fixed_dictionaries({"name": st.one_of(names, json_values), "zone": st.one_of(zones, json_values),
                                    "url": st.one_of(urls, json_values), "state": st.one_of(states, json_values)})


@settings(max_examples=300)
@given(st.lists(st.one_of(entry_like, json_values), max_size=6))
def test_any_json_parses_or_is_a_discovery_error(value: list[object]) -> None:
    try:
        result = parse_fleet(json.dumps(value))
    except DiscoveryError:
        return
    assert result and all(isinstance(e, FleetEntry) for e in result)
    assert parse_fleet(encode_fleet(result)) == result


@given(entries_st, st.data())
def test_mutated_bytes_parse_or_are_a_discovery_error(entries: list[FleetEntry], data: st.DataObject) -> None:
    text = encode_fleet(entries)
    at = data.draw(st.integers(0, len(text) - 1))
    chunk = data.draw(st.text(max_size=3))
    try:
        parse_fleet(text[:at] + chunk + text[at + 1:])
    except DiscoveryError:
        pass


@given(entries_st, st.integers(-1, 10), st.data())
def test_choose_respects_k_state_avoid_and_current(entries: list[FleetEntry], k: int, data: st.DataObject) -> None:
    all_names = [e.name for e in entries]
    avoid = set(data.draw(st.lists(st.sampled_from(all_names), max_size=3)))
    current = data.draw(st.one_of(st.none(), st.sampled_from(all_names)))
    keep = set(data.draw(st.lists(st.sampled_from(all_names), max_size=3)))
    chosen = choose_relays(entries, k, current=current, avoid=avoid, keep=keep)
    assert len(chosen) <= max(k, 0)
    assert len({e.name for e in chosen}) == len(chosen)
    assert all(e.serving and e.name not in avoid for e in chosen)
    eligible = [e for e in entries if e.serving and e.name not in avoid]
    assert len(chosen) == min(max(k, 0), len(eligible))
    by_name = {e.name: e for e in entries}
    if k > 0 and current is not None and by_name[current].serving and current not in avoid:
        assert chosen[0].name == current
    # Distinct zones whenever enough are available among the eligible relays.
    distinct = len({e.zone for e in eligible})
    assert len({e.zone for e in chosen}) == min(len(chosen), distinct) or keep
    assert choose_relays(entries, k, current=current, avoid=avoid, keep=keep) == chosen  # deterministic


def test_choose_prefers_new_zones_then_names() -> None:
    fleet = [FleetEntry("c", "z1", "wss://c/t", "serving"), FleetEntry("b", "z1", "wss://b/t", "serving"),
             FleetEntry("a", "z2", "wss://a/t", "serving"), FleetEntry("d", "z3", "wss://d/t", "draining"),
             FleetEntry("e", "z3", "wss://e/t", "serving")]
    assert [e.name for e in choose_relays(fleet, 2, current="c", avoid=set())] == ["c", "a"]
    assert [e.name for e in choose_relays(fleet, 3, current="c", avoid=set())] == ["c", "a", "e"]
    assert [e.name for e in choose_relays(fleet, 5, current="c", avoid=set())] == ["c", "a", "e", "b"]
    assert [e.name for e in choose_relays(fleet, 2, current="d", avoid={"a"})] == ["b", "e"]
    assert [e.name for e in choose_relays(fleet, 2, current=None, avoid=set(), keep={"b"})] == ["b", "a"]
    assert choose_relays(fleet, 0, current="c", avoid=set()) == []
    assert choose_relays([], 3, current="c", avoid=set()) == []


def test_choose_avoids_a_run_not_the_relay_restarted() -> None:
    fleet = [FleetEntry("a", "z1", "wss://a/t", "serving", "t2"), FleetEntry("b", "z2", "wss://b/t", "serving", "t1"),
             FleetEntry("c", "z3", "wss://c/t", "serving"), FleetEntry("d", "z4", "wss://d/t", "draining", "t9")]
    runs = {"a": "t1", "b": "t1", "c": "t1", "d": "t1"}
    # a restarted (t2 is not the avoided t1); b is the avoided run; c sent no since: its name decides; d drains.
    assert [e.name for e in choose_relays(fleet, 4, current=None, avoid=runs)] == ["a"]
    assert [e.name for e in choose_relays(fleet, 4, current="a", avoid={"a": ""})] == ["b", "c"]  # no run: the name
    assert [e.name for e in choose_relays(fleet, 4, current=None, avoid={"a"})] == ["b", "c"]  # names, as before
    assert [e.name for e in choose_relays(fleet, 4, current=None, avoid={})] == ["a", "b", "c"]
