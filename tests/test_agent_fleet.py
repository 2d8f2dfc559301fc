"""The agent's tunnels to several relays of a fleet (tunnel_agent.fleet), against fake relays in this event
loop: aiohttp WebSocket servers over mutual TLS on 127.0.0.1 that speak the mux as the relay and answer the
upgrade with Tunnel-Fleet, listing each other (the answering relay first), and answer GET /fleet/v1/relays
with the same list as it is now. Like a relay, one sends an agent's older tunnel GOAWAY when a newer one of
the same agent name arrives; one can be killed (listener closed, connections aborted, no GOAWAY). A
balancer, when a test wants one, is a TCP forwarder on 127.0.0.1 that the test points at one relay or
another."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from relay import pki
from tests.support.ports import free_port
from tunnel_agent import metrics
from tunnel_agent.agent import Agent
from tunnel_agent.cli import _human
from tunnel_agent.config import load_agent_settings
from tunnel_agent.fleetpoll import FleetListError, FleetPoll, fetch_fleet
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.discovery import AGENT_HEADER, FLEET_HEADER, FLEET_LIST_PATH, FleetEntry, encode_fleet
from tunnel_core.frames import OpenPayload
from tunnel_core.mux import Mux, Role
from tunnel_link.aio import cancel_and_wait
from tunnel_link.errors import StreamResetError
from tunnel_link.session import MAX_MESSAGE_IN, MuxSession, TunnelStream
from tunnel_link.tls import server_context
from tunnel_link.transport import SUBPROTOCOLS

SITE = "hospital-a"
AGENT_NAME = "gw-1"
WAIT = 15.0  # seconds any one wait of these tests may take


class FakeRelay:
    """One relay of the fleet: accepts tunnels, keeps their sessions, answers with ``fleet()``'s header."""

    def __init__(self, name: str, zone: str, state_dir: Path) -> None:
        self.name, self.zone, self.port = name, zone, free_port()
        self.state_dir = state_dir
        self.url = f"wss://127.0.0.1:{self.port}/tunnel"
        self.sessions: list[MuxSession] = []
        self.agents: list[str | None] = []  # the Tunnel-Agent header of each upgrade
        self.reports: list[bytes] = []
        self.header: Callable[[], str | None] = lambda: None
        self.new_session = asyncio.Event()
        self.state, self.since = "serving", "run-1"  # what the fleet's lists say of this relay
        self.hold = False  # echo the streams agents open (until they end them) instead of refusing them
        self.replace_first = 0.0  # seconds between the GOAWAY to an agent's older tunnel and the 101
        self.listing = True  # answer GET /fleet/v1/relays with the list (else 404, as a relay without one)
        self.list_requests = 0
        self._site: web.TCPSite | None = None
        self._transports: list[asyncio.BaseTransport] = []

    @property
    def entry(self) -> FleetEntry:
        return FleetEntry(self.name, self.zone, self.url, self.state, self.since)

    def live(self) -> list[MuxSession]:
        return [s for s in self.sessions if not s.ended.is_set()]

    async def start(self, stack: AsyncExitStack) -> None:
        app = web.Application()
        app.router.add_get("/tunnel", self._tunnel)
        app.router.add_get(FLEET_LIST_PATH, self._fleet_list)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        ctx = server_context(self.state_dir / "relay.crt", self.state_dir / "relay.key", self.state_dir / "ca.crt")
        self._site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx)
        await self._site.start()
        stack.push_async_callback(self._close_all)

    async def kill(self) -> None:
        """As SIGKILL: the listener closes and every connection is aborted, without a GOAWAY."""
        assert self._site is not None
        await self._site.stop()
        for transport in self._transports:
            transport.abort()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(s.ended.wait() for s in self.sessions))

    async def _fleet_list(self, request: web.Request) -> web.Response:
        self.list_requests += 1
        if not self.listing or (listed := self.header()) is None:
            raise web.HTTPNotFound(text="this relay lists no fleet\n")
        return web.Response(text=listed, content_type="application/json")

    async def _close_all(self) -> None:
        await asyncio.gather(*(s.close(ErrorCode.GOING_AWAY, "test over") for s in self.live()))

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        agent = request.headers.get(AGENT_HEADER)
        assert request.transport is not None
        self._transports.append(request.transport)
        previous = [s for s, name in zip(self.sessions, self.agents, strict=True) if name == agent]
        self.agents.append(agent)
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_IN, autoping=True, protocols=SUBPROTOCOLS)
        if (header := self.header()) is not None:
            ws.headers[FLEET_HEADER] = header
        if self.replace_first:
            self._replace(previous)
            await asyncio.sleep(self.replace_first)
        await ws.prepare(request)

        async def on_stream(stream: TunnelStream) -> None:
            if not self.hold:
                await stream.reset(ErrorCode.UNKNOWN_ROUTE)
                return
            try:
                while data := await stream.read():
                    stream.send(data)
                    stream.consumed(len(data))
            except StreamResetError:
                pass

        session = MuxSession(ws, Mux(Role.RELAY), heartbeat_interval=5.0, on_stream=on_stream, label=self.name,
                             on_report=self.reports.append)
        self.sessions.append(session)
        self.new_session.set()
        self._replace(previous)
        await session.run()
        return ws

    @staticmethod
    def _replace(previous: list[MuxSession]) -> None:
        """As a relay does: the agent's older tunnel takes no new stream and closes once idle."""
        for older in previous:
            if not older.ended.is_set():
                older.go_away(ErrorCode.GOING_AWAY, "replaced by a newer connection from the agent")

    async def going_away(self) -> MuxSession:
        """GOAWAY GOING_AWAY on the live tunnel, which stays open (a relay that drains)."""
        (session,) = self.live()
        session.mux.go_away(ErrorCode.GOING_AWAY)
        await session.flush()
        return session


def fleet_of(relays: list[FakeRelay]) -> None:
    """Each relay lists the fleet, itself first."""
    for relay in relays:
        relay.header = lambda me=relay: encode_fleet([me.entry, *(r.entry for r in relays if r is not me)])


class Balancer:
    """A TCP forwarder on 127.0.0.1 to ``to``'s port (TLS goes through untouched), as haproxy in front of
    the fleet; the test points it elsewhere by setting ``to``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"wss://127.0.0.1:{self.port}/tunnel"
        self.to: FakeRelay | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self, stack: AsyncExitStack) -> None:
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)

        async def stop() -> None:
            server.close()
            for task in list(self._pipes):
                await cancel_and_wait(task)
            await server.wait_closed()

        stack.push_async_callback(stop)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self.to is not None
        self._pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.to.port)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._pipes.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA, one server certificate shared by the fleet, one site certificate."""
    root = tmp_path_factory.mktemp("fleet-pki")
    pki.init_ca(root / "relay")
    pki.issue_server_cert(root / "relay", ["127.0.0.1"])
    pki.issue_site_cert(root / "relay", SITE, root / "agent")
    return root


def agent_for(certs: Path, tmp_path: Path, relay_url: str, tunnels: int) -> Agent:
    config = tmp_path / "agent.toml"
    agent_dir = certs / "agent"
    config.write_text("\n".join([
        f'relay_url = "{relay_url}"', f'state_dir = "{tmp_path / "state"}"', f'agent_name = "{AGENT_NAME}"',
        f'cert_file = "{agent_dir / "agent.crt"}"', f'key_file = "{agent_dir / "agent.key"}"',
        f'ca_file = "{agent_dir / "ca.crt"}"', "connect_timeout = 5.0", "backoff_initial = 0.05",
        "backoff_max = 0.5", "[status]", 'host = "127.0.0.1"', f"port = {free_port()}",
        "[listener]", "enabled = false", "[fleet]", f"tunnels = {tunnels}"]) + "\n")
    return Agent(load_agent_settings(config), rand=lambda: 0.0)


@asynccontextmanager
async def running(certs: Path, tmp_path: Path, zones: list[str], *, tunnels: int, fleet: bool = True,
                  balancer: Balancer | None = None) -> AsyncIterator[tuple[Agent, list[FakeRelay]]]:
    """Relays r-a, r-b... in ``zones`` (r-a is relay_url, or where ``balancer``, relay_url then, first
    forwards to) and an agent keeping ``tunnels`` tunnels; all ended on the way out, also on failure."""
    relays = [FakeRelay(f"r-{chr(ord('a') + i)}", zone, certs / "relay") for i, zone in enumerate(zones)]
    if fleet:
        fleet_of(relays)
    async with AsyncExitStack() as stack:
        for relay in relays:
            await relay.start(stack)
        if balancer is not None:
            balancer.to = relays[0]
            await balancer.start(stack)
        agent = agent_for(certs, tmp_path, balancer.url if balancer else relays[0].url, tunnels)
        task = asyncio.create_task(agent.connect_forever())

        async def stop() -> None:
            agent.stop()
            async with asyncio.timeout(WAIT):
                await agent.fleet.close("test over")
            await cancel_and_wait(task)

        stack.push_async_callback(stop)
        yield agent, relays


async def until(check: Callable[[], object], what: str, *, within: float = WAIT) -> None:
    try:
        async with asyncio.timeout(within):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {within:g} s: {what}") from None


async def until_echoed(stream: TunnelStream, expected: bytes) -> None:
    got = b""
    async with asyncio.timeout(WAIT):
        while len(got) < len(expected):
            data = await stream.read()
            assert data, "the stream ended"
            stream.consumed(len(data))
            got += data
    assert got == expected


def connected(relay: FakeRelay) -> bool:
    return bool(relay.live())


async def test_two_tunnels_to_two_relays_in_different_zones(certs, tmp_path):
    async with running(certs, tmp_path, ["z1", "z1", "z2"], tunnels=2) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(c), "a tunnel to r-a (relay_url) and one to r-c (zone z2)")
        assert not b.sessions  # r-b shares r-a's zone
        assert set(agent.fleet.extras) == {"r-c"}
        assert a.agents[0] == c.agents[0] == AGENT_NAME
        # Streams the agent opens take the tunnel with the fewest streams.
        first = agent.fleet.pick()
        assert first is not None
        stream = await first.open_stream(OpenPayload(TargetKind.CALLED_AE, "CLOUD", "MODALITY"))
        second = agent.fleet.pick()
        assert second is not None and second is not first
        await stream.release()
        # Health reports go to every live tunnel.
        agent.health.send_report()
        await until(lambda: a.reports and c.reports, "a REPORT on both tunnels")
        status = agent.status()
        rows = {row["relay"]: row for row in status["tunnels"]}
        assert set(rows) == {"relay_url", "r-c"}
        assert rows["relay_url"]["reached"] == "r-a" and rows["relay_url"]["state"] == "connected"
        assert rows["r-c"]["host"] == "127.0.0.1" and rows["r-c"]["connects"] == 1
        assert status["state"] == "connected" and status["relay_url"] == a.url  # the primary's, as before
        assert agent.snapshot().live_tunnels == 2
        scraped = generate_latest(metrics.registry_for(agent.snapshot, agent.tracker)).decode()
        assert "\ndicom_tunnel_tunnels_live 2.0\n" in scraped
        text = _human(status)  # tunnel-agent status
        assert "tunnels:      2 live" in text and "relay_url -> r-a" in text and "\n  r-c " in text


async def test_going_away_opens_a_replacement_before_the_draining_tunnel_closes(certs, tmp_path):
    async with running(certs, tmp_path, ["z1", "z1", "z2"], tunnels=2) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(c), "tunnels to r-a and r-c")
        draining = await c.going_away()
        await until(lambda: connected(b) and agent.fleet.connected == 2, "a replacement tunnel to r-b")
        assert not draining.ended.is_set()  # make before break: r-c's tunnel is still up
        assert set(agent.fleet.extras) == {"r-b"}
        assert [t.name for t in agent.fleet.retired] == ["r-c"]
        rows = [(row["relay"], row["state"]) for row in agent.status()["tunnels"]]
        assert rows == [("relay_url", "connected"), ("r-b", "connected"), ("r-c", "draining")]
        assert agent.fleet.pick() is not None and agent.fleet.pick() is not agent.fleet.retired[0].session
        # The relay ends its drain: the tunnel is gone and not dialed again.
        await draining.close(ErrorCode.GOING_AWAY, "drain over")
        await until(lambda: not agent.fleet.retired, "r-c's tunnel ended and forgotten")
        assert len(c.sessions) == 1  # and not dialed again
        assert len(agent.fleet.sessions()) == 2


async def test_a_relay_that_goes_away_and_closes_at_once_is_not_dialed_again(certs, tmp_path):
    async with running(certs, tmp_path, ["z1", "z1", "z2"], tunnels=2) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(c), "tunnels to r-a and r-c")
        c.live()[0].close_nowait(ErrorCode.GOING_AWAY, "replaced")  # GOAWAY, then the close at once
        await until(lambda: connected(b), "a replacement tunnel to r-b")
        await until(lambda: not agent.fleet.retired, "r-c's tunnel forgotten")
        assert len(c.sessions) == 1 and set(agent.fleet.extras) == {"r-b"}


async def test_a_draining_primary_gets_a_stand_in_then_dials_relay_url_again(certs, tmp_path):
    async with running(certs, tmp_path, ["z1", "z2", "z3"], tunnels=2) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(b), "tunnels to r-a (relay_url) and r-b")
        draining = await a.going_away()
        await until(lambda: connected(c), "a stand-in tunnel to r-c while the primary drains")
        assert not draining.ended.is_set() and len(a.sessions) == 1  # relay_url is not dialed meanwhile
        rows = [(row["relay"], row["state"]) for row in agent.status()["tunnels"]]
        assert rows == [("relay_url", "draining"), ("r-b", "connected"), ("r-c", "connected")]
        assert agent.fleet.pick() is not agent.tunnel.session
        # The relay ends its drain: the primary dials relay_url again, and one extra tunnel goes (the
        # stand-in: both carry nothing), closed by the agent's GOAWAY once idle.
        await draining.close(ErrorCode.GOING_AWAY, "drain over")
        await until(lambda: len(a.live()) == 1 and len(a.sessions) == 2, "the primary back through relay_url")
        await until(lambda: not connected(c) and not agent.fleet.retired, "the stand-in let go")
        assert set(agent.fleet.extras) == {"r-b"} and connected(b) and len(b.sessions) == 1


async def test_a_drained_relay_restarted_is_used_again_at_once(certs, tmp_path):
    """A rolling restart: r-b drains and restarts, then r-a (relay_url). The fresh list the primary brings
    back names r-b's new run: the agent dials it again at once, not once the 60 s of avoidance are over."""
    async with running(certs, tmp_path, ["z1", "z2"], tunnels=2) as (agent, (a, b)):
        a.listing = b.listing = False  # the upgrade's list alone, not one fetched on demand (tested below)
        await until(lambda: connected(a) and connected(b), "tunnels to r-a (relay_url) and r-b")
        b.state = "draining"
        draining = await b.going_away()
        await until(lambda: [t.name for t in agent.fleet.retired] == ["r-b"], "r-b's tunnel retired")
        assert agent.fleet.avoided() == {"r-b": "run-1"}
        await draining.close(ErrorCode.GOING_AWAY, "drain over")
        b.state, b.since = "serving", "run-2"  # r-b restarted
        a.state = "draining"
        draining = await a.going_away()
        await until(lambda: agent.fleet.avoided() == {"r-a": "run-1", "r-b": "run-1"}, "r-a avoided too")
        assert len(b.sessions) == 1  # the list the agent holds still names r-b's drained run
        a.state, a.since = "serving", "run-2"
        await draining.close(ErrorCode.GOING_AWAY, "drain over")  # r-a restarted: the primary dials it again
        await until(lambda: len(a.live()) == 1 and len(a.sessions) == 2, "the primary back through relay_url")
        await until(lambda: connected(b), "a tunnel to r-b's new run", within=5.0)
        assert set(agent.fleet.extras) == {"r-b"} and agent.fleet.avoided() == {"r-b": "run-1"}
        assert agent.fleet.connected == 2


@pytest.mark.parametrize("replace_first", [0.0, 0.5], ids=["upgrade-first", "goaway-first"])
async def test_the_primary_landing_on_the_extras_relay_moves_the_extra(certs, tmp_path, replace_first):
    """Through the balancer the primary reaches r-b, where the extra tunnel is: r-b keeps serving and is not
    avoided, the extra moves to another relay, and its stream in flight finishes where it is."""
    balancer = Balancer()
    async with running(certs, tmp_path, ["z1", "z2", "z3"], tunnels=2, balancer=balancer) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(b), "tunnels to r-a (through the balancer) and r-b")
        assert agent.tunnel.relay == "r-a" and set(agent.fleet.extras) == {"r-b"}
        b.hold, b.replace_first = True, replace_first
        old = agent.fleet.extras["r-b"]
        assert old.session is not None
        stream = await old.session.open_stream(OpenPayload(TargetKind.CALLED_AE, "CLOUD", "MODALITY"))
        stream.send(b"in flight")
        await until(lambda: b.live()[0].active_streams == 1, "the stream on r-b")
        balancer.to = b
        draining = await a.going_away()  # r-a drains: a stand-in to r-c, r-a avoided
        await until(lambda: connected(c), "a stand-in tunnel to r-c")
        await draining.close(ErrorCode.GOING_AWAY, "drain over")  # the primary dials the balancer: r-b
        await until(lambda: len(b.sessions) == 2 and agent.tunnel.relay == "r-b" and agent.fleet.connected == 2
                    and set(agent.fleet.extras) == {"r-c"}, "the primary on r-b, the extra on r-c")
        assert "r-b" not in agent.fleet.avoided() and set(agent.fleet.avoided()) == {"r-a"}
        assert [t.name for t in agent.fleet.retired] == ["r-b"]
        # The old tunnel is not cut while its stream goes on: what the stream sends comes back.
        assert stream.send(b" and more") == len(b" and more")
        await until_echoed(stream, b"in flight and more")
        assert not b.sessions[0].ended.is_set()
        await stream.release()
        await until(lambda: b.sessions[0].ended.is_set() and not agent.fleet.retired, "the old tunnel closed")
        assert len(b.live()) == 1 and connected(c) and len(b.sessions) == 2 and not a.live()
        assert {agent.tunnel.relay, *agent.fleet.extras} == {"r-b", "r-c"} and agent.fleet.connected == 2
        assert set(agent.fleet.avoided()) == {"r-a"}  # also after the relay's GOAWAY to the old tunnel


async def test_one_tunnel_is_one_tunnel(certs, tmp_path):
    async with running(certs, tmp_path, ["z1", "z2"], tunnels=1) as (agent, (a, b)):
        await until(lambda: connected(a), "the tunnel to relay_url")
        await asyncio.sleep(1.5)  # a negative: more than the fleet supervisor's round
        assert not b.sessions and agent.fleet.extras == {}
        assert [row["relay"] for row in agent.status()["tunnels"]] == ["relay_url"]
        assert agent.snapshot().live_tunnels == 1


async def test_a_malformed_fleet_leaves_the_primary_only(certs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    async with running(certs, tmp_path, ["z1", "z2"], tunnels=2, fleet=False) as (agent, (a, b)):
        secret = "S" * 200
        a.header = lambda: '[{"name":"r-b","zone":"' + secret + '","url":"' + b.url + '","state":"serving"}]'
        await until(lambda: connected(a), "the tunnel to relay_url")
        await asyncio.sleep(1.5)  # a negative: more than the fleet supervisor's round
        assert not b.sessions and agent.fleet.extras == {} and agent.fleet.entries == []
        warnings = [r.getMessage() for r in caplog.records if FLEET_HEADER in r.getMessage()]
        assert len(warnings) == 1 and "ignored" in warnings[0]
        assert "S" * 40 in warnings[0] and "S" * 80 not in warnings[0]  # at most 80 characters of it
        assert agent.tunnel.relay is None


async def test_a_stale_list_is_fetched_again_while_short_of_tunnels(certs, tmp_path):
    """r-c drains (avoided by its run) and r-b, the replacement, drains and stops for good: the agent holds
    the primary alone, and the lists it heard name r-c draining. r-c restarts, and no upgrade happens on
    the primary: the agent fetches the list through relay_url and dials r-c's new run."""
    async with running(certs, tmp_path, ["z1", "z1", "z2"], tunnels=2) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(c), "tunnels to r-a (relay_url) and r-c")
        c.state = "draining"
        draining = await c.going_away()
        await until(lambda: connected(b) and set(agent.fleet.extras) == {"r-b"}, "the replacement on r-b")
        assert agent.fleet.avoided() == {"r-c": "run-1"}
        await draining.close(ErrorCode.GOING_AWAY, "drain over")
        b.state = "draining"
        await b.going_away()
        await until(lambda: not agent.fleet.extras, "r-b's tunnel retired")
        await b.kill()  # and r-b is gone for good
        await until(lambda: not agent.fleet.retired, "r-b's tunnel ended")
        assert set(agent.fleet.avoided()) == {"r-b", "r-c"} and len(c.sessions) == 1
        c.state, c.since = "serving", "run-2"  # r-c restarted; the primary's tunnel stays up
        # Both ends: the relay's side of the tunnel is up a moment before the agent counts it.
        await until(lambda: connected(c) and agent.fleet.connected == 2, "a tunnel to r-c's new run", within=5.0)
        assert len(c.sessions) == 2 and len(a.sessions) == 1 and a.list_requests >= 1
        assert set(agent.fleet.extras) == {"r-c"}


async def test_an_extra_tunnel_on_a_killed_relay_is_given_up(certs, tmp_path):
    """r-b is killed (no GOAWAY) and still listed as serving: the extra tunnel fails to reconnect, is given
    up (r-b's run avoided, no longer counted) and replaced on r-c."""
    balancer = Balancer()
    async with running(certs, tmp_path, ["z1", "z2", "z3"], tunnels=2, balancer=balancer) as (agent, (a, b, c)):
        await until(lambda: connected(a) and connected(b), "tunnels to r-a (through the balancer) and r-b")
        assert not c.sessions
        await b.kill()
        await until(lambda: connected(c), "a tunnel to r-c", within=5.0)
        await until(lambda: agent.fleet.connected == 2, "two tunnels up")
        assert b.state == "serving" and set(agent.fleet.extras) == {"r-c"}
        assert agent.fleet.avoided() == {"r-b": "run-1"} and not agent.fleet.retired
        assert {row["relay"] for row in agent.status()["tunnels"]} == {"relay_url", "r-c"}


@pytest.mark.parametrize("tunnels", [1, 2])
async def test_the_list_is_fetched_only_while_short_of_tunnels(certs, tmp_path, tunnels):
    """r-b lists itself draining: with two tunnels wanted the agent holds one and fetches the list until it
    names r-b serving, then holds two and fetches no more; with one tunnel it never fetches, even while its
    one tunnel drains."""
    async with running(certs, tmp_path, ["z1", "z2"], tunnels=tunnels) as (agent, (a, b)):
        b.state = "draining"  # before the agent's first upgrade: its task has not run yet

        def fetched() -> int:
            return a.list_requests + b.list_requests

        await until(lambda: connected(a) and agent.fleet.entries, "the tunnel to relay_url, with the list")
        if tunnels == 2:
            await until(lambda: fetched() >= 1, "a fetch of the list", within=5.0)
            assert not b.sessions
            b.state = "serving"
            await until(lambda: connected(b), "a tunnel to r-b, once a fetched list names it serving", within=5.0)
            seen = fetched()
        else:
            await a.going_away()  # the one tunnel drains: none takes new streams
        await asyncio.sleep(2.5)  # a negative: more than the poll's period
        assert fetched() == (seen if tunnels == 2 else 0)


async def test_fetching_the_list_says_why_it_failed_once_per_streak(certs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    async with running(certs, tmp_path, ["z1", "z2"], tunnels=2) as (agent, (a, b)):
        assert [e.name for e in await fetch_fleet(agent.settings)] == ["r-a", "r-b"]  # relay_url's first
        a.listing = False
        with pytest.raises(FleetListError, match="HTTP 404: the relay gives agents no list"):
            await fetch_fleet(agent.settings)
        heard: list[list[FleetEntry]] = []
        poll = FleetPoll(agent.settings, short=lambda: True, heard=heard.append, period=0.05)
        task = asyncio.create_task(poll.run())
        try:
            await until(lambda: poll.fetches >= 3, "three fetches")
            failed = [r.getMessage() for r in caplog.records if "fleet list" in r.getMessage()]
            assert len(failed) == 1 and "HTTP 404" in failed[0] and not heard
            a.listing = True
            await until(lambda: heard, "a list fetched")
            assert [e.name for e in heard[0]] == ["r-a", "r-b"]
            assert sum("fetched again" in r.getMessage() for r in caplog.records) == 1
        finally:
            await cancel_and_wait(task)
