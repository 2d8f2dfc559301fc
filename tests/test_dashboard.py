"""The relay's ops dashboard (relay/dashboard.py): its pure parts, its login and headers against a real relay
process, the PHI canary, and a real headless Chromium that logs in and reads what the pages show.

The stack (one per module): a relay with two sites, `hospital-a` with a connected agent in front of a
storescp "PACS", and `hospital-b` that never connects. The Chromium test compares the rendered rows with
`relay.status()` (the site condition is the relay's decision; whether hospital-a is "up" or "degraded"
depends on whether its agent sends health reports, and the test accepts whatever the relay says).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay import dashboard
from relay.dashboard import (
    SESSION_COOKIE,
    OutcomeHistory,
    SessionStore,
    TrafficMeter,
    classify_outcome,
    is_data_path,
)
from relay.sites import SiteTable
from tests.support.chromium import DevTools, start_chromium
from tests.support.dcmtk import start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_core.dicom import AssociateRequest
from tunnel_core.ratelimit import RateLimiter, RateLimits
from tunnel_demo.dataset import PHI_PATIENT_ID, PHI_PATIENT_NAME
from tunnel_link.associations import AssociationTracker

UP_SITE, DOWN_SITE = "hospital-a", "hospital-b"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
PAGE_TIMEOUT = 30.0
URL_IN_TEXT = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
ATTRIBUTE_URL = re.compile(r"""\b(?:src|href|action)\s*=\s*["']([^"']*)["']""")


# --- pure parts ------------------------------------------------------------------------------------------


def test_sessions_expire_are_bounded_and_end():
    store = SessionStore(ttl=100.0, max_sessions=3)
    first, session = store.create(now=0.0)
    assert store.get(first, now=99.0) == session
    assert store.get(first, now=100.0) is None  # expired, and forgotten
    assert len(store) == 0
    ids = [store.create(now=200.0)[0] for _ in range(5)]
    assert len(store) == 3
    assert store.get(ids[0], 201.0) is None and store.get(ids[-1], 201.0) is not None  # the oldest went
    store.end(ids[-1])
    assert store.get(ids[-1], 201.0) is None
    assert store.get(None, 0.0) is None and store.get("", 0.0) is None and store.get("guess", 201.0) is None


def test_session_ids_and_csrf_tokens_are_random_and_distinct():
    store = SessionStore()
    made = [store.create(0.0) for _ in range(50)]
    values = {sid for sid, _ in made} | {s.csrf for _, s in made}
    assert len(values) == 100 and all(len(v) >= 40 for v in values)


def test_outcomes_are_classified():
    assert classify_outcome("completed") == "completed"
    for rejected in ("rejected:called_ae_unknown", "refused:destination_unreachable", "artim-timeout",
                     "closed-before-associate", "bad-first-pdu:PduError", "destination-unreachable"):
        assert classify_outcome(rejected) == "rejected", rejected
    for failed in ("aborted:socket-error", "reset:protocol_error", "internal-error"):
        assert classify_outcome(failed) == "failed", failed


def test_outcome_history_keeps_bounded_buckets_of_deltas():
    history = OutcomeHistory(interval=10.0, buckets=3)
    totals = {"completed": 0}
    history.sample(totals, 0.0)
    totals = {"completed": 2, "rejected:site_offline": 1}
    history.sample(totals, 5.0)  # less than an interval after the last sample: not kept
    history.sample(totals, 10.0)
    series = history.series({"completed": 5, "rejected:site_offline": 1}, 12.0)
    assert [(b["start"], b["end"]) for b in series] == [(0.0, 10.0), (10.0, 12.0)]
    assert series[0]["completed"] == 2 and series[0]["rejected"] == 1
    assert series[0]["reasons"] == {"completed": 2, "rejected:site_offline": 1}
    assert series[1]["completed"] == 3 and series[1]["reasons"] == {"completed": 3}
    for t in range(20, 200, 10):
        history.sample({"completed": t}, float(t))
    assert len(history.series({"completed": 200}, 200.0)) == 4  # 3 buckets + the one running now


def _request(calling: str, called: str) -> AssociateRequest:
    return AssociateRequest(called_ae=called, calling_ae=calling, pdu=b"")


def test_traffic_meter_counts_ended_associations_per_site_and_direction():
    tracker = AssociationTracker("t")
    meter = TrafficMeter(window=10.0, recent=2)
    into = tracker.start("cloud-to-site", _request("CLOUDAI", "HOSP_PACS"))
    into.site = "a"
    meter.observe(tracker.active, 0.0, ["a", "b"])
    assert meter.rate("a") is None  # one sample: no rate yet
    into.bytes_from_caller, into.bytes_to_caller = 1000, 100
    tracker.finish(into, "completed")
    out = tracker.start("site-to-cloud", _request("MODALITY", "CLOUD"))
    out.site = "a"
    out.bytes_from_caller = 50
    meter.observe(tracker.active, 2.0, ["a", "b"])
    assert meter.totals("a") == (1000 + 0, 100 + 50)  # to the site: what the cloud caller sent
    assert meter.rate("a") == (500.0, 75.0)
    assert meter.totals("b") == (0, 0) and meter.rate("b") == (0.0, 0.0)
    assert [r["outcome"] for r in meter.recent("a")] == ["completed"]
    out.bytes_to_caller = 4000
    tracker.finish(out, "aborted:socket-closed")
    meter.observe(tracker.active, 4.0, ["a"])
    assert meter.totals("a") == (1000 + 4000, 100 + 50)
    assert [r["outcome"] for r in meter.recent("a")] == ["aborted:socket-closed", "completed"]
    for t in range(5, 40):
        meter.observe(tracker.active, float(t), ["a"])
    assert meter.rate("a") == (0.0, 0.0)  # nothing moved in the last window


async def test_wrong_tokens_throttle_their_source_but_the_right_token_always_logs_in():
    """The login handler with its limiter wired in, in process (a stand-in relay: the login reads no relay
    state); one source on 127.0.0.1, another on 127.0.0.2. The real relay process: test_admin_hardening.py."""
    limiter = RateLimiter(RateLimits(per_source_burst=2, per_source_rate=1e-6, total_burst=1000))
    board = dashboard.Dashboard(SimpleNamespace(), SiteTable([], []), AssociationTracker("t"), "right-token", limiter)
    app = web.Application()
    dashboard.add_routes(app, board)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client, \
            TestClient(client.server, connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        for _ in range(2):
            response = await client.post("/login", data={"token": "wrong"}, allow_redirects=False)
            assert response.status == 401
        response = await client.post("/login", data={"token": "wrong"}, allow_redirects=False)
        assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
        assert "Set-Cookie" not in response.headers and "Too many wrong tokens" in await response.text()
        response = await other.post("/login", data={"token": "wrong"}, allow_redirects=False)
        assert response.status == 401  # another source: its own bucket
        response = await client.post("/login", data={"token": "right-token"}, allow_redirects=False)
        assert response.status == 303 and SESSION_COOKIE in response.cookies  # throttled, yet let in
        assert limiter.throttled == 1


def test_only_the_dashboard_data_api_is_a_data_path():
    assert is_data_path("/api/dashboard") and is_data_path("/api/dashboard/sites/x")
    assert not is_data_path("/api/dashboardx") and not is_data_path("/api/status") and not is_data_path("/")


# --- a real relay process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(module_procs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    pacs_port = free_port()
    start_storescp(module_procs, pacs_port, "PACS", root / "pacs")
    relay = make_relay(root / "relay", listener_routes=[ListenerRoute("HOSP_PACS", UP_SITE, "pacs")],
                       sites={UP_SITE: [SiteDest("CLOUD", free_port())], DOWN_SITE: []})
    # A spool destination too, so its summary travels in the health report to the site page.
    agent = make_agent(relay, UP_SITE, root / "agent", routes=[AgentRoute("pacs", pacs_port, "PACS")],
                       extra=[f'state_dir = "{root / "agent" / "state"}"', 'agent_name = "gw-1"'],
                       sections=["[[destinations]]", 'name = "cloud-spool"', 'called_ae = "CLOUDSPOOL"',
                                 'mode = "spool"'])
    start_relay(module_procs, relay)
    start_agent(module_procs, agent, relay)
    return relay, agent


@contextlib.asynccontextmanager
async def browser_like(relay, headers: dict[str, str] | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client that keeps cookies for 127.0.0.1 (aiohttp's jar ignores IP hosts unless told)."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{relay.admin_port}", headers=headers,
                                     cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield http


async def log_in(http: aiohttp.ClientSession, token: str) -> aiohttp.ClientResponse:
    async with http.post("/login", data={"token": token}, allow_redirects=False) as response:
        await response.read()
        return response


async def get_json(http: aiohttp.ClientSession, path: str) -> tuple[int, dict]:
    async with http.get(path, allow_redirects=False) as response:
        return response.status, json.loads(await response.text())


async def test_pages_redirect_and_data_refuses_without_a_session(stack):
    relay, _ = stack
    async with browser_like(relay) as http:
        for page in ("/", f"/sites/{UP_SITE}"):
            async with http.get(page, allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "/login", page
        for data in ("/api/dashboard", f"/api/dashboard/sites/{UP_SITE}"):
            status, body = await get_json(http, data)
            assert status == 401 and "admin token" in body["error"], data
        async with http.get("/login") as response:
            page = await response.text()
            assert response.status == 200 and 'action="/login"' in page and 'type="password"' in page
            _assert_security_headers(response)


def _assert_security_headers(response: aiohttp.ClientResponse) -> None:
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_wrong_token_is_refused_without_a_session(stack):
    relay, _ = stack
    async with browser_like(relay) as http:
        for wrong in ("not-the-token", "", relay.admin_token + "x"):
            async with http.post("/login", data={"token": wrong}, allow_redirects=False) as response:
                page = await response.text()
                assert response.status == 401, wrong
                assert "Set-Cookie" not in response.headers
                assert "Wrong admin token" in page
        assert not list(http.cookie_jar)
        status, _ = await get_json(http, "/api/dashboard")
        assert status == 401


@pytest.mark.parametrize("headers", [{"Origin": "http://attacker.invalid"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site", "Origin": "null"}])
async def test_a_login_from_another_site_is_refused(stack, headers):
    relay, _ = stack
    async with browser_like(relay, headers=headers) as http:
        response = await log_in(http, relay.admin_token)
        assert response.status == 403 and "Set-Cookie" not in response.headers


async def test_login_sets_a_strict_http_only_session_that_reads_only_the_dashboard(stack):
    relay, _ = stack
    async with browser_like(relay) as http:
        response = await log_in(http, relay.admin_token)
        assert response.status == 303 and response.headers["Location"] == "/"
        (cookie,) = response.headers.getall("Set-Cookie")
        attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
        assert cookie.startswith(f"{SESSION_COOKIE}=") and len(cookie.split(";")[0]) > 40
        assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
        assert attributes["path"] == "Path=/" and attributes["max-age"] == "Max-Age=43200"
        async with http.get("/") as page:
            assert page.status == 200 and 'src="/static/dashboard.js"' in await page.text()
            _assert_security_headers(page)
            assert page.headers["Cache-Control"] == "no-store"
        async with http.get("/api/dashboard") as data:
            assert data.status == 200 and data.headers["Cache-Control"] == "no-store"
            _assert_security_headers(data)
            answer = await data.json()
        assert {s["name"] for s in answer["sites"]} == {UP_SITE, DOWN_SITE}
        assert answer["session"]["csrf"]
        status, site = await get_json(http, f"/api/dashboard/sites/{DOWN_SITE}")
        assert status == 200 and site["site"]["condition"] == "down"
        status, _ = await get_json(http, "/api/dashboard/sites/no-such-site")
        assert status == 404
        status, _ = await get_json(http, "/api/status")  # the session reads the dashboard, nothing else
        assert status == 401
    async with browser_like(relay, headers={"Authorization": f"Bearer {relay.admin_token}"}) as bearer:
        status, answer = await get_json(bearer, "/api/dashboard")  # the bearer token still works
        assert status == 200 and len(answer["sites"]) == 2 and answer["session"] is None


async def test_logout_needs_the_csrf_token_and_ends_the_session(stack):
    relay, _ = stack
    async with browser_like(relay) as http:
        await log_in(http, relay.admin_token)
        session_id = next(c.value for c in http.cookie_jar if c.key == SESSION_COOKIE)
        async with http.post("/logout", data={}, allow_redirects=False) as response:
            assert response.status == 403
        async with http.post("/logout", data={"csrf": "forged"}, allow_redirects=False) as response:
            assert response.status == 403
        status, answer = await get_json(http, "/api/dashboard")
        assert status == 200
        async with http.post("/logout", data={"csrf": answer["session"]["csrf"]}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/login"
    async with browser_like(relay, headers={"Cookie": f"{SESSION_COOKIE}={session_id}"}) as replay:
        status, _ = await get_json(replay, "/api/dashboard")
        assert status == 401  # the server forgot the session; the old cookie is worth nothing
        async with replay.get("/", allow_redirects=False) as response:
            assert response.status == 303


async def test_a_site_only_the_registry_knows_is_shown_down(stack):
    relay, _ = stack
    relay.admin("POST", "/api/sites", {"name": "hospital-enrolled"})
    async with browser_like(relay, headers={"Authorization": f"Bearer {relay.admin_token}"}) as http:
        status, answer = await get_json(http, "/api/dashboard")
        row = next(s for s in answer["sites"] if s["name"] == "hospital-enrolled")
        assert (row["condition"], row["reason"], row["connected"]) == ("down", "never connected", False)
        status, detail = await get_json(http, "/api/dashboard/sites/hospital-enrolled")
        assert status == 200 and detail["site"]["condition"] == "down" and not detail["registry"]["revoked"]
    relay.admin("POST", "/api/sites/hospital-enrolled/revoke", {"reason": "test over"})
    async with browser_like(relay, headers={"Authorization": f"Bearer {relay.admin_token}"}) as http:
        status, answer = await get_json(http, "/api/dashboard")
        assert "hospital-enrolled" not in {s["name"] for s in answer["sites"]}  # revoked: off the overview


async def test_every_asset_is_served_by_the_relay_itself(stack):
    relay, _ = stack
    async with browser_like(relay) as http:
        texts = {}
        async with http.get("/login") as response:
            texts["/login"] = await response.text()
        await log_in(http, relay.admin_token)
        for page in ("/", f"/sites/{DOWN_SITE}"):
            async with http.get(page) as response:
                assert response.status == 200
                texts[page] = await response.text()
        assets = {url for text in list(texts.values()) for url in ATTRIBUTE_URL.findall(text)}
        assert {"/static/dashboard.js", "/static/dashboard.css", "/static/favicon.png"} <= assets
        for url in assets:
            assert url.startswith("/") and not url.startswith("//"), url
            if not url.startswith("/static/"):
                continue  # a link or a form's action, on this server
            async with http.get(url) as response:
                assert response.status == 200, url
                if response.content_type.startswith("text/"):  # html, css, javascript (the icon is a png)
                    texts[url] = await response.text()
    for where, text in texts.items():
        assert not URL_IN_TEXT.findall(text), f"{where} names another host: {URL_IN_TEXT.findall(text)}"
        assert "innerHTML" not in text and "<script>" not in text.replace(" ", ""), where
        assert "@import" not in text and "url(" not in text, where


def _store_through_the_tunnel(relay, study) -> None:
    before = relay.status()["outcomes"].get("completed", 0)
    result = storescu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI", study.files)
    assert result.ok, result.stderr
    wait_until(lambda: relay.status()["outcomes"].get("completed", 0) > before, 10,
               message="the C-STORE association counted as completed")


def _assert_no_phi(where: str, text: str) -> None:
    assert PHI_PATIENT_NAME not in text, f"patient name in {where}"
    assert PHI_PATIENT_ID not in text, f"patient ID in {where}"


async def test_dashboard_pages_and_data_carry_no_phi(stack, ct_study_small):
    relay, _ = stack
    _store_through_the_tunnel(relay, ct_study_small)
    async with browser_like(relay) as http:
        await log_in(http, relay.admin_token)
        for path in ("/", f"/sites/{UP_SITE}", "/api/dashboard", f"/api/dashboard/sites/{UP_SITE}",
                     f"/api/dashboard/sites/{DOWN_SITE}"):
            async with http.get(path) as response:
                assert response.status == 200, path
                _assert_no_phi(path, await response.text())
        status, answer = await get_json(http, "/api/dashboard")
        assert answer["outcomes"]["totals"]["completed"] >= 1  # the store is in what the dashboard saw


# --- a real Chromium -------------------------------------------------------------------------------------

ROWS_JS = """JSON.stringify([...document.querySelectorAll('#sites tbody tr')].map(tr => ({
  site: tr.dataset.site,
  condition: tr.querySelector('[data-field=condition]').textContent,
  reason: tr.querySelector('[data-field=reason]').textContent,
  connected_since: tr.querySelector('[data-field=connected_since]').textContent,
  transport: tr.querySelector('[data-field=transport]').textContent,
})))"""


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _expected_rows(status: dict) -> dict[str, dict[str, object]]:
    return {s["name"]: {"condition": s["condition"], "reason": s["reason"],
                        "connected_since": _utc(s["connected_since"]) if s["connected"] else "—",
                        "transport": s["transport"] or "—"}
            for s in status["sites"]}


def _shown_rows(rows: list[dict]) -> dict[str, dict[str, object]]:
    """What the page shows, in the shape of ``_expected_rows`` (the connected-since cell starts with the time)."""
    return {r["site"]: {"condition": r["condition"], "reason": r["reason"],
                        "connected_since": r["connected_since"].split(" (")[0], "transport": r["transport"]}
            for r in rows}


async def _rows_matching_status(page: DevTools, relay) -> tuple[dict, dict]:
    """Wait (bounded) until one poll of the page shows what the relay's status says, and return both.

    Sites only the registry knows (enrolled by another test, never connected) are rows too: down."""
    shown = expected = None
    for _ in range(int(PAGE_TIMEOUT / 0.5)):
        polls = await page.evaluate("Number(document.body.dataset.polls || 0)")
        shown = _shown_rows(json.loads(await page.evaluate(ROWS_JS)))
        expected = _expected_rows(relay.status())
        extra = {name: row["condition"] for name, row in shown.items() if name not in expected}
        if {name: shown.get(name) for name in expected} == expected and set(extra.values()) <= {"down"}:
            return shown, expected
        await page.wait_for(f"Number(document.body.dataset.polls || 0) > {polls}", PAGE_TIMEOUT)
    raise AssertionError(f"the page never showed the relay's state:\nshown    {shown}\nexpected {expected}")


async def test_chromium_logs_in_and_shows_the_relays_state(stack, procs, tmp_path, ct_study_small):
    relay, _ = stack
    proc, port = start_chromium(procs, tmp_path)
    _store_through_the_tunnel(relay, ct_study_small)
    origin = f"http://127.0.0.1:{relay.admin_port}"
    try:
        async with asyncio.timeout(300), DevTools.open_page(port) as page:
            await page.call("Network.enable")
            await page.navigate(f"{origin}/")
            assert await page.evaluate("location.pathname") == "/login"  # no session: sent to the login
            await page.evaluate(f"document.getElementById('token').value = {json.dumps(relay.admin_token)}")
            await page.replacing_document(lambda: page.evaluate("document.getElementById('login-submit').click()"))
            assert await page.evaluate("location.pathname") == "/", await page.evaluate("document.body.innerText")
            await page.wait_for("document.querySelectorAll('#sites tbody tr').length === 2", PAGE_TIMEOUT)

            shown, expected = await _rows_matching_status(page, relay)
            assert shown[DOWN_SITE]["condition"] == "down" and shown[DOWN_SITE]["reason"] == "never connected"
            assert shown[UP_SITE]["condition"] in {"up", "degraded"}
            assert shown[UP_SITE]["connected_since"] != "—"
            # Which relays and agents hold the site's tunnel: here one agent on this relay, its single path.
            me = relay.admin("GET", "/api/fleet")["relay"] + "/gw-1"
            holders = f"document.querySelector('tr[data-site=\"{UP_SITE}\"] [data-field=tunnels_on]').textContent"
            await page.wait_for(f"{holders} === {json.dumps(me + ' (single path)')}", PAGE_TIMEOUT)
            assert await page.evaluate(
                f"document.querySelector('tr[data-site=\"{DOWN_SITE}\"] [data-field=tunnels_on]').textContent") == "—"
            assert await page.evaluate(
                "[...document.querySelectorAll('#outcome-reasons td')].some(td => td.textContent === 'completed')")
            assert await page.evaluate("document.querySelectorAll('#outcome-chart rect.completed').length") >= 1
            _assert_no_phi("the overview page", await page.evaluate("document.documentElement.outerHTML"))
            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(SCREENSHOT)

            link = f"document.querySelector('tr[data-site=\"{DOWN_SITE}\"] a').click()"
            await page.replacing_document(lambda: page.evaluate(link))
            assert await page.evaluate("location.pathname") == f"/sites/{DOWN_SITE}"
            await page.wait_for("Number(document.body.dataset.polls || 0) >= 1", PAGE_TIMEOUT)
            down = next(s for s in relay.status()["sites"] if s["name"] == DOWN_SITE)
            assert await page.evaluate("document.getElementById('site-name').textContent") == DOWN_SITE
            assert await page.evaluate("document.getElementById('site-condition').textContent") == down["condition"]
            assert await page.evaluate("document.getElementById('site-reason').textContent") == down["reason"]
            await page.screenshot(tmp_path / "site-down.png")

            await page.navigate(f"{origin}/sites/{UP_SITE}")
            await page.wait_for("Number(document.body.dataset.polls || 0) >= 1", PAGE_TIMEOUT)
            routes = await page.evaluate("document.querySelector('#listener-routes tbody').textContent")
            assert "HOSP_PACS" in routes and "pacs" in routes
            spool = await page.evaluate("document.querySelector('#spool-destinations tbody').textContent")
            assert "cloud-spool" in spool and "CLOUDSPOOL" in spool and "empty" in spool, spool
            _assert_no_phi("the site page", await page.evaluate("document.body.innerText"))
            await page.screenshot(tmp_path / "site-up.png")

            requested = page.requested_urls()
            assert requested and all(url.startswith(origin + "/") for url in requested), requested
            errors = [e for e in page.events if e.get("method") == "Network.loadingFailed"]
            assert not errors, errors
    finally:
        with contextlib.suppress(Exception):
            await DevTools.close_browser(port)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)
