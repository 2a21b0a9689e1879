"""`tipcap serve` through its HTTP interface: captions and re-captions with prompt words, bad inputs,
concurrent requests, the JSONL download, and the command line."""

import asyncio
import hashlib
import json
import logging
import re
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import run
from PIL import Image
from serving import VOCABULARY, build_model, encoded, jpeg, png
from starlette.testclient import TestClient

from tipcap.app.server import Listening, create_app, serving
from tipcap.app.service import CaptionService, find_models, load_models
from tipcap.model import TIPCap
from tipcap.pipeline import caption_record


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_clip):
    """Two untrained decoders on one tiny CLIP: ``hard`` (hard prompts) and ``plain`` (no prompts)."""
    root = tmp_path_factory.mktemp("served")
    return {
        "hard": build_model(root / "hard", tiny_clip, "hard", seed=0),
        "plain": build_model(root / "plain", tiny_clip, "none", seed=1),
    }


@pytest.fixture(scope="module")
def pim_dir(tmp_path_factory, tiny_clip):
    """An untrained prompt-interaction decoder on the tiny CLIP, which reads 8 prompt words (seeded so that
    its caption follows them)."""
    return build_model(tmp_path_factory.mktemp("served") / "pim", tiny_clip, "pim", seed=5)


WORDS = [*VOCABULARY, "dog", "cat", "tree", "car", "boat", "sun", "moon"]
"""Twelve prompt words."""
LONG_WORDS = [f"{' '.join('abcdefghijklmnopqrstuvwxyzabcde')} {letter}" for letter in "abcdefghijklmnop"]
"""Sixteen prompt words of 63 characters, as many and as long as the server takes: 32 tokens each to the
word-level tokenizer, so that a hard prompt of them takes 532 positions of the 64 the models have."""


@pytest.fixture(scope="module")
def service(model_dirs):
    return CaptionService(load_models(list(model_dirs.values()), device="cpu"), max_upload_bytes=20_000)


LOCAL = Listening("127.0.0.1", "127.0.0.1", 8000)


def local_client(service: CaptionService) -> TestClient:
    """A client of the app as ``tipcap serve`` serves it on 127.0.0.1:8000, addressed as a browser there."""
    return TestClient(create_app(service, LOCAL), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def client(service):
    with local_client(service) as client:
        yield client


def upload(client, data: bytes, name: str = "red.png", kind: str = "image/png") -> httpx.Response:
    return client.post("/api/images", params={"name": name}, content=data, headers={"Content-Type": kind})


def caption(client, image_id: str, method: str = "hard", prompt=None, beams: int = 2) -> httpx.Response:
    payload = {"image_id": image_id, "method": method, "prompt": prompt or [], "beams": beams}
    return client.post("/api/caption", json=payload)


def test_the_page_and_its_methods(client):
    page = client.get("/")
    assert page.status_code == 200 and "tipcap" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200
    methods = client.get("/api/methods").json()
    assert methods["methods"] == [
        {"name": "hard", "prompt": "hard", "max_prompt_words": 16},
        {"name": "plain", "prompt": "none", "max_prompt_words": 16},
    ]
    assert methods["default"] == "hard" and methods["max_upload_bytes"] == 20_000


def test_caption_then_recaption_with_prompt_words(client, model_dirs, tmp_path):
    data = png((200, 30, 30))
    held = upload(client, data, "red.png").json()
    assert held["image"] == "red.png" and (held["width"], held["height"]) == (40, 30)
    first = caption(client, held["image_id"]).json()

    (tmp_path / "red.png").write_bytes(data)
    model = TIPCap.from_pretrained(model_dirs["hard"], device="cpu")
    alone = model.caption(images=[tmp_path / "red.png"], num_beams=2)[0].caption
    assert first["caption"] == first["plain"] == alone and first["prompt"] == []

    # CLIP's guesses: the model's vocabulary, most probable first, with the model's own probabilities.
    embeddings, _, _ = model.pipeline.embed_images([tmp_path / "red.png"])
    expected = model.pipeline.entity_guesses(embeddings, top_k=5, threshold=None)[0]
    guesses = first["guesses"]
    assert [g["word"] for g in guesses] == [word for word, _ in expected]
    assert sorted(g["word"] for g in guesses) == sorted(VOCABULARY)
    assert [g["probability"] for g in guesses] == pytest.approx([p for _, p in expected], abs=1e-4)

    again = caption(client, held["image_id"], prompt=[guesses[-1]["word"]]).json()
    with_words = model.caption(images=[tmp_path / "red.png"], prompts=[guesses[-1]["word"]], num_beams=2)[0]
    assert again["prompt"] == [guesses[-1]["word"]] == with_words.prompt
    assert again["caption"] == with_words.caption != first["caption"]  # the words are in the context
    assert again["plain"] == first["caption"]  # the caption without prompt stays beside it


def test_the_answer_says_which_prompt_words_the_caption_names_and_which_the_model_does_not_know(client):
    image_id = upload(client, png((30, 30, 200)), "blue.png").json()["image_id"]
    words = ["blue square", "giraffe", "red circle"]
    answer = caption(client, image_id, prompt=words).json()
    assert answer["prompt"] == words
    # Recomputed from the caption's words: a prompt word is named when its words stand in a row there
    # (the tiny model's captions use the vocabulary's words as written).
    said = f" {' '.join(answer['caption'].replace('.', ' ').split())} "
    named = [word for word in words if f" {word} " in said]
    assert answer["mentioned"] == named and answer["missing"] == [w for w in words if w not in named]
    # giraffe is outside the model's entity vocabulary: the page is told what the model does with it.
    assert answer["unknown"] == ["giraffe"]
    assert answer["note"].startswith("“giraffe” is outside this model's vocabulary: it is written into")
    known = caption(client, image_id, prompt=["blue square"]).json()
    assert known["unknown"] == [] and known["note"] is None


def test_a_prompt_interaction_model_reports_the_prompt_words_it_read(pim_dir, tmp_path, caplog, monkeypatch):
    path = tmp_path / "red.png"
    path.write_bytes(png((200, 30, 30)))
    model = TIPCap.from_pretrained(pim_dir, device="cpu")
    assert model.config.max_prompt_words == 8
    # Heard on the package's logger itself, once, whether or not a command ran in this process before.
    package_logger = logging.getLogger("tipcap")
    monkeypatch.setattr(package_logger, "propagate", False)
    package_logger.addHandler(caplog.handler)
    try:
        twelve = model.caption(images=[path], prompts=WORDS, num_beams=2, workers=0)[0]
    finally:
        package_logger.removeHandler(caplog.handler)
    assert twelve.prompt == WORDS[:8] and caption_record(twelve)["prompt"] == WORDS[:8]
    read = model.caption(images=[path], prompts=twelve.prompt, num_beams=2, workers=0)[0]
    plain = model.caption(images=[path], num_beams=2, workers=0)[0]
    assert twelve.caption == read.caption != plain.caption  # the words it lists are the words it read
    assert [r.getMessage() for r in caplog.records if r.name == "tipcap.pipeline"] == [
        "this model reads at most 8 prompt words: 1 input(s) had more, and only their first 8 were used "
        "(each result lists the words used)."
    ]
    out = tmp_path / "captions.jsonl"
    result = run("caption", path, "--model", pim_dir, "--prompt", ", ".join(WORDS), "--beams", "2",
                 "--out", out, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == caption_record(twelve)


def test_the_server_takes_as_many_prompt_words_as_each_method_reads(model_dirs, pim_dir):
    service = CaptionService(load_models([model_dirs["hard"], pim_dir], device="cpu"))
    with local_client(service) as http:
        methods = http.get("/api/methods").json()["methods"]
        assert {m["name"]: m["max_prompt_words"] for m in methods} == {"hard": 16, "pim": 8}
        image_id = upload(http, png((200, 30, 30))).json()["image_id"]
        nine = caption(http, image_id, "pim", WORDS[:9])
        assert nine.status_code == 400
        assert nine.json()["error"] == "prompt: at most 8 words of at most 64 characters each."
        assert caption(http, image_id, "pim", WORDS[:8]).json()["prompt"] == WORDS[:8]
        assert caption(http, image_id, "hard", WORDS).json()["prompt"] == WORDS


def test_a_method_without_prompts_says_so_and_borrows_the_guesses(client):
    image_id = upload(client, png((20, 200, 20)), "green.png").json()["image_id"]
    hard = caption(client, image_id, "hard").json()
    plain = caption(client, image_id, "plain", prompt=["red circle"]).json()
    assert plain["prompt"] == [] and plain["caption"] == plain["plain"]
    assert "trained without prompts" in plain["note"]
    assert plain["guesses"] == hard["guesses"]  # the same CLIP, the other method's vocabulary


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"this is not an image", 400, "not.png: not an image"),
        # Formats Pillow reads but the message does not promise are not decoded.
        (encoded(Image.new("RGB", (40, 30)), "PPM"), 400, "not.png: not an image (give a PNG, JPEG"),
        (encoded(Image.new("RGB", (40, 30)), "TGA"), 400, "not.png: not an image (give a PNG, JPEG"),
        (jpeg((10, 20, 30))[:300], 400, "not.png: truncated or damaged image"),
        (b"", 400, "not.png: the file is empty"),
        (b"\x89PNG" + bytes(30_000), 413, "not.png: 29 KB is over the upload limit of 20 KB"),
    ],
    ids=["text", "ppm", "tga", "truncated", "empty", "too-large"],
)
def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(client, data, status, message):
    answer = upload(client, data, "not.png")
    assert answer.status_code == status and answer.json()["error"].startswith(message)
    good = upload(client, png((1, 2, 3)), "good.png").json()["image_id"]
    assert caption(client, good).status_code == 200


@pytest.mark.parametrize(
    ("size", "shape"), [((3000, 1), "wide as it is high"), ((1, 21), "high as it is wide")]
)
def test_a_thin_image_is_refused_by_the_server_and_skipped_by_tipcap_caption(
    client, model_dirs, tmp_path, size, shape
):
    # CLIP scales the shortest side to its input before cropping: 3,000 × 1 would grow 224-fold each way.
    thin = encoded(Image.new("L", size), "PNG")
    reason = (
        f"{size[0]}×{size[1]} pixels, more than 20 times as {shape}; CLIP sees only the centre square of an "
        "image, so crop it to that part first"
    )
    answer = upload(client, thin, "thin.png")
    assert answer.status_code == 400 and answer.json()["error"] == f"thin.png: {reason}."
    (tmp_path / "thin.png").write_bytes(thin)
    (tmp_path / "fine.png").write_bytes(png((90, 90, 90)))
    result = run("caption", tmp_path / "thin.png", tmp_path / "fine.png", "--model", model_dirs["hard"],
                 "--beams", "1", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"skipped {tmp_path / 'thin.png'}: {reason}" in result.stderr.splitlines()
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(tmp_path / "fine.png")]


def test_images_up_to_twenty_to_one_are_taken(client):
    for size in ((20, 1), (1, 20)):
        answer = upload(client, encoded(Image.new("L", size), "PNG"), "long.png")
        assert answer.status_code == 200 and (answer.json()["width"], answer.json()["height"]) == size


def test_an_upload_over_the_limit_is_refused_without_a_declared_length(client):
    def chunks():
        yield bytes(15_000)
        yield bytes(15_000)

    answer = client.post(
        "/api/images", params={"name": "big.png"}, content=chunks(), headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 413 and "over the upload limit" in answer.json()["error"]


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"prompt": [""]}, 400, "prompt: an empty word"),
        ({"prompt": ["   "]}, 400, "prompt: an empty word"),
        ({"prompt": "red circle"}, 400, "prompt: give a list of words"),
        ({"prompt": [f"w{i}" for i in range(17)]}, 400, "prompt: at most 16 words"),
        ({"method": "gaussian"}, 400, "method 'gaussian': not served; choose one of hard, plain"),
        ({"beams": 0}, 400, "beams: give a whole number from 1 to 10"),
        ({"beams": "3"}, 400, "beams: give a whole number"),
        ({"image_id": "0" * 32}, 404, f"image {'0' * 32}: not held by the server"),
        ({"prompt": LONG_WORDS}, 400, f"prompt words {', '.join(LONG_WORDS)}: they take 532 positions"),
    ],
)
def test_bad_caption_requests_get_a_clear_message(client, change, status, message):
    image_id = upload(client, png((9, 9, 9))).json()["image_id"]
    payload = {"image_id": image_id, "method": "hard", "prompt": [], "beams": 1, **change}
    answer = client.post("/api/caption", json=payload)
    assert answer.status_code == status and answer.json()["error"].startswith(message)
    assert caption(client, image_id).status_code == 200


def test_a_body_that_is_not_json_is_refused(client):
    answer = client.post("/api/caption", content=b"{not json", headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"] == "the request body is not JSON."


@pytest.mark.parametrize(
    ("route", "kind", "message"),
    [
        # A page of another site may send these bodies across sites without asking the server first.
        (
            "/api/caption",
            "text/plain",
            "send the request body as Content-Type application/json, not text/plain",
        ),
        ("/api/caption", None, "send the request body as Content-Type application/json, not without a type"),
        (
            "/api/jsonl",
            "application/x-www-form-urlencoded",
            "send the request body as Content-Type application",
        ),
        ("/api/images", "text/plain", "sent.png: sent as text/plain; send the image's bytes as image/png, "),
        ("/api/images", "multipart/form-data; boundary=x", "sent.png: sent as multipart/form-data; send"),
        ("/api/images", None, "sent.png: sent as no type; send the image's bytes as image/png, image/jpeg"),
    ],
)
def test_bodies_of_other_content_types_are_refused(client, route, kind, message):
    data = png((70, 80, 90))
    held = upload(client, data, "sent.png").json()["image_id"]
    payload = json.dumps({"image_id": held, "method": "hard", "results": []}).encode()
    body = data if route == "/api/images" else payload
    headers = {} if kind is None else {"Content-Type": kind}
    answer = client.post(route, params={"name": "sent.png"}, content=body, headers=headers)
    assert answer.status_code == 415 and answer.json()["error"].startswith(message)


def test_uploads_of_the_image_types_and_octet_stream_are_taken(client):
    for kind in ("application/octet-stream", "image/png", "IMAGE/PNG", "image/jpeg; q=1"):
        assert upload(client, png((5, 6, 7)), "typed.png", kind).status_code == 200, kind
    # The type is not trusted: the bytes are decoded as the formats read, whatever it says.
    assert upload(client, jpeg((5, 6, 7)), "typed.png", "image/png").status_code == 200
    charset = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post("/api/jsonl", content=b'{"results": []}', headers=charset).status_code == 200


@pytest.mark.parametrize("route", ["/", "/static/app.js", "/api/methods"])
@pytest.mark.parametrize(
    "host", ["evil.example:8000", "evil.example", "127.0.0.1:8001", "127.0.0.1.evil:8000", ""]
)
def test_a_host_that_does_not_name_the_server_is_refused(client, route, host):
    # A page of another site whose name it makes resolve to this machine (DNS rebinding) sends its name.
    answer = client.get(route, headers={"Host": host})
    assert answer.status_code == 421
    assert answer.json() == {
        "error": f"Host {host!r} does not name this server; open http://127.0.0.1:8000/."
    }


def test_posts_with_a_foreign_host_are_refused_unread(client):
    data = png((31, 61, 91))
    foreign = {"Host": "evil.example:8000", "Content-Type": "image/png"}
    assert (
        client.post("/api/images", params={"name": "x.png"}, content=data, headers=foreign).status_code == 421
    )
    image_id = hashlib.sha256(data).hexdigest()[:32]  # the id the server would have kept it under
    assert caption(client, image_id).status_code == 404
    held = upload(client, data).json()["image_id"]
    assert held == image_id and caption(client, image_id).status_code == 200
    asked = client.post("/api/caption", json={"image_id": image_id, "method": "hard"}, headers=foreign)
    assert asked.status_code == 421 and "caption" not in asked.json()


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000", "[::1]:8000"])
def test_the_loopback_names_of_the_server_are_taken(client, host):
    assert client.get("/api/methods", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://127.0.0.1:8001", "https://127.0.0.1:8000", "null"]
)
def test_requests_from_another_origin_are_refused(client, origin):
    image_id = upload(client, png((40, 50, 60))).json()["image_id"]
    foreign = {"Origin": origin}
    answers = [
        client.post("/api/caption", json={"image_id": image_id, "method": "hard"}, headers=foreign),
        client.post("/api/images", content=png((1, 1, 1)), headers={**foreign, "Content-Type": "image/png"}),
        client.get("/api/methods", headers=foreign),
    ]
    for answer in answers:
        assert answer.status_code == 403
        assert answer.json() == {"error": f"Origin {origin!r}: this server answers its own page only."}
    own = {"Origin": "http://127.0.0.1:8000"}
    assert (
        client.post("/api/caption", json={"image_id": image_id, "method": "hard"}, headers=own).status_code
        == 200
    )


def test_which_hosts_name_a_server_on_each_kind_of_address():
    everywhere = Listening("0.0.0.0", "0.0.0.0", 8000)
    named = [f"{socket.gethostname()}:8000", "192.168.1.5:8000", "[fe80::1]:8000", "localhost:8000"]
    assert all(everywhere.named_by(host) for host in named)
    assert not any(
        everywhere.named_by(host) for host in ["evil.example:8000", "192.168.1.5:8001", "x@1.2.3.4:8000"]
    )
    one = Listening("tipcap.lan", "192.168.1.5", 8000)
    assert one.named_by("tipcap.lan:8000") and one.named_by("192.168.1.5:8000")
    assert not any(one.named_by(host) for host in ["localhost:8000", "10.0.0.1:8000", "tipcap.lan.evil:8000"])
    port_80 = Listening("localhost", "127.0.0.1", 80)
    assert port_80.named_by("localhost") and port_80.named_by("127.0.0.1:80") and not port_80.named_by("evil")


LONE = "holds '\\ud800', a lone surrogate, which is no character; send valid Unicode text."


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        # JSON's \u escapes can write half of a UTF-16 pair (a lone surrogate), which UTF-8 cannot encode.
        ("/api/caption", r'{"image_id": "\ud800", "method": "hard"}', f"image_id: {LONE}"),
        (
            "/api/caption",
            r'{"image_id": "ID", "method": "hard", "prompt": ["dog", "d\ud800g"]}',
            f"prompt[1]: {LONE}",
        ),
        (
            "/api/caption",
            r'{"image_id": "ID", "method": "hard", "\ud800": 1}',
            "the request body: a key holds a",
        ),
        (
            "/api/jsonl",
            r'{"results": [{"image": "a.png", "caption": "\ud800.", "prompt": []}]}',
            f"results[0].caption: {LONE}",
        ),
    ],
    ids=["image_id", "prompt-word", "key", "download"],
)
def test_text_that_is_not_unicode_is_refused_naming_where_it_is(client, route, body, message):
    image_id = upload(client, png((1, 99, 1))).json()["image_id"]
    answer = client.post(
        route, content=body.replace("ID", image_id).encode(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400 and answer.json()["error"].startswith(message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[" * 200_000, "the request body nests lists or objects too deeply to read; send the object"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "the request body nests lists or objects too deeply"),
        ('{"beams": ' + "9" * 5_000 + "}", "the request body holds a number of more than 4,300 digits."),
    ],
    ids=["lists", "objects", "digits"],
)
def test_json_that_python_cannot_read_is_refused(client, body, message):
    assert len(body) < 1024 * 1024  # under the body limit
    answer = client.post("/api/caption", content=body.encode(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"].startswith(message)


def test_tipcap_caption_refuses_a_prompt_word_that_is_not_text(model_dirs, tmp_path):
    (tmp_path / "ok.png").write_bytes(png((5, 5, 5)))
    # A shell's $'dog\xff' reaches Python as 'dog\udcff': bytes that are not UTF-8 become lone surrogates.
    result = run("caption", tmp_path / "ok.png", "--model", model_dirs["hard"], "--prompt", "cat, dog\udcff",
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == (
        "Error: prompt word 'dog\\udcff': holds '\\udcff', a lone surrogate, which is no character (bytes "
        "that are not UTF-8 arrive so); type the word in UTF-8."
    )


def test_tipcap_caption_refuses_prompt_words_past_the_language_models_positions(model_dirs, tmp_path):
    (tmp_path / "ok.png").write_bytes(png((5, 5, 5)))
    words = ", ".join(LONG_WORDS)
    result = run(
        "caption", tmp_path / "ok.png", "--model", model_dirs["hard"], "--prompt", words, "--device", "cpu"
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == (
        f"Error: prompt words {words}: they take 532 positions after the model's 2 prefix "
        "vectors, and with a caption of up to 8 tokens that is more than its language model's 64; give fewer "
        "or shorter prompt words."
    )


@pytest.mark.parametrize(
    ("path", "kind"), [("/api/images", "image/png"), ("/api/caption", "application/json")]
)
def test_a_client_that_leaves_mid_request_is_let_go_without_an_error(service, path, kind):
    # The app as uvicorn calls it: part of the body, then the client's disconnection. An exception out of
    # the app is what uvicorn logs with a traceback.
    arriving = [
        {"type": "http.request", "body": b'{"image_id": "', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive() -> dict:
        return arriving.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", kind.encode()), (b"content-length", b"5000")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"name=x.png",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8000)}  # fmt: skip
    asyncio.run(create_app(service, LOCAL)(scope, receive, send))
    assert arriving == [] and [m["status"] for m in sent if m["type"] == "http.response.start"] == [400]


def test_concurrent_requests_are_answered_as_one_at_a_time(service):
    requests = [
        (png(((40 * i) % 256, (90 * i) % 256, 128)), ["hard", "plain"][i % 2], [VOCABULARY[i % 5]], 1 + i % 3)
        for i in range(8)
    ]

    def ask(url, data, method, prompt, beams):
        with httpx.Client(base_url=url, timeout=60) as http:
            image_id = upload(http, data, "image.png").json()["image_id"]
            return caption(http, image_id, method, prompt, beams).json()

    with serving(service) as url:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda request: ask(url, *request), requests))
        alone = [ask(url, *request) for request in requests]
    assert together == alone
    assert len({answer["image_id"] for answer in together}) == 8


def test_the_download_is_what_tipcap_caption_writes(client, model_dirs, tmp_path):
    path = tmp_path / "blue.png"
    path.write_bytes(png((20, 20, 220)))
    written = tmp_path / "captions.jsonl"
    result = run("caption", path, "--model", model_dirs["hard"], "--prompt", "blue square", "--beams", "2",
                 "--out", written, "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output

    image_id = upload(client, path.read_bytes(), str(path)).json()["image_id"]
    shown = caption(client, image_id, prompt=["blue square"]).json()
    download = client.post(
        "/api/jsonl", json={"results": [{k: shown[k] for k in ("image", "caption", "prompt")}]}
    )
    assert download.status_code == 200
    assert download.headers["content-disposition"] == 'attachment; filename="captions.jsonl"'
    assert download.text == written.read_text()
    several = client.post("/api/jsonl", json={"results": [{**json.loads(download.text), "method": "hard"}]})
    assert json.loads(several.text)["method"] == "hard"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "a.png", "caption": "a dog.", "prompt": 3}, "results[1].prompt must be a list of words"),
        (
            {"image": "a.png", "caption": "a dog.", "prompt": True},
            "results[1].prompt must be a list of words",
        ),
        (
            {"image": "a.png", "caption": "a dog.", "prompt": "dog"},
            "results[1].prompt must be a list of words",
        ),
        ({"image": "a.png", "caption": "a dog.", "prompt": ["dog", 1]}, "results[1].prompt must be a list"),
        ({"image": "a.png", "caption": "a dog."}, "results[1].prompt must be a list of words"),
        ({}, "results[1].image must be text"),
        ({"image": "a.png", "caption": None, "prompt": []}, "results[1].caption must be text"),
        ({"image": ["a.png"], "caption": "a dog.", "prompt": []}, "results[1].image must be text"),
        (
            {"image": "a.png", "caption": "a dog.", "prompt": [], "method": 2},
            "results[1].method must be text",
        ),
        ("a.png", "results[1] must be an object"),
    ],
)
def test_a_malformed_download_row_is_refused_naming_it(client, row, message):
    good = {"image": "b.png", "caption": "a cat.", "prompt": ["cat"]}
    answer = client.post("/api/jsonl", json={"results": [good, row]})
    assert answer.status_code == 400 and answer.json()["error"].startswith(f"download: {message}")


def test_serving_writes_nothing(model_dirs, tmp_path, monkeypatch):
    temporary = tmp_path / "temp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for d in model_dirs.values() for p in d.rglob("*")}
    with local_client(CaptionService(load_models([model_dirs["hard"]], device="cpu"))) as http:
        image_id = upload(http, jpeg((120, 10, 10)), "photo.jpg").json()["image_id"]
        assert caption(http, image_id, prompt=["red circle"]).status_code == 200
    assert sorted(tmp_path.iterdir()) == [temporary] and not any(temporary.iterdir())
    assert {p: p.stat().st_mtime_ns for d in model_dirs.values() for p in d.rglob("*")} == before


def test_find_models_in_a_grid_folder_names_them_by_cell(tmp_path):
    for run_name in ("none-seed0", "gaussian-few-pairs-prompts-seed0", "gaussian-few-pairs-seed0"):
        (tmp_path / "runs" / run_name / "model").mkdir(parents=True)
        (tmp_path / "runs" / run_name / "model" / "config.json").write_text("{}")
    (tmp_path / "runs" / "isotropic-seed0").mkdir()  # unfinished: no model yet
    cells = {"none": {}, "isotropic": {}, "gaussian-few-pairs": {}, "gaussian-few-pairs-prompts": {}}
    (tmp_path / "grid.json").write_text(json.dumps({"fixed": {}, "cells": cells}))
    found = find_models(tmp_path)
    assert list(found) == ["none", "gaussian-few-pairs", "gaussian-few-pairs-prompts"]
    assert found["none"] == tmp_path / "runs" / "none-seed0" / "model"
    (tmp_path / "runs" / "none-seed1" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "none-seed1" / "model" / "config.json").write_text("{}")
    assert list(find_models(tmp_path))[:2] == ["none-seed0", "none-seed1"]


def test_serve_command_errors_are_one_line(model_dirs, tmp_path):
    result = run("serve")
    assert result.exit_code == 1 and "give --model DIR, or --demo" in result.output
    result = run("serve", "--model", tmp_path)
    assert result.exit_code == 1 and f"{tmp_path}: holds no tipcap model" in result.output
    assert "Traceback" not in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "--model", model_dirs["plain"], "--port", port, "--device", "cpu")
    assert result.exit_code == 1 and f"--port {port}: cannot listen there" in result.output


@pytest.mark.parametrize(
    ("host", "address", "warning"),
    [
        ("0.0.0.0", "0.0.0.0", "listens on every network interface"),
        ("localhost", "127.0.0.1", None),
    ],
)
def test_serve_prints_the_address_it_listens_on_and_warns_beyond_this_machine(
    model_dirs, host, address, warning
):
    command = [sys.executable, "-m", "tipcap.cli", "serve", "--model", model_dirs["plain"], "--host", host,
               "--port", "0", "--device", "cpu"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = server.stdout.readline()
        found = re.fullmatch(
            rf"serving plain at http://{re.escape(address)}:(\d+)/(.*) \(Ctrl-C stops\)\n", printed
        )
        assert found, printed
        port = found.group(1)
        assert found.group(2) == (
            f", every address of this machine (on it: http://127.0.0.1:{port}/)" if warning else ""
        )
        assert httpx.get(f"http://127.0.0.1:{port}/api/methods").status_code == 200
    finally:
        server.terminate()
        server.wait()
    said = [line for line in server.stderr.read().splitlines() if line.startswith("warning: --host")]
    assert said == ([
        f"warning: --host {host} {warning}: any machine that can reach this one can use the server, which "
        "asks no one who they are; pass --host 127.0.0.1 (the default) to serve this machine only."
    ] if warning else [])  # fmt: skip


RANGE = "is not in the range 0.01<=x<=1024."


@pytest.mark.parametrize(
    ("size", "said"),
    [
        ("nan", "'nan' is not a number."),
        ("inf", f"inf {RANGE}"),
        ("-inf", f"-inf {RANGE}"),
        ("1e-9", f"1e-09 {RANGE}"),  # a server that refuses every image
        ("0", f"0.0 {RANGE}"),
        ("0.009", f"0.009 {RANGE}"),
        ("1025", f"1025.0 {RANGE}"),
    ],
)
def test_serve_refuses_an_upload_limit_out_of_range_in_one_line(tmp_path, size, said):
    # The folder holds no model: a limit let through would end in that error instead.
    result = run("serve", "--model", tmp_path, "--max-upload-mb", size)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '--max-upload-mb': {said}"


def test_the_command_line_does_not_import_the_web_framework():
    code = "import sys, tipcap.cli; assert 'starlette' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "serve" in run("--help").output
