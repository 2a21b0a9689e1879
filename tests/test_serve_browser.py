"""The page of `tipcap serve` in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
which `.ci/run` installs), driven by Selenium with the system driver and no network."""

import hashlib
import http.server
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from serving import build_model, png

from tipcap.app.server import serving
from tipcap.app.service import CaptionService, load_models

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ELSEWHERE = "evil.example"
"""Another site's name, which the browser resolves to this machine (as DNS rebinding makes it)."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    """The length of a longest common subsequence of two word lists."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(word in rest for word in part)


def open_page(browser, url: str, wait) -> None:
    """Load the page and wait until it has read the served methods."""
    from selenium.webdriver.common.by import By

    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")


def pick(browser, image: Path):
    """Choose an image through the page's file input (unhidden, as a user's file dialog would fill it)."""
    from selenium.webdriver.common.by import By

    picker = browser.find_element(By.ID, "files")
    browser.execute_script("arguments[0].hidden = false", picker)
    picker.send_keys(str(image))
    return picker


def rounds(card, count: int):
    """A wait condition: the card has finished its ``count``-th round of captions."""
    return lambda d: (
        card.get_attribute("data-state") == "done" and card.get_attribute("data-requests") == str(count)
    )


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium with the flags a closed network needs, through the system chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,800", f"--user-data-dir={tmp_path / 'profile'}",
                 f"--host-resolver-rules=MAP {ELSEWHERE} 127.0.0.1"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_upload_caption_click_a_guess_and_recaption(browser, tmp_path, tiny_clip):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    models = [
        build_model(tmp_path / "hard", tiny_clip, "hard", 0),
        build_model(tmp_path / "plain", tiny_clip, "none", 1),
    ]
    (tmp_path / "red.png").write_bytes(png((200, 30, 30)))
    (tmp_path / "notes.png").write_bytes(b"not an image at all")
    wait = WebDriverWait(browser, 60)

    with serving(CaptionService(load_models(models, device="cpu"))) as url:
        open_page(browser, url, wait)
        picker = pick(browser, tmp_path / "red.png")
        card = browser.find_element(By.CSS_SELECTOR, ".card")
        wait.until(rounds(card, 1))
        row = 'tr[data-method="hard"]'
        first = (
            card.find_element(By.CSS_SELECTOR, f"{row} td.caption")
            .find_element(By.CSS_SELECTOR, ".text")
            .text
        )
        plain = card.find_element(By.CSS_SELECTOR, f"{row} td.plain").text
        assert first and first == plain
        chips = card.find_elements(By.CSS_SELECTOR, ".chip")
        assert len(chips) == 5 and all(chip.text.endswith("%") for chip in chips)

        word = chips[-1].get_attribute("data-word")
        chips[-1].click()
        wait.until(rounds(card, 2))
        prompt = [
            tag.get_attribute("data-word") for tag in card.find_elements(By.CSS_SELECTOR, ".prompt-word")
        ]
        assert prompt == [word]
        captioned = card.find_element(By.CSS_SELECTOR, f"{row} td.caption")
        assert captioned.get_attribute("data-prompt") == word
        assert (
            captioned.find_element(By.CSS_SELECTOR, ".text").text != first
        )  # a hard-prompt model reads the word
        assert card.find_element(By.CSS_SELECTOR, f"{row} td.plain").text == plain
        assert "used" in card.find_element(By.CSS_SELECTOR, f'.chip[data-word="{word}"]').get_attribute(
            "class"
        )
        # Chips say whether they are pressed, remove buttons name their word, the word box is labelled.
        pressed = {c.get_attribute("data-word"): c.get_attribute("aria-pressed") for c in card.find_elements(
            By.CSS_SELECTOR, ".chip")}  # fmt: skip
        assert pressed == {w: "true" if w == word else "false" for w in pressed}
        remove = card.find_element(By.CSS_SELECTOR, ".prompt-word .remove")
        assert remove.get_attribute("aria-label") == f"remove {word}"
        words_box = card.find_element(By.CSS_SELECTOR, "input.words")
        assert browser.execute_script("return arguments[0].labels[0].textContent.trim()", words_box) == (
            "Prompt words"
        )
        # The words the prompt changed are marked: the unmarked ones are, in order, a longest common
        # subsequence of the caption without prompt's words and the caption's (recomputed here).
        text = captioned.find_element(By.CSS_SELECTOR, ".text")
        pieces = browser.execute_script(
            "return [...arguments[0].childNodes].flatMap((n) => n.nodeType === 3 ? "
            "n.textContent.split(/\\s+/).filter(Boolean).map((w) => [w, false]) : [[n.textContent, true]])",
            text,
        )
        shown = [w for w, _ in pieces]
        kept = [w for w, changed in pieces if not changed]
        assert shown == text.text.split()
        assert len(kept) == longest_common_subsequence(plain.split(), shown) and is_subsequence(
            kept, plain.split()
        )
        assert any(changed for _, changed in pieces) == (shown != plain.split())

        words = card.find_element(By.CSS_SELECTOR, "input.words")
        words.send_keys("blue square", Keys.ENTER)
        wait.until(rounds(card, 3))
        assert card.find_element(By.CSS_SELECTOR, f"{row} td.caption").get_attribute("data-prompt") == (
            f"{word}, blue square"
        )
        # The prompt words the caption does not name are flagged under it.
        captioned = card.find_element(By.CSS_SELECTOR, f"{row} td.caption")
        said = (
            f" {' '.join(captioned.find_element(By.CSS_SELECTOR, '.text').text.replace('.', ' ').split())} "
        )
        missing = [w for w in (word, "blue square") if f" {w} " not in said]
        flagged = captioned.find_elements(By.CSS_SELECTOR, ".missing")
        assert [f.text for f in flagged] == ([f"not in the caption: {', '.join(missing)}"] if missing else [])
        card.find_element(By.CSS_SELECTOR, "button.add").click()  # with nothing typed
        assert "Empty prompt" in card.find_element(By.CSS_SELECTOR, ".error").text

        # Both methods side by side; the one trained without prompts says so.
        browser.find_element(By.CSS_SELECTOR, '#method option[value="*"]').click()
        wait.until(rounds(card, 4))
        methods = [r.get_attribute("data-method") for r in card.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert methods == ["hard", "plain"]
        assert "without prompts" in card.find_element(By.CSS_SELECTOR, 'tr[data-method="plain"]').text

        picker.send_keys(str(tmp_path / "notes.png"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.card[data-state="error"]')) == 1)
        bad = browser.find_element(By.CSS_SELECTOR, '.card[data-state="error"] .error').text
        assert bad.startswith("notes.png: not an image")
        screenshot = tmp_path / "serve.png"
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:4] == b"\x89PNG" and os.path.getsize(screenshot) > 10_000

        # On a phone's width every caption, with prompt too, lies within the page.
        browser.set_window_size(420, 900)
        wait.until(lambda d: d.execute_script("return document.documentElement.clientWidth") <= 420)
        width = browser.execute_script("return document.documentElement.clientWidth")
        for cell in browser.find_elements(By.CSS_SELECTOR, ".card td.caption, .card td.plain"):
            left, right = browser.execute_script(
                "const r = arguments[0].getBoundingClientRect(); return [r.left, r.right]", cell
            )
            assert 0 <= left < right <= width, (left, right, width)
        assert browser.save_screenshot(str(tmp_path / "serve-420.png"))


@contextmanager
def another_site() -> Iterator[str]:
    """A blank page served from another port, as another site's page; yields its address."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>elsewhere</title><p>elsewhere</p>")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{ELSEWHERE}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_other_sites_cannot_drive_the_server_and_its_own_page_can(browser, tmp_path, tiny_clip):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = png((200, 30, 30))
    (tmp_path / "red.png").write_bytes(data)
    image_id = hashlib.sha256(data).hexdigest()[:32]  # the id the server keeps the image under
    wait = WebDriverWait(browser, 60)
    service = CaptionService(
        load_models([build_model(tmp_path / "hard", tiny_clip, "hard", 0)], device="cpu")
    )
    with serving(service) as url, another_site() as elsewhere, httpx.Client(base_url=url) as http:

        def held() -> bool:
            answer = http.post("/api/caption", json={"image_id": image_id, "method": "hard"})
            assert answer.status_code in (200, 404), answer.text
            return answer.status_code == 200

        # Another site's page posts the image and a caption request as text/plain, which a browser sends
        # across sites without asking the server first; the answers are opaque to that page.
        browser.get(elsewhere)
        sent = browser.execute_async_script(
            """
            const [url, bytes, payload, done] = arguments;
            const post = (path, body) => fetch(url + path, {
              method: "POST", mode: "no-cors", headers: { "Content-Type": "text/plain" }, body });
            post("api/images?name=red.png", new Uint8Array(bytes))
              .then(() => post("api/caption", payload))
              .then(() => done("sent"), (error) => done(String(error)));
            """,
            url,
            list(data),
            json.dumps({"image_id": image_id, "method": "hard"}),
        )
        assert sent == "sent" and not held()  # the browser sent both, the server kept nothing

        # The server reached under the other site's name: the page is not served.
        port = urlsplit(url).port
        browser.get(f"http://{ELSEWHERE}:{port}/")
        refused = browser.execute_script("return document.querySelector('pre').textContent")
        assert json.loads(refused) == {
            "error": f"Host '{ELSEWHERE}:{port}' does not name this server; open {url}."
        }

        # The server's own page uploads and captions the image.
        open_page(browser, url, wait)
        pick(browser, tmp_path / "red.png")
        card = browser.find_element(By.CSS_SELECTOR, ".card")
        wait.until(lambda d: card.get_attribute("data-state") in ("done", "error"))
        assert card.get_attribute("data-state") == "done", card.text
        assert card.find_element(By.CSS_SELECTOR, 'tr[data-method="hard"] td.plain').text
        assert held()


def test_the_page_takes_as_many_prompt_words_as_the_method_shown_reads(browser, tmp_path, tiny_clip):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    models = [
        build_model(tmp_path / "hard", tiny_clip, "hard", 0),
        build_model(tmp_path / "pim", tiny_clip, "pim", 5),  # reads 8 prompt words
    ]
    (tmp_path / "red.png").write_bytes(png((200, 30, 30)))
    words = [
        "red circle",
        "blue square",
        "green triangle",
        "yellow star",
        "purple ring",
        "dog",
        "cat",
        "tree",
    ]
    wait = WebDriverWait(browser, 60)
    with serving(CaptionService(load_models(models, device="cpu"))) as url:
        open_page(browser, url, wait)
        browser.find_element(By.CSS_SELECTOR, '#method option[value="pim"]').click()
        pick(browser, tmp_path / "red.png")
        card = browser.find_element(By.CSS_SELECTOR, ".card")

        def prompt() -> list[str]:
            return [
                tag.get_attribute("data-word") for tag in card.find_elements(By.CSS_SELECTOR, ".prompt-word")
            ]

        wait.until(rounds(card, 1))
        box = card.find_element(By.CSS_SELECTOR, "input.words")
        box.send_keys(", ".join([*words, "boat"]), Keys.ENTER)  # nine words: refused on the page
        assert card.find_element(By.CSS_SELECTOR, ".error").text == "At most 8 prompt words for pim."
        assert prompt() == [] and card.get_attribute("data-requests") == "1"

        box.clear()
        box.send_keys(", ".join(words), Keys.ENTER)
        wait.until(rounds(card, 2))
        assert prompt() == words
        assert card.find_element(By.CSS_SELECTOR, 'tr[data-method="pim"] td.caption').get_attribute(
            "data-prompt"
        ) == ", ".join(words)

        # The hard-prompt method takes the server's 16 words.
        browser.find_element(By.CSS_SELECTOR, '#method option[value="hard"]').click()
        wait.until(rounds(card, 3))
        box.send_keys("boat", Keys.ENTER)
        wait.until(rounds(card, 4))
        assert prompt() == [*words, "boat"]


def test_clicking_a_guess_adds_its_object_to_the_quick_demo_s_caption(browser, quick_demo):
    """The quick demo's page as a newcomer meets it: its prompt-trained method is the default, CLIP's
    guesses are there to click, and clicking one that the caption left out brings it into the caption.
    The image is the first test scene (in file order) whose caption without prompt leaves out one of its
    objects that CLIP guesses; that choice is made through the library, the clicking through the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tipcap.app.service import find_models
    from tipcap.evaluation.registry import ground_truth
    from tipcap.model import TIPCap

    out, cache, result = quick_demo
    assert result.returncode == 0, result.stderr
    models = find_models(out)
    service = CaptionService(load_models([out], device="cpu"))
    default = service.describe()["default"]
    assert default == "gaussian-few-pairs-prompts" and service.models[default].config.prompt == "pim"

    karpathy = next(cache.glob("toyworld2-*/toyworld.json"))
    entries = [e for e in json.loads(karpathy.read_text())["images"] if e["split"] == "test"]
    truth = ground_truth(karpathy)
    objects, scene_mentions = truth.objects, truth.mentions
    model = TIPCap.from_pretrained(models[default], device="cpu")
    chosen = None
    for entry in entries[:50]:
        path = karpathy.parent / entry["filepath"] / entry["filename"]
        plain = model.caption([path], num_beams=3)[0].caption
        embedding = model.pipeline.embed_images([path])[0]
        guesses = [word for word, _ in model.pipeline.entity_guesses(embedding, top_k=5, threshold=None)[0]]
        left_out = [
            w
            for w in guesses
            if w in objects[Path(entry["filename"]).stem] and w not in scene_mentions(plain)
        ]
        if left_out:
            chosen = (path, left_out[0])
            break
    assert chosen is not None, "no test scene of the first 50 has a guessed object its caption leaves out"
    image, word = chosen

    wait = WebDriverWait(browser, 120)
    with serving(service) as url:
        open_page(browser, url, wait)
        pick(browser, image)
        card = browser.find_element(By.CSS_SELECTOR, ".card")
        wait.until(rounds(card, 1))
        row = f'tr[data-method="{default}"]'
        plain = card.find_element(By.CSS_SELECTOR, f"{row} td.plain").text
        assert word not in scene_mentions(plain)
        card.find_element(By.CSS_SELECTOR, f'.chip[data-word="{word}"]').click()
        wait.until(rounds(card, 2))
        captioned = card.find_element(By.CSS_SELECTOR, f"{row} td.caption")
        assert captioned.get_attribute("data-prompt") == word
        caption = captioned.find_element(By.CSS_SELECTOR, ".text").text
        assert word in scene_mentions(caption), (plain, word, caption)
        assert captioned.find_elements(By.CSS_SELECTOR, ".missing") == []
        browser.set_window_size(1200, 900)
        assert browser.save_screenshot(str(out / "page-1200.png"))
        browser.set_window_size(420, 900)
        wait.until(lambda d: d.execute_script("return document.documentElement.clientWidth") <= 420)
        assert browser.save_screenshot(str(out / "page-420.png"))
