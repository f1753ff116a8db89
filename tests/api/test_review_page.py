"""The review page in a real browser (headless Chromium driven by Playwright) against a real API server on
Postgres and an S3 server: sign in, claim, decide by keyboard and by click, undo, and find the decisions
persisted after a reload; Undo retracts the open item's own decision, heatmap messages do not follow the
reviewer to the next item, and identical uploads are marked as such."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import uvicorn

from api.main import create_app
from dfmod.db import Item, Review, make_engine, make_session_factory, session_scope
from dfmod.loopback import free_port, wait_for_port
from tests.utils.images import make_image_bytes
from tests.utils.records import seed_items

pytestmark = pytest.mark.integration
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("DFMOD_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail(f"Chromium not found at {path}: `apt-get install chromium` (scripts/test.sh does it)")
    return path


@pytest.fixture
def server(integration_settings):
    port = free_port()
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(create_app(integration_settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    uvicorn_server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(15_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, errors
        browser.close()


def _item_state(settings, item_id):
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        item = session.get(Item, item_id)
        reviews = [(r.decision, r.reviewer) for r in session.query(Review).filter(Review.item_id == item_id).order_by(Review.id)]
        state = (item.decision, reviews)
    engine.dispose()
    return state


def test_sign_in_claim_decide_undo_and_see_it_persisted(
    server, browser_page, integration_settings, s3_buckets, make_api_key
):
    from playwright.sync_api import expect

    page, errors = browser_page
    s3, (bucket, _extra) = s3_buckets
    for index in range(3):
        s3.put_object(Bucket=bucket, Key=f"page/{index}.jpg", Body=make_image_bytes(size=(320, 240), color=(60 * index, 90, 30)))
    ids = seed_items(
        integration_settings,
        [{"score": score, "key": f"page/{i}.jpg", "source": f"platform-{i}"} for i, score in enumerate((0.93, 0.81, 0.72))]
        + [{"score": 0.1}],  # a confident "real": not for review
    )
    key = make_api_key("review", name="pat")
    ingest_only = make_api_key("ingest", name="uploader")

    page.goto(f"{server}/review")
    # A wrong key and a key without the review scope are turned away.
    page.fill("#key-input", "dfmod_" + "n" * 43)
    page.click("#signin-button")
    expect(page.locator("#signin-error")).to_have_text("That key is not valid.")
    page.fill("#key-input", ingest_only)
    page.click("#signin-button")
    expect(page.locator("#signin-error")).to_contain_text("no review scope")

    page.fill("#key-input", key)
    page.click("#signin-button")
    expect(page.locator("#whoami")).to_have_text("signed in as pat")
    cards = page.locator("#list .card")
    expect(cards).to_have_count(3)  # claimed automatically: the three flagged items, highest score first
    assert [cards.nth(i).get_attribute("data-id") for i in range(3)] == ids[:3]
    expect(cards.nth(0)).to_contain_text("0.930")
    expect(cards.nth(0)).to_contain_text("platform-0")
    expect(page.locator("#facts")).to_contain_text(ids[0])
    # Thumbnails and the full-size image really load (signed links, no header).
    page.wait_for_function("() => [...document.querySelectorAll('#list img')].every(i => i.complete && i.naturalWidth > 0)")
    page.wait_for_function("() => document.querySelector('#full').naturalWidth === 320")

    page.keyboard.press("f")  # keyboard decision on the first item
    expect(page.locator("#status")).to_contain_text("confirmed_fake recorded")
    expect(page.locator("#facts")).to_contain_text(ids[1])  # moved on to the next item
    assert _item_state(integration_settings, ids[0]) == ("confirmed_fake", [("confirmed_fake", "pat")])

    page.fill("#note", "a real photo, odd lighting")
    page.click("#d-real")  # one-click decision on the second
    expect(page.locator("#status")).to_contain_text("overturned_real recorded")
    expect(page.locator("#facts")).to_contain_text(ids[2])  # moved on: the third item is open before u is pressed
    assert _item_state(integration_settings, ids[1])[0] == "overturned_real"

    # Undo acts on the open item: the third is open and undecided, so u first brings back the second (the
    # last decision) without touching it, and a second u undoes it there, in view.
    page.keyboard.press("u")
    expect(page.locator("#status")).to_contain_text("press u again")
    expect(page.locator("#facts")).to_contain_text(ids[1])
    assert _item_state(integration_settings, ids[1])[0] == "overturned_real"
    page.keyboard.press("u")
    expect(page.locator("#status")).to_have_text("decision undone")
    expect(page.locator("#facts")).to_contain_text("unreviewed")
    assert _item_state(integration_settings, ids[1]) == (
        None, [("overturned_real", "pat"), ("retracted", "pat")],
    )

    # After a reload the tab is still signed in; the queue holds the undecided items only.
    page.reload()
    expect(page.locator("#whoami")).to_have_text("signed in as pat")
    expect(cards).to_have_count(2)
    assert [cards.nth(i).get_attribute("data-id") for i in range(2)] == ids[1:3]

    # Browsing by decision finds the first item, with its history.
    page.click("#tab-browse")
    page.select_option("#f-decision", "confirmed_fake")
    page.click("#apply")
    expect(cards).to_have_count(1)
    expect(cards.nth(0)).to_contain_text("confirmed_fake")
    expect(page.locator("#history")).to_contain_text("pat: confirmed_fake")

    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert errors == []


def _set_sha256(settings, hashes: dict[str, str]) -> None:
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        for item_id, digest in hashes.items():
            session.get(Item, item_id).sha256 = digest
    engine.dispose()


def test_undo_retracts_the_open_item_and_twins_and_heatmap_text_stay_put(
    server, browser_page, integration_settings, s3_buckets, make_api_key
):
    from playwright.sync_api import expect

    page, errors = browser_page
    s3, (bucket, _extra) = s3_buckets
    for index in range(3):
        s3.put_object(Bucket=bucket, Key=f"undo/{index}.jpg", Body=make_image_bytes(size=(200, 200), color=(80 * index, 30, 60)))
    ids = seed_items(
        integration_settings,
        [{"score": score, "key": f"undo/{i}.jpg", "source": f"s-{i}"} for i, score in enumerate((0.95, 0.85, 0.75))],
    )
    same, other = "ab" * 32, "cd" * 32
    _set_sha256(integration_settings, {ids[0]: same, ids[1]: other, ids[2]: same})  # first and third: same bytes
    key = make_api_key("review", name="quinn")

    page.goto(f"{server}/review")
    page.fill("#key-input", key)
    page.click("#signin-button")
    cards = page.locator("#list .card")
    expect(cards).to_have_count(3)
    expect(cards.nth(0).locator(".twin")).to_have_text("same image as #3")
    expect(cards.nth(2).locator(".twin")).to_have_text("same image as #1")
    expect(cards.nth(1).locator(".twin")).to_have_count(0)

    page.keyboard.press("f")  # first item: fake; moves to the second
    expect(page.locator("#facts")).to_contain_text(ids[1])
    page.keyboard.press("r")  # second: real; moves to the third
    expect(page.locator("#facts")).to_contain_text(ids[2])
    assert _item_state(integration_settings, ids[1])[0] == "overturned_real"

    # Reopen the first item and undo: its own decision goes, the later decision on the second stays.
    cards.nth(0).click()
    expect(page.locator("#facts")).to_contain_text(ids[0])
    expect(page.locator("#undo")).to_be_enabled()
    page.keyboard.press("u")
    expect(page.locator("#status")).to_have_text("decision undone")
    expect(page.locator("#facts")).to_contain_text("unreviewed")
    assert _item_state(integration_settings, ids[0]) == (None, [("confirmed_fake", "quinn"), ("retracted", "quinn")])
    assert _item_state(integration_settings, ids[1]) == ("overturned_real", [("overturned_real", "quinn")])

    # The heatmap message belongs to its item: it is gone once the next item opens, and stays gone while
    # the first item's heatmap is still being polled (no worker runs here, so it answers 202).
    page.keyboard.press("h")
    expect(page.locator("#status")).to_have_text("making the heatmap…")
    page.keyboard.press("j")
    expect(page.locator("#facts")).to_contain_text(ids[1])
    expect(page.locator("#status")).not_to_contain_text("heatmap")
    page.wait_for_timeout(2500)  # two more polling rounds of the old item
    expect(page.locator("#status")).not_to_contain_text("heatmap")
    assert errors == []


def test_face_boxes_are_drawn_where_the_faces_are(server, browser_page, integration_settings, s3_buckets, make_api_key):
    """A face-stage verdict's boxes (pixels of the uploaded image) land on the same spots of the displayed
    image, whatever size the page shows it at; the flagged face is marked as such, and an item without faces
    shows no box."""
    from playwright.sync_api import expect

    from dfmod.db import VerdictFace

    page, errors = browser_page
    s3, (bucket, _extra) = s3_buckets
    s3.put_object(Bucket=bucket, Key="faces/group.jpg", Body=make_image_bytes(size=(2000, 1000), color=(90, 90, 90)))
    s3.put_object(Bucket=bucket, Key="faces/plain.jpg", Body=make_image_bytes(size=(400, 300), color=(20, 90, 30)))
    version = "m1+faces"
    ids = seed_items(integration_settings, [
        {"score": 0.91, "key": "faces/group.jpg", "model_version": version},
        {"score": 0.85, "key": "faces/plain.jpg"},
    ])
    boxes = [(200, 100, 600, 500, 0.99, 0.91), (1400, 500, 1600, 700, 0.95, 0.12)]
    engine = make_engine(integration_settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        session.add_all(
            VerdictFace(item_id=ids[0], model_version=version, face_index=index, x0=x0, y0=y0, x1=x1, y1=y1,
                        detector_score=det, fake_probability=p)
            for index, (x0, y0, x1, y1, det, p) in enumerate(boxes)
        )
    engine.dispose()
    page.set_viewport_size({"width": 1400, "height": 900})
    page.goto(f"{server}/review")
    page.fill("#key-input", make_api_key("review", name="faces"))
    page.click("#signin-button")
    expect(page.locator("#facts")).to_contain_text(ids[0])
    faces = page.locator("#faces .face")
    expect(faces).to_have_count(2)
    expect(faces.nth(0)).to_have_class("face flagged")
    expect(faces.nth(1)).to_have_class("face")
    expect(faces.nth(0)).to_contain_text("0.910")
    image = page.locator("#full").bounding_box()
    assert image["width"] < 2000  # shown scaled down: the boxes must follow
    scale = image["width"] / 2000
    for index, (x0, y0, x1, y1, _det, _p) in enumerate(boxes):
        drawn = faces.nth(index).bounding_box()
        assert abs(drawn["x"] - (image["x"] + x0 * scale)) < 2
        assert abs(drawn["y"] - (image["y"] + y0 * scale)) < 2
        assert abs(drawn["width"] - (x1 - x0) * scale) < 2
        assert abs(drawn["height"] - (y1 - y0) * scale) < 2
    page.keyboard.press("j")
    expect(page.locator("#facts")).to_contain_text(ids[1])
    page.wait_for_function("() => document.querySelector('#full').naturalWidth === 400")
    expect(page.locator("#faces .face")).to_have_count(0)
    assert not errors
