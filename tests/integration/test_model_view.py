"""bertviz and the model view, against the real service in a real browser:

- `result.to_bertviz()` fed to the real bertviz 1.4.1 (`head_view`, `model_view`): the
  numbers and tokens bertviz embeds in its page are the service's, for one text and a pair;
- bertviz's page loads require.js, d3 and jQuery from a CDN and stays blank offline, where
  the SDK's own page (viz.head_view_html) draws;
- the page's model view: a cell per returned (layer, head), drawn from the numbers, a click
  opens that head; with a subset of layers and heads, a causal model and under the
  server's /explore (its Content-Security-Policy)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from attention_client import AnalyzeResult, AttentionClient
from attention_client._proto.attention.v1 import attention_pb2 as pb
from attention_client.tensors import to_tensor
from attention_client.viz import head_view_html
from tests.helpers import ROOT, ServerThread
from tests.integration.test_explorer import browser  # noqa: F401  (a fixture)
from tests.unit.test_bertviz import bertviz_params

SENTENCE = "The transformer model processes all tokens in parallel using multi-head attention."
QUESTION, ANSWER = "Where did the cat sleep?", "On the warm mat."
SCREENSHOT = ROOT / "docs" / "model_view.png"


@pytest.fixture(scope="module")
def single(client) -> AnalyzeResult:
    return client.analyze(SENTENCE, hidden_states=False)


@pytest.fixture(scope="module")
def pair(client) -> AnalyzeResult:
    return client.analyze(QUESTION, text_pair=ANSWER, hidden_states=False)


def test_bertviz_shows_the_services_numbers_for_one_text(single):
    import bertviz

    for view in (bertviz.head_view, bertviz.model_view):
        params = bertviz_params(view(*single.to_bertviz(), html_action="return"))
        [shown] = params["attention"]
        # float32 -> Python float -> JSON keeps every bit: equal, not close
        assert np.array_equal(np.asarray(shown["attn"], dtype=np.float32), single.attention)
        assert shown["left_text"] == shown["right_text"] == single.token_texts
        assert params["include_layers"] == list(range(6))


def test_bertviz_splits_a_pair_where_the_service_says(pair):
    import bertviz

    b = pair.to_bertviz().sentence_b_start
    texts = pair.token_texts
    assert texts[b - 1] == "[SEP]" and texts[b:] == ["on", "the", "warm", "mat", ".", "[SEP]"]
    a_, b_, all_ = slice(0, b), slice(b, None), slice(None)
    expected = {"All": (all_, all_), "Sentence A -> Sentence A": (a_, a_), "Sentence B -> Sentence B": (b_, b_),
                "Sentence A -> Sentence B": (a_, b_), "Sentence B -> Sentence A": (b_, a_)}
    for view in (bertviz.head_view, bertviz.model_view):
        shown = bertviz_params(view(*pair.to_bertviz(), html_action="return"))["attention"]
        assert [s["name"] for s in shown] == list(expected)
        for s in shown:
            rows, cols = expected[s["name"]]
            assert np.array_equal(np.asarray(s["attn"], dtype=np.float32), pair.attention[:, :, rows, cols])
            assert (s["left_text"], s["right_text"]) == (texts[rows], texts[cols])


def test_bertvizs_page_is_blank_offline_and_ours_draws(browser, single, tmp_path):  # noqa: F811
    import bertviz

    theirs = tmp_path / "bertviz.html"
    theirs.write_text(bertviz.model_view(*single.to_bertviz(), html_action="return").data)
    ours = tmp_path / "ours.html"
    head_view_html(single, path=ours)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        browser.get_log("browser")  # drop earlier messages
        browser.get(theirs.as_uri())
        assert browser.execute_script("return document.querySelector('#vis').childElementCount") == 0
        assert any("require.min.js" in entry["message"] for entry in browser.get_log("browser"))
        browser.get(ours.as_uri() + "#all-heads")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .cell")) == 72
        assert [e for e in browser.get_log("browser") if "favicon.ico" not in e["message"]] == []
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                                {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})


def _cells(driver) -> list[tuple[int, int]]:
    return [(int(c.get_attribute("data-layer")), int(c.get_attribute("data-head")))
            for c in driver.find_elements(By.CSS_SELECTOR, "#grid .cell")]


def _open_cell(driver, layer: int, head: int) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#grid .cell[data-layer='{layer}'][data-head='{head}']").click()
    assert driver.find_element(By.ID, "main").is_displayed()
    assert not driver.find_element(By.ID, "model-view").is_displayed()
    assert (driver.find_element(By.ID, "layer").get_attribute("value"),
            driver.find_element(By.ID, "head").get_attribute("value")) == (str(layer), str(head))
    assert driver.find_element(By.ID, "role").text.startswith(f"Layer {layer}, head {head}")


def test_model_view_draws_every_head_and_a_click_opens_it(browser, client, tmp_path):  # noqa: F811
    result = client.analyze(SENTENCE, word_level=True, head_statistics=True, hidden_states=False)
    info = client.get_model()
    page = tmp_path / "view.html"
    head_view_html(result, info, page)
    browser.get(page.as_uri())
    assert not browser.find_element(By.ID, "model-view").is_displayed()  # the head view stays the default
    browser.set_window_size(1000, 860)  # the screenshot's size: all 6 layers at once
    browser.find_element(By.ID, "show-model").click()
    assert _cells(browser) == [(layer, head) for layer in range(info.num_layers) for head in range(info.num_heads)]
    roles = {(h.layer, h.index): h.role for h in info.heads}
    cell = browser.find_element(By.CSS_SELECTOR, "#grid .cell[data-layer='0'][data-head='2']")
    assert cell.get_attribute("title") == f"layer 0, head 2: {roles[0, 2]} (positional)"
    shot = tmp_path / "model_view.png"
    browser.save_screenshot(str(shot))
    assert 10_000 < shot.stat().st_size < 300_000
    if not SCREENSHOT.exists():  # the picture in client/README.md, refreshed by deleting it
        shutil.copy(shot, SCREENSHOT)
    _open_cell(browser, 3, 7)
    # the head view of layer 3, head 7 in words (the default): lines from the word matrix
    words = [w.text for w in result.words]
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.tok[data-side='from']")] == words
    browser.find_element(By.ID, "show-model").click()
    current = browser.find_elements(By.CSS_SELECTOR, "#grid .cell.current")
    assert [(c.get_attribute("data-layer"), c.get_attribute("data-head")) for c in current] == [("3", "7")]


def _causal_result() -> AnalyzeResult:
    """A synthetic causal result of layers 1 and 3, heads 0, 2 and 5, seven tokens."""
    n = 7
    scores = np.random.default_rng(3).random((2, 3, n, n)) * np.tril(np.ones((n, n)))
    msg = pb.SequenceResult(layers=[1, 3], heads=[0, 2, 5])
    for k, text in enumerate(["<|endoftext|>", "The", "Ġcat", "Ġsat", "Ġon", "Ġit", "."]):
        msg.tokens.add(id=k, text=text, special=k == 0)
    to_tensor((scores / scores.sum(-1, keepdims=True)).astype(np.float32), msg.attention)
    return AnalyzeResult.from_pb(msg)


def test_model_view_of_a_subset_of_a_causal_model(browser, tmp_path):  # noqa: F811
    result = _causal_result()
    page = tmp_path / "causal.html"
    head_view_html(result, path=page)
    browser.get(page.as_uri() + "#all-heads")  # the URL can open the model view
    assert _cells(browser) == [(1, 0), (1, 2), (1, 5), (3, 0), (3, 2), (3, 5)]
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#grid .row")] == ["layer 1", "layer 3"]
    # each cell's pixels are its matrix: white above the diagonal, blue by strength below
    pixels = browser.execute_script(
        "return Array.from(document.querySelectorAll('#grid canvas'), (c) =>"
        " Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data))")
    for k, rgba in enumerate(pixels):
        image = np.asarray(rgba, dtype=np.float64).reshape(7, 7, 4)
        matrix = result.attention[k // 3, k % 3].astype(np.float64)
        np.testing.assert_allclose(image[..., 0], 255 - 244 * np.sqrt(matrix), atol=1)  # red: 255 to 11
        assert (image[np.triu_indices(7, 1)] == 255).all()
    # the pointer over a pixel names its pair: layer 3, head 2, row 5 ("Ġit") to column 2 ("Ġcat")
    canvas = browser.find_elements(By.CSS_SELECTOR, "#grid canvas")[4]
    size = canvas.size["width"]
    ActionChains(browser).move_to_element_with_offset(canvas, round((2.5 / 7 - 0.5) * size),
                                                      round((5.5 / 7 - 0.5) * size)).perform()
    strength = result.head_attention(3, 2)[5, 2]
    assert browser.find_element(By.ID, "grid-info").text == f"layer 3, head 2 — Ġit → Ġcat: {100 * strength:.1f}%"
    _open_cell(browser, 3, 5)
    links = browser.find_elements(By.CSS_SELECTOR, "line.link")
    assert links and all(int(line.get_attribute("data-to")) <= int(line.get_attribute("data-from"))
                         for line in links)


def test_a_causal_model_through_bertviz_and_the_model_view(tiny_repository, browser, tmp_path):  # noqa: F811
    """The tiny GPT-2 of tests/tiny_models.py, served: bertviz gets its causal numbers and
    byte-level tokens; the model view draws its cells white above the diagonal."""
    import bertviz

    with ServerThread(model_repository=tiny_repository, default_model="tiny-gpt2") as srv, \
            AttentionClient(srv.target, timeout=60) as gpt2:
        result = gpt2.analyze("The cat sat on the mat.", hidden_states=False)
        info = gpt2.get_model()
    assert info.num_layers * info.num_heads == 8 and result.token_texts[1].startswith("Ġ")
    [shown] = bertviz_params(bertviz.model_view(*result.to_bertviz(), html_action="return"))["attention"]
    attention = np.asarray(shown["attn"], dtype=np.float32)
    assert np.array_equal(attention, result.attention) and not np.triu(attention, 1).any()
    assert shown["left_text"] == [t.replace("Ġ", " ") for t in result.token_texts]

    page = tmp_path / "gpt2.html"
    head_view_html(result, info, page)
    browser.get(page.as_uri() + "#all-heads")
    assert _cells(browser) == [(layer, head) for layer in range(2) for head in range(4)]
    n = len(result.tokens)
    pixels = browser.execute_script(
        "return Array.from(document.querySelectorAll('#grid canvas'), (c) =>"
        " Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data))")
    for rgba in pixels:
        image = np.asarray(rgba).reshape(n, n, 4)
        assert (image[np.triu_indices(n, 1)] == 255).all() and (image[np.tril_indices(n)][:, 0] < 255).any()


def test_model_view_under_the_servers_explorer_and_its_csp(server, browser):  # noqa: F811
    browser.get(server.http_url + "/explore")
    WebDriverWait(browser, 60).until(lambda d: "minilm-l6" in d.find_element(By.ID, "model").text)
    browser.get_log("browser")
    box = browser.find_element(By.ID, "sentence")
    box.send_keys(SENTENCE)
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    browser.find_element(By.ID, "show-model").click()
    assert len(_cells(browser)) == 72
    _open_cell(browser, 5, 3)
    # nothing refused by the page's Content-Security-Policy (a missing favicon may be logged)
    assert [e for e in browser.get_log("browser") if "favicon.ico" not in e["message"]] == []
