"""The head view and the explorer in a real headless browser (Debian's chromium,
driven by selenium through chromedriver)."""

import re
import shutil
import threading
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from attention_client import AttentionClient
from attention_client.explore import Explorer
from attention_client.viz import head_view_html
from tests.helpers import ROOT

SENTENCE = "The transformer model processes all tokens in parallel using multi-head attention."
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


@pytest.fixture(scope="module")
def explorer(server):
    with AttentionClient(server.target, timeout=60) as client:
        httpd = Explorer(client).server("127.0.0.1", 0)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_port}/", client
        httpd.shutdown()
        httpd.server_close()


def _rows(browser):
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")]


def test_explorer_types_a_sentence_picks_a_head_and_shows_words_and_pairs(browser, explorer, tmp_path):
    url, client = explorer
    browser.get(url)
    box = browser.find_element(By.ID, "sentence")
    box.send_keys(SENTENCE)
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    Select(browser.find_element(By.ID, "layer")).select_by_value("0")
    Select(browser.find_element(By.ID, "head")).select_by_value("2")
    words = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "text.tok[data-side='from']")]
    assert words[:4] == ["[CLS]", "the", "transformer", "model"] and "##er" not in words
    assert "previous_token" in browser.find_element(By.ID, "role").text
    # the page's top pair is the API's strongest word pair of layer 0, head 2 (specials left out)
    api = client.analyze(SENTENCE, word_level=True, top_k=1, layers=[0], heads=[2], exclude_special_tokens=True,
                         attention=False)
    _, _, frm, to, strength = api.word_pair_rows()[0]
    assert _rows(browser)[0] == [frm, to, f"{strength * 100:.1f}%"]
    # hover a word: its own pairs, as lines from it only
    target = browser.find_element(By.CSS_SELECTOR, "text.tok[data-side='from'][data-index='4']")  # "processes"
    ActionChains(browser).move_to_element(target).perform()
    assert all(row[0] == "processes" for row in _rows(browser))
    links = browser.find_elements(By.CSS_SELECTOR, "line.link")
    assert links and {link.get_attribute("data-from") for link in links} == {"4"}
    assert _rows(browser)[0][1] == "model"  # a previous-token head: processes -> model
    shot = tmp_path / "explorer.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if not SCREENSHOT.exists():  # the README's picture, refreshed by deleting it
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, SCREENSHOT)


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
