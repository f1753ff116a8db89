"""/docs, /redoc and /favicon.ico work with no internet: every asset the pages reference is served by the API
itself, and Swagger UI really renders the API's operations in a browser that may not leave the machine."""

from __future__ import annotations

import io
import threading
from html.parser import HTMLParser
from urllib.parse import urlparse

import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from dfmod.loopback import free_port, wait_for_port
from dfmod.settings import Settings
from tests.api.test_review_page import CHROMIUM_ARGS, _chromium


class _AssetRefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.refs.append(attributes["src"])
        if tag == "link" and attributes.get("href"):
            self.refs.append(attributes["href"])


@pytest.fixture
def app(tmp_path):
    return create_app(Settings(data_dir=tmp_path / "data"))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets_that_load(app, page):
    with TestClient(app) as client:
        html = client.get(page)
        assert html.status_code == 200
        parser = _AssetRefs()
        parser.feed(html.text)
        # The page's scripts and styles, the favicon included; no CDN (FastAPI's default is jsdelivr).
        assert any(ref.endswith(".js") for ref in parser.refs), parser.refs
        for ref in parser.refs:
            parsed = urlparse(ref)
            assert not parsed.scheme and not parsed.netloc and ref.startswith("/"), ref
            asset = client.get(ref)
            assert asset.status_code == 200 and len(asset.content) > 100, ref
        assert "cdn" not in html.text.lower()


def test_favicon_is_an_icon(app):
    with TestClient(app) as client:
        response = client.get("/favicon.ico")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/x-icon"
    icon = Image.open(io.BytesIO(response.content))
    assert icon.format == "ICO" and icon.size[0] >= 16


@pytest.fixture
def server(app):
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(10)


@pytest.mark.integration
def test_swagger_ui_renders_the_api_with_the_network_cut_off(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(20_000)
        blocked: list[str] = []

        def only_this_server(route) -> None:
            if route.request.url.startswith(server):
                route.continue_()
            else:  # the offline case: anything outside the API fails, as it would with no internet
                blocked.append(route.request.url)
                route.abort()

        page.route("**/*", only_this_server)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server}/docs")
        # Swagger UI 5 renders OpenAPI 3.1 (what FastAPI emits): one block per operation, ours included.
        expect(page.locator(".opblock").first).to_be_visible()
        expect(page.locator(".opblock-summary-path", has_text="/v1/images").first).to_be_visible()
        favicon = page.locator("link[rel~=icon]").first.get_attribute("href")
        browser.close()
    assert blocked == [] and errors == []
    assert favicon == "/favicon.ico"
