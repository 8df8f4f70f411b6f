"""The status page and /docs in a real headless Chromium (Debian's, driven by Playwright) against a real server under
a streaming load: the model shows as ready, the figures move, a chart draws, the playground streams a reply, a wrong
key gets a clear message, /docs renders its schemas, and no request ever leaves 127.0.0.1. Screenshots land in each
test's tmp_path."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator

import openai
import pytest
from conftest import Server, model_toml

playwright_api = pytest.importorskip("playwright.sync_api")  # the [test] extra installs it

ADMIN, USER = "ui-browser-admin-key", "ui-browser-user-key"
TIMEOUT_MS = 60_000
playwright_api.expect.set_options(timeout=TIMEOUT_MS)  # a shared 2-core machine: waits, not deadlines


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no Chromium: `apt-get install chromium` (.ci/run does), or set CHROMIUM to its path"
    return found


@pytest.fixture(scope="module")
def server(start_server, tiny_model) -> Server:
    return start_server(
        f"""
        [[auth.keys]]
        name = "ops"
        key = "{ADMIN}"
        admin = true
        [[auth.keys]]
        name = "app"
        key = "{USER}"
        [ui]
        sample_s = 0.5
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        """
    )


@pytest.fixture(scope="module")
def load(server: Server) -> Iterator[None]:
    """Two clients streaming chats back to back for as long as the module runs."""
    stop = threading.Event()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER, max_retries=0, timeout=60)

    def stream() -> None:
        while not stop.is_set():
            chunks = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=24, stream=True
            )
            for _ in chunks:
                pass

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    yield
    stop.set()
    for thread in threads:
        thread.join(60)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


class Page:
    """A fresh browser context (its own sessionStorage) that records every URL it requests."""

    def __init__(self, browser, server: Server, **context) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 1100}, **context)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.requested: list[str] = []
        self.context.on("request", lambda request: self.requested.append(request.url))
        self.page = self.context.new_page()
        self.server = server

    def assert_all_local(self) -> None:
        assert self.requested, "the page requested nothing"
        outside = [url for url in self.requested if not url.startswith((self.server.url + "/", "data:", "blob:"))]
        assert not outside, outside


@pytest.fixture
def page(browser, server: Server, load) -> Iterator[Page]:
    opened = Page(browser, server)
    yield opened
    opened.context.close()


def enter_key(page, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")


def test_a_wrong_key_gets_a_clear_message(page: Page, server: Server, tmp_path) -> None:
    page.page.goto(f"{server.url}/ui")
    message = page.page.locator("#key-message")
    playwright_api.expect(message).to_have_text("This server needs an API key.")
    enter_key(page.page, "not-a-key")
    playwright_api.expect(message).to_have_text("The server refused this key: invalid API key. Enter another.")
    assert page.page.locator("#main").is_hidden()
    page.page.screenshot(path=tmp_path / "wrong-key.png")
    page.assert_all_local()


def test_the_page_shows_the_model_ready_and_live_figures(page: Page, server: Server, tmp_path) -> None:
    page.page.goto(f"{server.url}/ui")
    enter_key(page.page, ADMIN)
    expect = playwright_api.expect
    expect(page.page.locator("#status")).to_have_text("ready")
    expect(page.page.locator('#models tr[data-model="tiny"] .state')).to_have_text("ready")
    # Figures move while the load runs: the app key's output tokens grow from one poll to a later one.
    tokens = page.page.locator('#keys tr[data-key="app"] td:nth-child(4)')
    expect(tokens).not_to_have_text("0")
    first = int(tokens.inner_text())
    page.page.wait_for_function(
        "n => Number(document.querySelector('#keys tr[data-key=\"app\"] td:nth-child(4)').textContent) > n", arg=first
    )
    expect(page.page.locator("#tok-s")).not_to_have_text("0.0")
    # A chart draws: the tokens/s line has points, and the TTFT chart a p50 and a p95 line.
    page.page.wait_for_function("document.querySelector('#chart-tokens path.line')?.getAttribute('d').includes('L')")
    expect(page.page.locator("#chart-ttft path.line")).to_have_count(2)
    expect(page.page.locator('#keys tr[data-key="ops"]')).to_have_count(1)  # an admin key sees every key
    page.page.screenshot(path=tmp_path / "status.png", full_page=True)
    page.assert_all_local()


def test_the_playground_streams_a_reply(page: Page, server: Server, tmp_path) -> None:
    page.page.goto(f"{server.url}/ui")
    enter_key(page.page, USER)
    expect = playwright_api.expect
    expect(page.page.locator("#pg-model")).to_have_value("tiny")
    expect(page.page.locator("#keys tbody tr")).to_have_count(1)  # a key that is not admin sees only itself
    page.page.fill("#pg-prompt", "Tell me a story")
    page.page.fill("#pg-max", "40")
    page.page.fill("#pg-temp", "0")  # greedy: the same reply every run
    page.page.click("#pg-send")
    expect(page.page.locator(".turn.user")).to_have_text("Tell me a story")
    expect(page.page.locator("#pg-tokens")).not_to_have_text("–")
    reply = page.page.locator(".turn.assistant")
    assert reply.inner_text().strip(), "the reply is empty"
    assert page.page.locator("#pg-ttft").inner_text().endswith(" ms")
    assert float(page.page.locator("#pg-tps").inner_text()) > 0
    assert int(page.page.locator("#pg-tokens").inner_text()) > 1
    page.page.screenshot(path=tmp_path / "playground.png", full_page=True)
    page.assert_all_local()


def test_docs_render_offline_with_the_request_schemas(browser, server: Server, load, tmp_path) -> None:
    docs = Page(browser, server, extra_http_headers={"Authorization": f"Bearer {USER}"})
    try:
        docs.page.goto(f"{server.url}/docs")
        schemas = docs.page.locator("section.models")
        playwright_api.expect(schemas).to_contain_text("OpenAI.ChatCompletionRequest")
        playwright_api.expect(schemas).to_contain_text("Responses.CreateResponse")
        docs.page.locator("#operations-OpenAI-V1ChatCompletionsChatCompletions").click()
        playwright_api.expect(docs.page.locator(".opblock-section-request-body")).to_be_visible()
        docs.page.screenshot(path=tmp_path / "docs.png")
        docs.assert_all_local()
    finally:
        docs.context.close()
