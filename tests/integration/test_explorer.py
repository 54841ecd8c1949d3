"""The head view and the explorer in a real headless browser (Debian's chromium,
driven by selenium through chromedriver), and the explorer's HTTP/JSON routes.

`check_explorer` and `check_explorer_shows_errors` drive the explorer page given the
base URL it is served under (the page is `<base>explore` and calls `<base>v1/...`), so
the same checks run against `attention-client explore` and the server's own HTTP port."""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from attention_client import AttentionClient
from attention_client.errors import error_for
from attention_client.explore import MAX_BODY, MAX_TEXT, Explorer, http_error
from attention_client.protocol import attention_pb2 as pb
from attention_client.tensors import from_tensor
from attention_client.viz import head_view_html
from tests.helpers import ROOT

SENTENCE = "The transformer model processes all tokens in parallel using multi-head attention."
TOO_LONG = "a " * 600  # 602 tokens with [CLS] and [SEP], within the explorer's 2000 characters
SCREENSHOT = ROOT / "docs" / "explorer.png"


def _find(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: `make test` installs Debian's chromium and chromium-driver"
    return path


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = _find("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,720", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=_find("chromedriver")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@contextmanager
def _serving(httpd: ThreadingHTTPServer) -> Iterator[str]:
    """Serve on a thread; the base URL."""
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def explorer(server) -> Iterator[str]:
    """`attention-client explore` on a free port: its base URL."""
    with AttentionClient(server.target, timeout=60) as client:
        with _serving(Explorer(client).server("127.0.0.1", 0)) as url:
            yield url


# ---- the browser checks, reusable against any server of the page ----

def _rows(browser) -> list[list[str]]:
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")]


def _stats(browser) -> dict[str, str]:
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#stats tbody tr")]
    return {name: value for name, value in rows}


def _analyze_in_page(browser, text: str) -> None:
    box = browser.find_element(By.ID, "sentence")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "run").click()


def _pick(browser, layer: int, head: int) -> None:
    Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
    Select(browser.find_element(By.ID, "head")).select_by_value(str(head))


def _error_shown(browser) -> str:
    return WebDriverWait(browser, 60).until(
        lambda d: "".join(e.text for e in d.find_elements(By.CSS_SELECTOR, "#status.error")))


def check_explorer(browser, base_url: str, client: AttentionClient) -> None:
    """The explorer page at `base_url + "explore"` (base_url ends in "/") analyzes SENTENCE
    and shows the numbers `client` (the SDK, straight to the gRPC service) gets: the
    word view's top pair, one hovered cell, token-view pairs and per-head statistics.
    Leaves the page in the word view of layer 0, head 2, hovering "processes"."""
    expected = client.analyze(SENTENCE, word_level=True, head_statistics=True, hidden_states=False)
    words = [w.text for w in expected.words]
    stats = {(h.layer, h.index): h.statistics for h in expected.head_statistics}

    browser.get(base_url + "explore")
    WebDriverWait(browser, 60).until(lambda d: "minilm-l6" in d.find_element(By.ID, "model").text)
    _analyze_in_page(browser, SENTENCE)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    assert browser.find_element(By.ID, "status").text == ""

    # token view, layer 5, head 3: the tokens, the strongest pair without specials, statistics
    browser.find_element(By.ID, "words").click()
    _pick(browser, 5, 3)
    shown = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.tok[data-side='from']")]
    assert shown == expected.token_texts
    matrix = expected.head_attention(5, 3)
    special = [t.special for t in expected.tokens]
    n = len(shown)
    best = max(((float(matrix[i, j]), i, j) for i in range(n) for j in range(n) if not special[i] and not special[j]),
               key=lambda c: (c[0], -c[1], -c[2]))
    assert _rows(browser)[0] == [shown[best[1]], shown[best[2]], f"{best[0] * 100:.1f}%"]
    assert _stats(browser) == {k: f"{v:.3f}" for k, v in stats[5, 3].items()}

    # word view, layer 0, head 2 (keys that the JSON mapping leaves out: layer 0)
    browser.find_element(By.ID, "words").click()
    _pick(browser, 0, 2)
    shown = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.tok[data-side='from']")]
    assert shown == words and shown[:4] == ["[CLS]", "the", "transformer", "model"]
    assert "previous_token" in browser.find_element(By.ID, "role").text
    assert _stats(browser) == {k: f"{v:.3f}" for k, v in stats[0, 2].items()}
    # the page's top pair is the service's strongest word pair of layer 0, head 2 (specials left out)
    top = client.analyze(SENTENCE, word_level=True, top_k=1, layers=[0], heads=[2], exclude_special_tokens=True,
                         attention=False, hidden_states=False)
    _, _, frm, to, strength = top.word_pair_rows()[0]
    assert _rows(browser)[0] == [frm, to, f"{strength * 100:.1f}%"]

    # hover a word: its own pairs, as lines from it only, each with its cell's strength
    i = words.index("processes")
    target = browser.find_element(By.CSS_SELECTOR, f"text.tok[data-side='from'][data-index='{i}']")
    ActionChains(browser).move_to_element(target).perform()
    assert all(row[0] == "processes" for row in _rows(browser))
    assert _rows(browser)[0][1] == "model"  # a previous-token head: processes -> model
    assert expected.word_attention is not None
    cells = expected.word_attention[expected.layers.index(0), expected.heads.index(2), i]
    links = browser.find_elements(By.CSS_SELECTOR, "line.link")
    assert links and {link.get_attribute("data-from") for link in links} == {str(i)}
    for link in links:
        assert link.get_attribute("data-strength") == f"{cells[int(link.get_attribute('data-to'))]:.4f}"


def check_explorer_shows_errors(browser, base_url: str) -> None:
    """The explorer page at `base_url + "explore"` shows the service's errors: an unknown
    model (GET v1/models/<name>) and a sentence over the model's 512 positions (v1/analyze)."""
    browser.get(base_url + "explore?model=no-such-model")
    assert "no-such-model" in _error_shown(browser)
    _analyze_in_page(browser, SENTENCE)  # the model is asked again, and still unknown
    WebDriverWait(browser, 60).until(lambda d: "analyzing" not in d.find_element(By.ID, "status").text)
    assert "no-such-model" in _error_shown(browser)
    assert not browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready")

    browser.get(base_url + "explore")
    WebDriverWait(browser, 60).until(lambda d: "minilm-l6" in d.find_element(By.ID, "model").text)
    _analyze_in_page(browser, TOO_LONG)
    message = _error_shown(browser)
    assert "512" in message and "sequences[0].text" in message, message


# ---- the explorer served by attention-client explore ----

def test_explorer_shows_the_services_numbers(browser, explorer, client, tmp_path):
    check_explorer(browser, explorer, client)
    shot = tmp_path / "explorer.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if not SCREENSHOT.exists():  # the picture in docs/heads.md, refreshed by deleting it
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT)


def test_explorer_shows_errors_of_the_service(browser, explorer):
    check_explorer_shows_errors(browser, explorer)


class _PrefixProxy(BaseHTTPRequestHandler):
    """A reverse proxy that serves `upstream` under /lab/."""

    upstream = ""

    def _forward(self) -> None:
        if not self.path.startswith("/lab/"):
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = urllib.request.Request(self.upstream + self.path[len("/lab/"):], data=body or None,
                                         method=self.command)
        if self.headers.get("Content-Type"):
            request.add_header("Content-Type", self.headers["Content-Type"])
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, data, content_type = response.status, response.read(), response.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            status, data, content_type = exc.code, exc.read(), exc.headers["Content-Type"]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward

    def log_message(self, *args: Any) -> None:
        pass


def test_explorer_works_under_a_path_prefix(browser, explorer, client):
    handler = type("Proxy", (_PrefixProxy,), {"upstream": explorer})
    with _serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as base:
        check_explorer(browser, base + "lab/", client)


def test_explorer_page_decodes_float16_tensors(browser, explorer):
    values = np.array([0.0, 1.0, -2.5, 0.333, 65504.0, 6.104e-05, 6e-08, -6e-08, np.inf, -np.inf, np.nan],
                      dtype=np.float16)
    tensor = {"dtype": "DATA_TYPE_FLOAT16", "shape": ["11"], "data": base64.b64encode(values.tobytes()).decode()}
    browser.get(explorer + "explore")
    decoded = browser.execute_script(
        "return Array.from(decodeTensor(arguments[0], 't').values, (v) => Number.isFinite(v) ? v : String(v));",
        tensor)
    assert decoded[:8] == [float(v) for v in values[:8]]
    assert decoded[8:] == ["Infinity", "-Infinity", "NaN"]
    bad = browser.execute_script(
        "try { decodeTensor(arguments[0], 'attention'); } catch (err) { return err.message; }",
        {**tensor, "shape": ["12"]})
    assert bad == "attention: shape [12] needs 24 bytes, got 22"


# ---- the explorer's HTTP/JSON routes ----

def _http(url: str, body: bytes | None = None,
          content_type: str = "application/json") -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, headers, data = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, data = exc.code, dict(exc.headers), exc.read()
    if headers.get("Content-Type") == "application/json":
        return status, headers, json.loads(data)
    return status, headers, data.decode()


def test_explorer_serves_the_page_and_attention_v1_as_json(explorer, client):
    pages = [_http(explorer + path) for path in ("", "explore")]
    for status, headers, html in pages:
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert 'const MODE = "explore"' in html
        assert '"/v1' not in html and "'/v1" not in html  # relative URLs only: a path prefix keeps working
    assert pages[0][2] == pages[1][2]

    status, _, models = _http(explorer + "v1/models")
    assert status == 200 and models["defaultModel"] == "minilm-l6"
    assert [m["name"] for m in models["models"]] == ["minilm-l6"]
    for path in ("v1/models/", "v1/models/minilm-l6"):
        status, _, info = _http(explorer + path)
        assert status == 200
        assert json_format.ParseDict(info, pb.ModelInfo()) == json_format.ParseDict(models["models"][0], pb.ModelInfo())

    request = {"sequences": [{"text": SENTENCE, "id": "s"}],
               "options": {"layers": [1, 4], "heads": [3], "hiddenStates": False, "topK": 2,
                           "attentionDtype": "DATA_TYPE_FLOAT16", "headStatistics": True}}
    status, _, body = _http(explorer + "v1/analyze", json.dumps(request).encode())
    assert status == 200, body
    response = json_format.ParseDict(body, pb.AnalyzeResponse())
    [result] = response.results
    assert response.model == "minilm-l6" and result.id == "s"
    assert body["results"][0]["attention"]["dtype"] == "DATA_TYPE_FLOAT16"
    sdk = client.analyze(SENTENCE, layers=[1, 4], heads=[3], hidden_states=False, top_k=2, attention_dtype="float16",
                         head_statistics=True)
    assert np.array_equal(from_tensor(result.attention), sdk.attention)
    assert [t.text for t in result.tokens] == sdk.token_texts and not result.HasField("hidden_states")
    assert [(p.from_index, p.to_index, p.strength) for hp in result.pairs for p in hp.pairs] == \
        [(p.from_index, p.to_index, p.strength) for hp in sdk.pairs for p in hp.pairs]


@pytest.mark.parametrize(("path", "body", "content_type", "status", "message"), [
    ("v1/models/no-such-model", None, "", 404, "NOT_FOUND: model 'no-such-model' not found"),
    ("v1/analyze", json.dumps({"sequences": [{"text": TOO_LONG}]}).encode(), "application/json", 400,
     "INVALID_ARGUMENT: sequences[0].text: 602 tokens"),
    ("v1/analyze", json.dumps({"sequences": [{"text": "x" * (MAX_TEXT + 1)}]}).encode(), "application/json", 400,
     f"sequences[0].text: {MAX_TEXT + 1} characters; the explorer takes at most {MAX_TEXT}"),
    ("v1/analyze", json.dumps({"sequences": [{"text": "a", "textPair": "x" * (MAX_TEXT + 1)}]}).encode(),
     "application/json", 400, "sequences[0].text_pair:"),
    ("v1/analyze", json.dumps({"sequences": [{"text": "a"}], "options": {"topK": 0}}).encode(), "application/json",
     400, "INVALID_ARGUMENT: options.top_k"),
    ("v1/analyze", b"{not json", "application/json", 400, "request body: not JSON"),
    ("v1/analyze", b"[1]", "application/json", 400, "request body: a JSON object (AnalyzeRequest) expected"),
    ("v1/analyze", b'{"sequence": []}', "application/json", 400, 'has no field named "sequence"'),
    ("v1/analyze", b'{"sequences": [{"text": "a"}]}', "text/plain", 415, "Content-Type must be application/json"),
    ("v1/analyze", None, "", 405, "/v1/analyze: use POST"),
    ("v1/models", b"{}", "application/json", 405, "/v1/models: use GET"),
    ("api/analyze?text=hello", None, "", 404, "/api/analyze: not found"),
])
def test_explorer_errors_are_a_status_and_a_message(explorer, path, body, content_type, status, message):
    got, headers, data = _http(explorer + path, body, content_type)
    assert got == status and headers["Content-Type"] == "application/json"
    assert message in data["error"], data
    if status == 405:
        assert headers["Allow"] in ("GET", "POST")


def test_explorer_refuses_a_body_over_its_limit_before_reading_it(explorer):
    host, port = explorer.removeprefix("http://").rstrip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/v1/analyze")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(MAX_BODY + 1))
    connection.endheaders()  # no body sent: the answer must not wait for it
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read()) == {"error": f"request body: {MAX_BODY + 1} bytes; at most {MAX_BODY}"}
    connection.close()


def test_explorer_without_a_service_is_503(tmp_path):
    with AttentionClient(f"unix:{tmp_path}/no-server.sock", timeout=10) as client:
        with _serving(Explorer(client).server("127.0.0.1", 0)) as base:
            status, headers, body = _http(base + "v1/models/")
    assert status == 503 and headers["Retry-After"] == "1" and body["error"].startswith("UNAVAILABLE: ")


def test_explorer_model_stands_for_an_empty_model_name(server):
    with AttentionClient(server.target, timeout=60) as client, \
            _serving(Explorer(client, "no-such-model").server("127.0.0.1", 0)) as base:
        assert _http(base + "v1/models/minilm-l6")[0] == 200
        for status, _, body in (_http(base + "v1/models/"),
                                _http(base + "v1/analyze", json.dumps({"sequences": [{"text": "a"}]}).encode())):
            assert status == 404 and "'no-such-model' not found" in body["error"]


@pytest.mark.parametrize(("code", "details", "status"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "options.top_k: ...", 400),
    (grpc.StatusCode.NOT_FOUND, "model 'x' not found", 404),
    (grpc.StatusCode.UNAUTHENTICATED, "no token", 401),
    (grpc.StatusCode.PERMISSION_DENIED, "role reader may not", 403),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full: retry with backoff", 429),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "response would be about 80 MiB, over max_response_bytes", 413),
    (grpc.StatusCode.UNAVAILABLE, "draining", 503),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", 504),
    (grpc.StatusCode.INTERNAL, "internal error (incident 1)", 502),
    (grpc.StatusCode.UNKNOWN, "?", 502),
    (grpc.StatusCode.FAILED_PRECONDITION, "model cannot be loaded", 502),
])
def test_explorer_maps_each_grpc_status_to_http(code, details, status):
    error = http_error(error_for(code, details, request_id="r1"))
    assert error.status == status and str(error) == f"{code.name}: {details} (request id r1)"
    assert ("Retry-After" in error.headers) == (status in (429, 503))


def test_static_head_view_shows_the_same_numbers_offline(browser, client, tmp_path):
    result = client.analyze(SENTENCE, word_level=True, head_statistics=True, layers=[5])
    page = tmp_path / "view.html"
    html = head_view_html(result, client.get_model(), page)
    # nothing loaded from a network: no src/href, and the only URL is the SVG namespace name
    assert set(re.findall(r"https?://[^\s\"']+", html)) == {"http://www.w3.org/2000/svg"}
    assert " src=" not in html and " href=" not in html
    browser.get(page.as_uri())
    Select(browser.find_element(By.ID, "head")).select_by_value("3")
    browser.find_element(By.ID, "words").click()  # token view
    tokens = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.tok[data-side='from']")]
    assert tokens == result.token_texts
    matrix = result.head_attention(5, 3)
    special = [t.special for t in result.tokens]
    best = max(((float(matrix[i, j]), i, j) for i in range(len(tokens)) for j in range(len(tokens))
                if not special[i] and not special[j]), key=lambda c: (c[0], -c[1], -c[2]))
    assert _rows(browser)[0] == [tokens[best[1]], tokens[best[2]], f"{best[0] * 100:.1f}%"]
    # hover a token: its pairs, as in the explorer
    target = browser.find_element(By.CSS_SELECTOR, "text.tok[data-side='from'][data-index='4']")
    ActionChains(browser).move_to_element(target).perform()
    assert all(row[0] == tokens[4] for row in _rows(browser))
    assert browser.find_element(By.ID, "status").text == ""
    assert Path(page).stat().st_size > 1000


def test_heatmap_and_layer_grid_pngs(client, tmp_path):
    from matplotlib.image import imread

    from attention_client.viz import heatmap_png, layer_grid_png

    result = client.analyze(SENTENCE, word_level=True, layers=[0], heads=[0, 2, 5, 7, 9])
    one = imread(heatmap_png(result, 0, 2, tmp_path / "head.png", words=True))
    grid = imread(layer_grid_png(result, 0, tmp_path / "grid.png", info=client.get_model()))
    assert one.shape[0] > 300 and one.shape[1] > 300 and grid.shape[1] > grid.shape[0] > 300
    assert one[..., :3].std() > 0.05  # a picture, not a blank canvas
    with pytest.raises(ValueError, match="word_level"):
        heatmap_png(client.analyze(SENTENCE, layers=[0]), 0, 0, tmp_path / "x.png", words=True)
