"""What the status page and ``/metrics`` show of a running canary, and the page's Promote and Abort buttons
(issue 18; README "Canary releases").

``gitplug serve`` runs in a subprocess with ``hello`` v1 live and v2 on the tracked branch: its
startup poll starts v2's canary (30 % of the clients, ``min_requests`` and ``duration`` so large
that it never decides by itself). Clients speak from distinct loopback addresses (``127.0.0.N``
bound as the source address, so the server places each by its ``REMOTE_ADDR`` as it would real
clients) and keep the canary cookie they are given, as a browser does. Every answer names the
commit that served it and ``/hello/boom`` answers 500, so the test knows each side's requests and
errors exactly. Once the API shows exactly those figures (polled: workers write their counts to
the store every few seconds; no traffic follows, so they stay put), the page seen in headless
Chromium and ``/metrics`` must show the same. Then the page's button decides, and the page, the
API, ``/metrics``, ``gitplug history`` and the served answers must all agree on the outcome.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gitrepo import GitRepo
from serverproc import Server, clean_env, request, run_cli, wait_for, write_config
from test_statuspage import CHROMEDRIVER, CHROMIUM

TOKEN = "canary-face-admin-token-0123456789"
PAGE = "/_gitplug/"
API = "/_gitplug/api/plugins/hello"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Never decides by itself within a test: only the buttons end it.
CANARY = {"percent": 30, "min_requests": 100000, "duration": 3600, "max_error_rate": 0.05}

PLUGIN = """\
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)


@plugin.route("/")
def index():
    return current_plugin.commit


@plugin.route("/boom")
def boom():
    return current_plugin.commit, 500
"""


@dataclass
class Sent:
    """What the test's clients sent, per side ("stable", "canary"), as the answers said."""

    requests: dict[str, int] = field(default_factory=lambda: {"stable": 0, "canary": 0})
    errors: dict[str, int] = field(default_factory=lambda: {"stable": 0, "canary": 0})
    #: address -> (side, the canary cookie it was given)
    clients: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Site:
    server: Server
    config: Path
    env: dict[str, str]
    v1: str
    v2: str
    deploy_id: int

    @property
    def sides(self) -> dict[str, str]:
        return {"stable": self.v1, "canary": self.v2}

    def api(self) -> dict[str, t.Any]:
        status, body = request("GET", self.server.base + API, headers=AUTH)
        assert status == 200, body
        return t.cast("dict[str, t.Any]", json.loads(body))

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """``{sample name: {sorted labels: value}}`` of the gitplug_canary_* samples."""
        status, body = request("GET", self.server.base + "/_gitplug/metrics", headers=AUTH)
        assert status == 200, body
        found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name.startswith("gitplug_canary_"):
                    found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return found

    def get(self, path: str, address: str, cookie: str | None = None) -> tuple[int, str, str | None]:
        """GET ``path`` from the client at ``address``: (status, body, canary cookie set)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=15,
                                          source_address=(address, 0))
        try:
            conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
            response = conn.getresponse()
            set_cookie = response.getheader("Set-Cookie")
            return response.status, response.read().decode(), set_cookie.split(";")[0] if set_cookie else None
        finally:
            conn.close()

    def cli(self, *args: str) -> str:
        proc = run_cli(*args, "-c", self.config, env=self.env, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    repo = GitRepo(tmp_path / "repo")
    repo.write("hello/__init__.py", PLUGIN)
    v1 = repo.commit("hello v1")
    config = write_config(tmp_path / "deploy.yaml", {"hello": {"repo": str(repo.path), "canary": CANARY}},
                          admin_token="${GITPLUG_ADMIN_TOKEN}")
    env = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN)
    first = run_cli("deploy", "hello", "-c", config, env=env, timeout=60)
    assert first.returncode == 0, first.stdout + first.stderr  # the first release goes live directly
    repo.write("hello/README.txt", "v2\n")
    v2 = repo.commit("hello v2")
    with Server(config, env=env) as server:
        made = Site(server, config, env, v1, v2, deploy_id=0)

        def canary_running() -> dict[str, t.Any] | None:
            return t.cast("dict[str, t.Any] | None", made.api()["canary"])

        # The startup poll finds v2 on the branch and starts its canary.
        wait_for(canary_running, timeout=45, what="v2's canary to start")
        canary = canary_running()
        assert canary is not None
        assert (canary["commit"], canary["stable_commit"], canary["percent"]) == (v2, v1, 30), canary
        made.deploy_id = canary["deploy_id"]
        yield made


def send_traffic(site: Site) -> Sent:
    """Clients from distinct addresses until each side has three: each asks ``/hello/`` one to
    three times and ``/hello/boom`` once, sending back the canary cookie it was given."""
    sent = Sent()
    by_commit = {commit: side for side, commit in site.sides.items()}
    for n in range(2, 255):
        address = f"127.0.0.{n}"
        status, body, cookie = site.get("/hello/", address)
        assert status == 200 and body in by_commit, (status, body)
        side = by_commit[body]
        assert cookie is not None and cookie.endswith(".c" if side == "canary" else ".s"), (cookie, side)
        sent.clients[address] = (side, cookie)
        sent.requests[side] += 1
        for path, code in [("/hello/", 200)] * (n % 3) + [("/hello/boom", 500)]:
            status, body, again = site.get(path, address, cookie)
            assert (status, body, again) == (code, site.sides[side], None), (path, side)  # it sticks
            sent.requests[side] += 1
            sent.errors[side] += code == 500
        if min(sum(1 for s, _ in sent.clients.values() if s == side) for side in site.sides) >= 3:
            return sent
    pytest.fail(f"254 addresses did not put three clients on each side: {sent}")


def figures(canary: dict[str, t.Any]) -> dict[str, tuple[str, int, int]]:
    """Each side's (commit, requests, errors) from the API's ``canary`` object."""
    return {side: (canary[side]["commit"], canary[side]["requests"], canary[side]["errors"])
            for side in ("stable", "canary")}


def counted(site: Site, sent: Sent) -> dict[str, t.Any]:
    """The API's ``canary`` once the store holds exactly what ``sent`` sent."""
    wanted = {side: (commit, sent.requests[side], sent.errors[side]) for side, commit in site.sides.items()}
    last: list[t.Any] = []

    def exact() -> bool:
        canary = site.api()["canary"]
        last[:] = [canary]
        return canary is not None and figures(canary) == wanted

    wait_for(exact, timeout=30, what=f"the API to count {wanted} (last: {last})")
    return t.cast("dict[str, t.Any]", last[0])


# -- the browser ---------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[t.Any]:
    """Headless Chromium, set up as test_statuspage's browser test does."""
    missing = [b for b in (CHROMIUM, CHROMEDRIVER) if not shutil.which(b)]
    if missing:
        why = f"needs {' and '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (.ci/run installs them; under CI=true this test must run, not skip)")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


#: The card as the browser shows it, read in one go (the page reloads itself while a deploy runs).
READ_CARD = """
const card = document.getElementById('plugin-hello');
if (!card) return null;
const canary = card.querySelector('[data-role=canary]');
const shas = canary ? [...canary.querySelectorAll('code.sha')].map(c => [c.innerText, c.title]) : [];
return {
  state: card.querySelector('[data-role=state]').innerText,
  live: card.querySelector('[data-role=live] code.sha').title,
  canary: canary ? canary.innerText : null,
  shas: shas,
  buttons: [...card.querySelectorAll('.actions button')].map(b => b.innerText.trim()),
  flash: document.getElementById('flash') ? document.getElementById('flash').innerText : null,
};
"""

SPLIT = re.compile(r"(\w+) serves (\d+)% of the clients beside (\w+) \(deploy #(\d+)\)")
SIDES = re.compile(r"canary: (\d+) requests, (\d+) errors · live: (\d+) requests, (\d+) errors")


def log_in(driver: t.Any, site: Site) -> dict[str, t.Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get(site.server.base + PAGE)
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form.stack button[type=submit]").click()
    return t.cast("dict[str, t.Any]", WebDriverWait(driver, 30).until(lambda d: d.execute_script(READ_CARD)))


def page_canary(card: dict[str, t.Any]) -> dict[str, t.Any]:
    """The canary the card shows: percent, commits as shown and in full, each side's figures."""
    text = card["canary"]
    assert text is not None, f"the card shows no canary: {card}"
    split, sides = SPLIT.search(text), SIDES.search(text)
    assert split and sides, f"the card's canary does not read as a split and both sides' figures: {text!r}"
    (canary_shown, canary_full), (stable_shown, stable_full) = card["shas"]
    assert (canary_shown, stable_shown) == (split.group(1), split.group(3)), card
    return {
        "percent": int(split.group(2)),
        "deploy_id": int(split.group(4)),
        "commits": {"canary": (canary_shown, canary_full), "stable": (stable_shown, stable_full)},
        "figures": {"canary": (int(sides.group(1)), int(sides.group(2))),
                    "stable": (int(sides.group(3)), int(sides.group(4)))},
    }


def click(driver: t.Any, site: Site, label: str) -> dict[str, t.Any]:
    """Click the card's button whose label starts with ``label``; the page it leads to."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    # A fresh page: it reloads itself 10 s after loading while the canary's deploy runs, and
    # a reload between finding the button and clicking it would make the button stale.
    driver.get(site.server.base + PAGE)
    buttons = driver.find_elements(By.CSS_SELECTOR, "#plugin-hello .actions button")
    (button,) = [b for b in buttons if b.text.strip().startswith(label)]
    button.click()
    return t.cast("dict[str, t.Any]", WebDriverWait(driver, 30).until(
        lambda d: (card := d.execute_script(READ_CARD)) and card["flash"] and card))


# -- the checks ----------------------------------------------------------------------------------


def check_shown_during_the_canary(site: Site, driver: t.Any) -> Sent:
    """Page, API and /metrics show the same split, commits and figures; returns what was sent."""
    sent = send_traffic(site)
    assert min(sent.requests.values()) > 0 and min(sent.errors.values()) > 0, sent
    before = counted(site, sent)
    card = log_in(driver, site)
    after = site.api()["canary"]
    assert after == before, "figures moved with no traffic"
    assert card["state"] == "canary", card
    shown = page_canary(card)
    assert (shown["percent"], shown["deploy_id"]) == (30, site.deploy_id), shown
    for side, commit in site.sides.items():
        text, title = shown["commits"][side]
        assert title == commit and commit.startswith(text) and len(text) >= 7, (side, text, title)
        assert shown["figures"][side] == (sent.requests[side], sent.errors[side]), (side, shown, sent)
    assert card["live"] == site.v1, card
    assert any(b.startswith(f"Promote canary {site.v2[:7]}") for b in card["buttons"]), card["buttons"]
    assert "Abort canary" in card["buttons"], card["buttons"]

    metrics = site.metrics()
    percent = {(("commit", site.v2), ("plugin", "hello"), ("stable_commit", site.v1)): 30.0}
    assert metrics.get("gitplug_canary_percent") == percent, metrics
    for name, of in (("gitplug_canary_requests", sent.requests), ("gitplug_canary_errors", sent.errors)):
        expected = {(("commit", commit), ("plugin", "hello"), ("side", side)): float(of[side])
                    for side, commit in site.sides.items()}
        assert metrics.get(name) == expected, (name, metrics.get(name))
    assert site.api()["canary"] == before, "figures moved with no traffic"
    return sent


def check_ended(site: Site, card: dict[str, t.Any], live: str) -> None:
    """The page, the API and /metrics show no canary any more and ``live`` serving."""
    assert card["canary"] is None and card["live"] == live, card
    assert not any(b.startswith(("Promote", "Abort")) for b in card["buttons"]), card["buttons"]
    status = site.api()
    assert (status["live_commit"], status["canary"]) == (live, None), status
    assert site.metrics() == {}, "a finished canary is still in /metrics"


def check_history(site: Site, sent: Sent, result: str, stage: str | None, decision: str) -> None:
    """``gitplug history`` records the canary's deploy with both sides' figures and the decision."""
    record = json.loads(site.cli("history", "hello", "--json"))[0]
    assert (record["id"], record["commit"], record["result"], record["stage"]) == (
        site.deploy_id, site.v2, result, stage), record
    kept = record["canary"]
    assert kept["percent"] == 30 and kept["decision"] == decision, kept
    assert figures(kept) == {side: (commit, sent.requests[side], sent.errors[side])
                             for side, commit in site.sides.items()}, kept
    text = site.cli("history", "hello")
    assert (f"canary 30%: {sent.errors['canary']} errors / {sent.requests['canary']} requests;"
            f" live {site.v1[:12]}: {sent.errors['stable']} / {sent.requests['stable']}") in text, text
    assert decision in text, text


def check_everyone_served_by(site: Site, sent: Sent, commit: str) -> None:
    """Every client, whatever side its cookie named, gets ``commit`` now."""
    for address, (_side, cookie) in sent.clients.items():
        status, body, _ = site.get("/hello/", address, cookie)
        assert (status, body) == (200, commit), (address, cookie)


@pytest.mark.browser
def test_page_and_metrics_show_the_canary_and_promote_makes_it_live(site: Site, browser: t.Any) -> None:
    sent = check_shown_during_the_canary(site, browser)

    card = click(browser, site, "Promote canary")
    assert f"hello: {site.v2[:7]} is live (deploy #{site.deploy_id}, promote)" in card["flash"], card
    assert card["state"] == "live", card
    check_ended(site, card, live=site.v2)
    assert site.api()["previous_commit"] == site.v1
    check_history(site, sent, "live", None, "promoted by hand (api)")
    check_everyone_served_by(site, sent, site.v2)
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems


@pytest.mark.browser
def test_page_and_metrics_show_the_canary_and_abort_keeps_the_live_release(site: Site, browser: t.Any) -> None:
    sent = check_shown_during_the_canary(site, browser)

    card = click(browser, site, "Abort canary")
    assert (f"hello: canary {site.v2[:7]} rolled back (deploy #{site.deploy_id});"
            " the live release serves every client.") in card["flash"], card
    check_ended(site, card, live=site.v1)
    # The card says why the deploy failed: at stage canary, rolled back by hand.
    error = browser.execute_script(
        "return document.querySelector('#plugin-hello .error-block').innerText")
    assert f"Deploy #{site.deploy_id} failed at canary" in error, error
    assert "canary rolled back: aborted by hand (api)" in error, error
    check_history(site, sent, "failed", "canary", "aborted by hand (api)")
    check_everyone_served_by(site, sent, site.v1)
    problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems
