"""Tests of the hello plugin. They run on your machine and in gitplug's test gate.

Run them from the repository root: ``python -m pytest -q``.
"""

from __future__ import annotations

import logging
import re

import pytest

from gitplug import HealthCheckFailed
from gitplug.testing import mount_plugin, unmount
from hello.filters import duration
from hello.greetings import InvalidName, clean_name, make_greeting

# -- business logic: plain unit tests, no Flask needed -------------------------


def test_make_greeting() -> None:
    assert make_greeting("Ada", "Hej") == "Hej, Ada!"
    assert make_greeting() == "Hello, world!"


def test_clean_name_normalises_whitespace() -> None:
    assert clean_name("  Ada \t Lovelace ") == "Ada Lovelace"


@pytest.mark.parametrize(
    ("raw", "message"),
    [("", "type a name"), ("   ", "type a name"), ("x" * 41, "limit is 40"), ("a\x00b", "control")],
)
def test_clean_name_refuses(raw: str, message: str) -> None:
    with pytest.raises(InvalidName, match=message):
        clean_name(raw)


def test_duration_filter() -> None:
    assert duration(42.5) == "42 s"
    assert duration(120) == "2 min"
    assert duration(3725) == "1 h 2 min"


# -- the plugin mounted in a host app ------------------------------------------


def test_index_renders_greeting_and_release(gitplug_client) -> None:
    response = gitplug_client.get("/hello/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<h1>Hello, world!</h1>" in html
    release = response.headers["X-Hello-Release"]
    assert release[:12] in html  # the footer shows which release served the page


def test_static_files_have_versioned_urls(gitplug_client) -> None:
    html = gitplug_client.get("/hello/").get_data(as_text=True)
    css_url = re.search(r'href="([^"]+/hello\.css)"', html).group(1)
    js_url = re.search(r'src="([^"]+/hello\.js)"', html).group(1)
    release = gitplug_client.get("/hello/").headers["X-Hello-Release"]
    assert css_url == f"/hello/static/{release[:12]}/hello.css"
    css = gitplug_client.get(css_url)
    assert css.status_code == 200
    assert css.mimetype == "text/css"
    assert css.cache_control.max_age and css.cache_control.max_age > 86400
    assert gitplug_client.get(js_url).status_code == 200


def test_greeting_form_flashes_and_counts_in_session(gitplug_client) -> None:
    response = gitplug_client.post("/hello/greet", data={"name": "Ada"})
    assert response.status_code == 302
    assert response.headers["Location"] == "/hello/"

    html = gitplug_client.get("/hello/").get_data(as_text=True)
    assert 'class="flash flash-success">Hello, Ada!</li>' in html
    assert "<strong>1</strong> greeting</dd>" in html

    html = gitplug_client.post("/hello/greet", data={"name": "Grace"}, follow_redirects=True).get_data(
        as_text=True
    )
    assert "Hello, Grace!" in html
    assert "<strong>2</strong> greetings" in html
    assert 'value="Grace"' in html  # the last name is remembered in the session


def test_invalid_name_flashes_an_error(gitplug_client) -> None:
    html = gitplug_client.post("/hello/greet", data={"name": "  "}, follow_redirects=True).get_data(
        as_text=True
    )
    assert 'class="flash flash-error">Please type a name to greet.</li>' in html
    assert "<strong>0</strong> greetings" in html


def test_user_input_is_escaped(gitplug_client) -> None:
    html = gitplug_client.post(
        "/hello/greet", data={"name": "<script>x</script>"}, follow_redirects=True
    ).get_data(as_text=True)
    assert "<script>x</script>" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html


def test_api_greeting(gitplug_client) -> None:
    assert gitplug_client.get("/hello/api/greeting?name=Ada").get_json() == {
        "name": "Ada",
        "greeting": "Hello, Ada!",
    }
    assert gitplug_client.get("/hello/api/greeting").get_json()["greeting"] == "Hello, world!"


def test_api_rejects_invalid_name_as_json(gitplug_client) -> None:
    response = gitplug_client.get("/hello/api/greeting", query_string={"name": "x" * 50})
    assert response.status_code == 400
    assert response.get_json() == {"error": "That name is 50 characters long; the limit is 40."}


def test_api_release_counts_greetings(gitplug_client) -> None:
    gitplug_client.post("/hello/greet", data={"name": "Ada"})
    info = gitplug_client.get("/hello/api/release").get_json()
    assert info["plugin"] == "hello"
    assert info["url_prefix"] == "/hello"
    assert info["greetings"] == 1
    assert info["release"] == gitplug_client.get("/hello/").headers["X-Hello-Release"]


def test_report_page_lists_most_greeted(gitplug_client) -> None:
    for name in ("Ada", "ada", "Grace"):
        gitplug_client.post("/hello/greet", data={"name": name})
    response = gitplug_client.get("/hello/report")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<dt>Greetings</dt><dd>3</dd>" in html
    assert re.search(r'bar-label">Ada</span>.*?--share: 67%', html, re.S)


def test_unknown_page_is_404(gitplug_client) -> None:
    assert gitplug_client.get("/hello/nope").status_code == 404


class TestConfiguredGreeting:
    """Overriding the options fixture configures the mount for these tests."""

    @pytest.fixture
    def gitplug_plugin_options(self) -> dict[str, object]:
        return {"config": {"GREETING": "Hej"}, "url_prefix": "/hi"}

    def test_uses_configured_greeting_and_prefix(self, gitplug_client) -> None:
        html = gitplug_client.get("/hi/").get_data(as_text=True)
        assert "<h1>Hej, world!</h1>" in html
        assert gitplug_client.get("/hello/").status_code == 404
        assert gitplug_client.get("/hi/api/greeting?name=Ada").get_json()["greeting"] == "Hej, Ada!"


@pytest.mark.parametrize("greeting", ["", "   ", 42])
def test_bad_greeting_config_fails_the_health_check(greeting: object) -> None:
    with pytest.raises(HealthCheckFailed, match="config GREETING must be a non-empty string"):
        mount_plugin(config={"GREETING": greeting})


def test_on_unload_reports_what_the_release_served(gitplug_client, gitplug_extension, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gitplug.plugin.hello")
    gitplug_client.post("/hello/greet", data={"name": "Ada"})
    unmount(gitplug_extension)  # what a deploy of a newer release does to this one
    assert "unloaded after serving 1 greeting(s)" in caplog.text
    assert gitplug_client.get("/hello/").status_code == 404
