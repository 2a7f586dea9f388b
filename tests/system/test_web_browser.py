"""The page in a real browser: Playwright for Python driving Debian's chromium (launched by its path; no
browser download) against the gateway and both services in process, on a few hundred MNIST digits.

Uploads a digit that is not indexed and checks the first result's label, chooses k, draws on the canvas,
clicks a result for "more like this", shows why a result matched, renders a hostile id as text, and shows
a clear message once the index is down. Saves a screenshot to out/web.png; with IMGSEARCH_WEB_SCREENSHOT
set to a path (docs/web.png), also writes the README's small PNG there from the same run.

Skipped, with the reason, only when no chromium executable is found (IMGSEARCH_CHROMIUM, /usr/bin/chromium,
/usr/bin/chromium-browser) or Playwright is not installed; `make setup` installs both where it can."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgsearch import security
from imgsearch.client import ImageSearch
from index_service.service import IndexService
from tests.support import (
    HOSTILE_ID,
    HOSTILE_LABEL,
    ROOT,
    Gateway,
    address,
    index_folder,
    mnist_sample,
    png,
    start_encoder,
    start_index,
    write_digits,
)
from web.settings import Settings

SCREENSHOT = ROOT / "out" / "web.png"
README_WIDTH = 1000
INDEXED = 300
QUERY = 9500  # a sample digit that is not indexed
TIMEOUT_MS = 15000
READ_TOKEN = "page r3ad+token;="  # characters the cookie must carry encoded


def chromium_path() -> str | None:
    """The chromium to drive: IMGSEARCH_CHROMIUM, else Debian's."""
    candidates = [os.environ.get("IMGSEARCH_CHROMIUM", ""), "/usr/bin/chromium", "/usr/bin/chromium-browser"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found


CHROMIUM = chromium_path()
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium executable (set IMGSEARCH_CHROMIUM, or apt-get install chromium: `make setup` "
        "does it as root)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="Playwright for Python is not installed (pip install -e '.[dev]')",
    ),
]


@dataclass
class Stack:
    url: str
    index: IndexService
    query: Path
    query_label: str
    hostile_image: Path
    search: ImageSearch  # to add items once the page is open
    media: Path  # the gateway's media root


@contextmanager
def running_stack(tmp_path: Path, indexed: int = INDEXED, **changes: object) -> Iterator[Stack]:
    """Both services, `indexed` digits and the hostile item, and the gateway (its settings changed by
    `changes`)."""
    media = tmp_path / "media"
    media.mkdir()
    write_digits(media / "digits", indexed)
    x, y = mnist_sample(2, QUERY)
    query = tmp_path / "query.png"
    query.write_bytes(png(x[0]))
    hostile_image = media / "hostile.png"  # its own image, so that uploading it finds it first
    hostile_image.write_bytes(png(x[1]))
    encoder, index = start_encoder(), start_index(tmp_path / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")
        search.add(
            [HOSTILE_ID],
            [hostile_image.read_bytes()],
            [{"label": HOSTILE_LABEL, "source": str(hostile_image)}],
        )
        settings = Settings(
            encoder=address(encoder), index=address(index), media_root=media.resolve(), timeout_s=5
        )
        with Gateway(replace(settings, **changes)) as gateway:  # type: ignore[arg-type]
            yield Stack(gateway.url, index, query, str(y[0]), hostile_image, search, media)
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path) as running:
        yield running


def save_screenshot(page: Any, path: Path, readme_path: str | None) -> None:
    """The page as the user sees it, to `path`; with `readme_path`, also a small palette PNG there (the
    README's picture, made by this same run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = page.screenshot(path=str(path))
    if not readme_path:
        return
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.width > README_WIDTH:
        image = image.resize(
            (README_WIDTH, round(image.height * README_WIDTH / image.width)), Image.Resampling.LANCZOS
        )
    small = image.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    target = Path(readme_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    small.save(target, format="PNG", optimize=True)


def test_the_page_in_a_real_browser(stack: Stack) -> None:
    from playwright.sync_api import Dialog, expect, sync_playwright

    dialogs: list[str] = []
    errors: list[str] = []
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)

            def on_dialog(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(stack.url)
            expect(page.locator("body")).to_have_attribute("data-ready", "1")
            expect(page.locator("#stats")).to_contain_text(f"{INDEXED + 1} images")
            expect(page.locator("#stats")).to_contain_text("128-d")
            cards = page.locator("#results .card")

            # Draw a 7 on the canvas: its PNG goes through the same preprocessing, and finds results.
            box = page.locator("#canvas").bounding_box()
            assert box is not None

            def at(x: float, y: float) -> tuple[float, float]:
                return box["x"] + box["width"] * x, box["y"] + box["height"] * y

            page.mouse.move(*at(0.25, 0.2))
            page.mouse.down()
            page.mouse.move(*at(0.75, 0.2), steps=10)
            page.mouse.move(*at(0.45, 0.85), steps=12)
            page.mouse.up()
            expect(page.locator("#query-title")).to_have_text("Your drawing")
            expect(cards).to_have_count(10)
            for view in ("#query-input", "#query-reconstruction"):
                expect(page.locator(view)).to_be_visible()
                assert (page.locator(view).get_attribute("src") or "").startswith("data:image/png;base64,")
                assert page.locator(view).evaluate("img => img.naturalWidth") == 28

            # Hover over a result: why it matched, as the model sees it.
            cards.first.hover()
            expect(page.locator("#detail")).to_be_visible()
            first_id = cards.first.locator(".id").text_content() or ""
            expect(page.locator("#detail-id")).to_have_text(first_id)
            expect(page.locator("#detail-input")).to_be_visible()
            expect(page.locator("#detail-reconstruction")).to_be_visible()
            thumbnail = cards.first.locator("img.thumb")
            expect(thumbnail).to_be_visible()
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle()
            )
            save_screenshot(page, SCREENSHOT, os.environ.get("IMGSEARCH_WEB_SCREENSHOT"))

            # Upload a digit that is not indexed: the first result has its label.
            page.set_input_files("#file", str(stack.query))
            expect(page.locator("#query-title")).to_have_text("Your image")
            expect(cards).to_have_count(10)
            expect(cards.first.locator(".label")).to_have_text(stack.query_label)
            expect(page.locator("#query-input")).to_be_visible()
            expect(page.locator("#query-reconstruction")).to_be_visible()

            # k is selectable: the search runs again.
            page.select_option("#k", "5")
            expect(cards).to_have_count(5)

            # Click a result: more like this (SearchById), the item itself left out.
            clicked = cards.nth(1).locator(".id").text_content() or ""
            cards.nth(1).locator("button.open").click()
            expect(page.locator("#results-title")).to_have_text(f"More like {clicked}")
            expect(cards).to_have_count(5)
            assert clicked not in cards.locator(".id").all_text_contents()
            expect(page.locator("#query-input")).to_be_visible()

            # A hostile id renders as text.
            page.set_input_files("#file", str(stack.hostile_image))
            expect(page.locator("#results-title")).to_have_text("Most similar")
            expect(cards.first.locator(".id")).to_have_text(HOSTILE_ID)
            expect(cards.first.locator(".label")).to_have_text(HOSTILE_LABEL)
            cards.first.locator("button.why").click()
            expect(page.locator("#detail-id")).to_have_text(HOSTILE_ID)
            cards.first.locator("button.open").click()
            expect(page.locator("#query-title")).to_have_text(f"More like {HOSTILE_ID}")
            assert page.locator('img[src="x"]').count() == 0
            assert page.locator("b[onmouseover]").count() == 0
            assert "&lt;img src=x" in page.locator("#query-title").inner_html()

            # The index goes down: a clear message that names it.
            stack.index.stop(0)
            page.click("#search-drawing")
            expect(page.locator("#status")).to_be_visible()
            expect(page.locator("#status")).to_contain_text("index service")
            expect(page.locator("#status")).to_contain_text("not reachable")

            assert not dialogs, f"a dialog opened: {dialogs}"
            assert not errors, f"errors on the page: {errors}"
        finally:
            browser.close()


GUARDED_INDEXED = 50


def test_the_page_asks_for_the_read_token(tmp_path: Path) -> None:
    """A gateway with --read-token: the page asks for it, says when it is refused, keeps it in a SameSite
    cookie, and then searches, its thumbnails (plain <img src>) included."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with (
        running_stack(tmp_path, GUARDED_INDEXED, read_token=security.Secret(READ_TOKEN)) as stack,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 760})
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(stack.url)
            form = page.locator("#token-form")
            expect(form).to_be_visible()
            expect(page.locator("#token-note")).to_contain_text("read token")
            assert page.locator("body").get_attribute("data-ready") is None, "no data without the token"

            page.fill("#token-input", "wrong")
            page.click("#token-form button[type=submit]")
            expect(form).to_be_visible()
            expect(page.locator("#token-note")).to_contain_text("invalid")

            page.fill("#token-input", READ_TOKEN)
            page.click("#token-form button[type=submit]")
            expect(page.locator("body")).to_have_attribute("data-ready", "1")
            expect(form).to_be_hidden()
            expect(page.locator("#stats")).to_contain_text(f"{GUARDED_INDEXED + 1} images")
            (cookie,) = [c for c in context.cookies() if c["name"] == "imgsearch_read_token"]
            assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"

            page.set_input_files("#file", str(stack.query))
            cards = page.locator("#results .card")
            expect(cards).to_have_count(10)
            thumbnail = cards.first.locator("img.thumb")
            expect(thumbnail).to_be_visible()
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle()
            )
            # a reload keeps the cookie: no question asked again
            page.reload()
            expect(page.locator("body")).to_have_attribute("data-ready", "1")
            expect(form).to_be_hidden()
            assert not errors, f"errors on the page: {errors}"
        finally:
            browser.close()


LONG_ID = ("a-folder-with-a-rather-long-name/" * 7)[:191] + "/0001.png"  # 200 characters, no space
LONG_LABEL = "a_label_far_longer_than_any_card_is_wide_" * 4  # no place to break a line at


def test_long_ids_and_labels_keep_to_their_card(tmp_path: Path) -> None:
    """A 200-character id and a long label: each on one line within its card, cut with an ellipsis, the
    whole text in its tooltip; neither box meets the distance's, which shows whole; the card no taller
    than the others. At a desktop and a phone's width. And the header counts `1 image`."""
    from playwright.sync_api import expect, sync_playwright

    def meet(a: Any, b: Any) -> bool:  # two of Playwright's bounding boxes
        return (
            a["x"] < b["x"] + b["width"]
            and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"]
            and b["y"] < a["y"] + a["height"]
        )

    def within(inner: Any, outer: Any) -> bool:
        return outer["x"] <= inner["x"] and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 0.5

    errors: list[str] = []
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with running_stack(tmp_path, 0) as stack, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(stack.url)
            expect(page.locator("body")).to_have_attribute("data-ready", "1")
            expect(page.locator("#stats")).to_contain_text("1 image ·")  # the hostile item alone

            image = stack.media / "long.png"
            image.write_bytes(png(mnist_sample(1, QUERY + 2)[0][0]))
            stack.search.add([LONG_ID], [image.read_bytes()], [{"label": LONG_LABEL, "source": str(image)}])
            page.set_input_files("#file", str(image))
            cards = page.locator("#results .card")
            expect(cards).to_have_count(2)
            long_card = cards.first
            expect(long_card.locator(".id")).to_have_text(LONG_ID)  # the text is whole, the view cut
            assert long_card.locator(".id").get_attribute("title") == LONG_ID
            assert LONG_LABEL in (long_card.locator(".label").get_attribute("title") or "")

            for width in (1000, 420):
                page.set_viewport_size({"width": width, "height": 760})
                boxes = {}
                for part in ("card", "id", "label", "distance"):
                    target = long_card if part == "card" else long_card.locator(f".{part}")
                    box = target.bounding_box()
                    assert box is not None, part
                    boxes[part] = box
                assert not meet(boxes["id"], boxes["distance"]), (width, boxes)
                assert not meet(boxes["label"], boxes["distance"]), (width, boxes)
                for part in ("id", "label", "distance"):
                    assert within(boxes[part], boxes["card"]), (width, part, boxes)
                for part in ("id", "label"):  # one line each: less than two lines' height
                    font_px = long_card.locator(f".{part}").evaluate(
                        "node => parseFloat(getComputedStyle(node).fontSize)"
                    )
                    assert boxes[part]["height"] < 2 * font_px, (width, part, boxes)
                assert boxes["card"]["height"] < 2 * boxes["card"]["width"], (width, boxes)  # image + 3 lines
                distance = long_card.locator(".distance")
                assert distance.evaluate("node => node.scrollWidth <= node.clientWidth"), width  # shown whole
            assert not errors, f"errors on the page: {errors}"
        finally:
            browser.close()


PICKER_DIGITS = 20
PICKER_CLOTHES = 4


def test_the_collection_picker_lists_the_collections_and_keeps_the_pick_in_the_url(tmp_path: Path) -> None:
    """Two collections (digits in `default`, a few other images in `clothes`, filled by the model `fashion`)
    and an alias: the picker lists them all, the alias as `live → clothes`; picking one puts it in the URL,
    a search answers from it (the reply's collection shown), and a reload of that URL keeps it."""
    from playwright.sync_api import expect, sync_playwright

    media = tmp_path / "media"
    write_digits(media / "digits", PICKER_DIGITS)
    clothes = []
    for n, pixels in enumerate(mnist_sample(PICKER_CLOTHES, QUERY + 10)[0]):
        path = media / "clothes" / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(pixels))
        clothes.append(path)
    errors: list[str] = []
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    encoder, index = start_encoder("--models", "default,fashion"), start_index(tmp_path / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")
        search.index.create_collection("clothes", "fashion")
        search.add(
            [f"clothes/{p.name}" for p in clothes],
            [p.read_bytes() for p in clothes],
            [{"label": "garment", "source": str(p)} for p in clothes],
            collection="clothes",
        )
        search.index.set_alias("live", "clothes")
        settings = Settings(encoder=address(encoder), index=address(index), media_root=media.resolve())
        with Gateway(settings) as gateway, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 760})
                page.set_default_timeout(TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(gateway.url)
                expect(page.locator("body")).to_have_attribute("data-ready", "1")
                picker = page.locator("#collection")
                assert picker.locator("option").all_text_contents() == [
                    f"clothes (fashion, {PICKER_CLOTHES} images)",
                    f"default (default, {PICKER_DIGITS} images)",
                    "live → clothes",
                ]
                expect(picker).to_have_value("default")
                expect(page.locator("#stats")).to_contain_text(f"default · {PICKER_DIGITS} images")

                page.select_option("#collection", "clothes")
                page.wait_for_url("**/?collection=clothes")
                expect(page.locator("#stats")).to_contain_text(f"clothes · {PICKER_CLOTHES} images")
                page.set_input_files("#file", str(clothes[1]))
                cards = page.locator("#results .card")
                expect(cards).to_have_count(PICKER_CLOTHES)
                expect(cards.first.locator(".id")).to_have_text("clothes/1.png")
                answered = page.locator("#results-collection")
                expect(answered).to_have_text("answered by the collection clothes · model fashion")

                page.reload()  # the link keeps the collection
                expect(page.locator("body")).to_have_attribute("data-ready", "1")
                expect(picker).to_have_value("clothes")
                page.select_option("#collection", "live")
                page.wait_for_url("**/?collection=live")
                page.set_input_files("#file", str(clothes[2]))
                expect(cards.first.locator(".id")).to_have_text("clothes/2.png")
                expect(answered).to_contain_text("answered by the collection clothes (through live)")
                page.select_option("#collection", "default")  # the upload runs again, in the digits
                page.wait_for_url("**/?collection=default")
                expect(answered).to_contain_text("answered by the collection default · model default")
                expect(cards).to_have_count(10)
                assert not errors, f"errors on the page: {errors}"
            finally:
                browser.close()
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)


FILTER_DIGITS = 40


def test_the_label_filter_and_the_nothing_close_notice(tmp_path: Path) -> None:
    """The label chips (the collection's labels, from /api/labels) filter the results and stay in the URL,
    as does a label typed in; a blank image, far from every digit by a model whose card has a duplicate
    distance (a copy of the default model's directory, its card edited), gets the nothing-close notice
    above the results, and a stored digit none."""
    from playwright.sync_api import expect, sync_playwright

    shipped = ROOT / "encoder_service" / "models" / "default"
    model = tmp_path / "model"
    model.mkdir()
    for path in shipped.iterdir():
        if path.name != "card.json":
            (model / path.name).symlink_to(path)
    card = json.loads((shipped / "card.json").read_text())
    card.update(duplicate_distance=0.1, nothing_close_factor=5.0)
    (model / "card.json").write_text(json.dumps(card))
    media = tmp_path / "media"
    write_digits(media / "digits", FILTER_DIGITS)
    labels = [str(label) for label in mnist_sample(FILTER_DIGITS)[1]]
    query = tmp_path / "query.png"
    query.write_bytes(png(mnist_sample(1, QUERY)[0][0]))
    blank = tmp_path / "blank.png"
    Image.new("L", (28, 28), 0).save(blank)
    stored = next((media / "digits").rglob("*.png"))
    errors: list[str] = []
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    encoder, index = start_encoder("--models", f"default={model}"), start_index(tmp_path / "index")
    search = ImageSearch(address(encoder), address(index), 30)
    try:
        index_folder(search, media / "digits")
        settings = Settings(encoder=address(encoder), index=address(index), media_root=media.resolve())
        with Gateway(settings) as gateway, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 760})
                page.set_default_timeout(TIMEOUT_MS)
                expect.set_options(timeout=TIMEOUT_MS)
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(gateway.url)
                expect(page.locator("body")).to_have_attribute("data-ready", "1")
                chips = page.locator("#label-chips .chip")
                shown: list[str] = sorted(set(labels), key=int)
                expect(chips).to_have_text(shown)
                cards = page.locator("#results .card")
                page.set_input_files("#file", str(query))
                expect(cards).to_have_count(10)

                three = page.locator("#label-chips").get_by_role("button", name="3", exact=True)
                three.click()
                page.wait_for_url("**/?collection=default&label=3")
                expect(three).to_have_attribute("aria-pressed", "true")
                wanted = min(10, labels.count("3"))
                expect(cards.locator(".label")).to_have_text(["3"] * wanted)
                expect(page.locator("#results-filter")).to_have_text("filtered: label is 3")

                page.fill("#label-input", "5")  # a label typed in, as for one the sample missed
                page.press("#label-input", "Enter")
                page.wait_for_url("**/?collection=default&label=3&label=5")
                expect(page.locator("#results-filter")).to_have_text("filtered: label is one of 3, 5")
                expect(cards).to_have_count(min(10, labels.count("3") + labels.count("5")))
                assert set(cards.locator(".label").all_text_contents()) <= {"3", "5"}

                page.reload()  # the link keeps the filter
                expect(page.locator("body")).to_have_attribute("data-ready", "1")
                expect(page.locator("#label-chips .chip.chosen")).to_have_text(["3", "5"])
                page.click("#label-clear")
                page.wait_for_url(f"{gateway.url}/?collection=default")

                page.set_input_files("#file", str(blank))
                notice = page.locator("#results-notice")
                expect(notice).to_be_visible()
                expect(notice).to_contain_text("Nothing close: the nearest result is at")
                expect(notice).to_contain_text("past 5 x the model's duplicate distance 0.1")
                page.set_input_files("#file", str(stored))
                expect(cards.first.locator(".id")).to_have_text(
                    stored.relative_to(media / "digits").as_posix()
                )
                expect(notice).to_be_hidden()
                expect(page.locator("#results-filter")).to_be_hidden()
                assert not errors, f"errors on the page: {errors}"
            finally:
                browser.close()
    finally:
        search.close()
        index.stop(0)
        encoder.stop(0)
