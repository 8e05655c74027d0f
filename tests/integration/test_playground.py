"""The playground page (`GET /` of `rag serve`) in a real headless Chromium driven by Selenium,
against real servers on 127.0.0.1 with the packaged SmolLM2 (transformers) and the packaged
MiniLM index. Screenshots of each view go to the test's temp folder (path printed by -rA)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rag.config import ChatPipelineConfig, SelfRagPipelineConfig
from rag.pipeline import ChatRagPipeline, SelfRagPipeline
from rag.retriever import DenseRetriever
from rag.server import create_app
from tests.integration.servers import passage_index, running

pytestmark = pytest.mark.integration

KEY = "sekret"
HOSTILE_TITLE = '<img src=x onerror="window.__pwned=1">Glorp'
HOSTILE_TEXT = ('<script>window.__pwned=2</script>The Glorp festival is held on '
                '<b onmouseover="window.__pwned=3">Tuesdays</b> in the town of Vennic.')
PASSAGES = [("z", "Zorblax Prize", "The Zorblax Prize is awarded every year in the city of Kelmora "
             "to the best underwater violinist."),
            ("n", "Nile", "The Nile is a long river in Africa."),
            ("h", "Hamlet", "Hamlet is a tragedy written by William Shakespeare."),
            ("x", HOSTILE_TITLE, HOSTILE_TEXT)]
QUESTION = "In which city is the Zorblax Prize awarded?"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"playground screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return passage_index(tmp_path_factory.mktemp("playground"), PASSAGES)


@pytest.fixture(scope="module")
def runs_dir(index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `rag eval` run (retrieval only) to open in the runs tab."""
    from rag.eval.runner import evaluate

    folder = tmp_path_factory.mktemp("runs")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n" for q, a in [
        (QUESTION, "Kelmora"), ("Where is the Nile?", "Africa"), ("Who wrote Hamlet?", "Shakespeare")]))
    pipe = folder / "dense.yaml"
    pipe.write_text("name: dense\nkind: retrieval\nretrieval: {mode: dense, top_k: 3}\n")
    evaluate([pipe], data, index=index, out=folder / "runs" / "toy", progress=False)
    return folder / "runs"


@pytest.fixture(scope="module")
def chat_server(index: Path, hf_smollm: Any, runs_dir: Path) -> Iterator[str]:
    config = ChatPipelineConfig(name="smollm-rag", retrieval={"mode": "dense", "top_k": 2},
                                prompt={"format": "hf_template", "context_position": "user"},
                                generation={"max_new_tokens": 40})
    pipe = ChatRagPipeline(config, hf_smollm, DenseRetriever.from_folder(index))
    with running(create_app(pipe, api_key=KEY, runs_dir=runs_dir)) as base:
        yield base


@pytest.fixture(scope="module")
def selfrag_server(index: Path, hf_smollm: Any) -> Iterator[str]:
    config = SelfRagPipelineConfig(name="selfrag-critic", kind="selfrag", retrieval={"top_k": 2},
                                   prompt={"format": "hf_template"}, generation={"max_new_tokens": 24},
                                   selfrag={"mode": "always", "critic": "prompted"})
    pipe = SelfRagPipeline(config, hf_smollm, DenseRetriever.from_folder(index))
    with running(create_app(pipe)) as base:
        yield base


def wait_for(condition: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def by_css(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def fmt(x: float) -> str:
    return f"{x:.3f}"


def ask(driver: Any, question: str) -> Any:
    """Type a question and press Enter; the new turn element."""
    from selenium.webdriver.common.keys import Keys

    before = len(by_css(driver, ".turn"))
    box = by_css(driver, "#question")[0]
    box.clear()
    box.send_keys(question, Keys.ENTER)
    return wait_for(lambda: len(by_css(driver, ".turn")) > before and by_css(driver, ".turn")[-1],
                    10, "a new turn")


def open_with_key(driver: Any, base: str, shots: Path) -> None:
    driver.get(base + "/")
    dialog = by_css(driver, "#key-dialog")[0]
    wait_for(dialog.is_displayed, 10, "the API key prompt")
    driver.save_screenshot(str(shots / "key.png"))
    key = by_css(driver, "#key-input")[0]
    key.send_keys("wrong-key\n")
    wait_for(lambda: "refused" in by_css(driver, "#key-error")[0].text, 10, "the refusal")
    assert dialog.is_displayed()
    by_css(driver, "#key-input")[0].send_keys(KEY + "\n")
    wait_for(lambda: not dialog.is_displayed(), 10, "the prompt to close")
    wait_for(lambda: "smollm-rag" in by_css(driver, "#model")[0].text, 10, "the model name")


def ensure_open(driver: Any, base: str, shots: Path) -> None:
    """The chat server's page with the key given (each test can also run alone)."""
    if not driver.current_url.startswith(base) or "smollm-rag" not in by_css(driver, "#model")[0].text:
        open_with_key(driver, base, shots)


def test_key_prompt_streamed_answer_and_sources(browser: Any, chat_server: str, shots: Path) -> None:
    assert httpx.get(chat_server + "/").status_code == 200  # the page itself needs no key
    assert httpx.get(chat_server + "/v1/info").status_code == 401
    open_with_key(browser, chat_server, shots)
    assert KEY not in browser.page_source and KEY not in browser.current_url

    turn = ask(browser, QUESTION)
    lengths = []
    while turn.get_attribute("data-state") == "streaming":
        lengths.append(len(by_css(turn, ".answer")[0].get_attribute("textContent")))
        time.sleep(0.03)
        assert len(lengths) < 4000, "the answer did not finish"
    assert turn.get_attribute("data-state") == "done"
    grew = sorted(set(n for n in lengths if n))
    assert len(grew) >= 3 and lengths == sorted(lengths), f"text did not grow in pieces: {grew}"
    text = by_css(turn, ".answer")[0].get_attribute("textContent")

    # the same question through the API: the same answer, the same sources in the same order
    api = openai.OpenAI(base_url=chat_server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = api.chat.completions.create(model="smollm-rag", max_tokens=40, messages=[
        {"role": "user", "content": QUESTION}], extra_body={"rag": {"top_k": 2, "include_sources": True}})
    assert text == r.choices[0].message.content and len(text) == max(lengths + [len(text)])
    sources = r.model_extra["rag"]["sources"]
    shown = by_css(turn, ".sources .source")
    assert [s.get_attribute("data-id") for s in shown] == [s["id"] for s in sources]
    for element, s in zip(shown, sources):
        assert by_css(element, ".title")[0].text == (s["title"] or s["id"])
        assert by_css(element, ".score")[0].text == f"score {fmt(s['score'])}"
        assert by_css(element, ".rank")[0].text == f"#{s['rank']}"
        assert by_css(element, ".text")[0].text == s["text"]
    # highlighted words are words of the answer, and every answer word found in a source is marked
    answer_words = {w.lower().strip(".,") for w in text.split()}
    marks = [m.text for m in by_css(turn, ".sources mark")]
    assert marks and all(m.lower() in answer_words for m in marks)
    if "Kelmora" in text:
        assert "Kelmora" in marks
    browser.save_screenshot(str(shots / "chat.png"))


def test_stop_button_aborts_the_stream(browser: Any, chat_server: str, shots: Path) -> None:
    ensure_open(browser, chat_server, shots)
    limit = by_css(browser, "#max-tokens")[0]
    limit.clear()
    limit.send_keys("1500")
    turn = ask(browser, "Write a very long story about a violinist who travels along the Nile.")
    answer = by_css(turn, ".answer")[0]
    wait_for(lambda: len(answer.get_attribute("textContent")) > 10, 60, "streamed text")
    by_css(browser, "#stop")[0].click()
    wait_for(lambda: turn.get_attribute("data-state") == "stopped", 5, "the stopped state")
    stopped_at = answer.get_attribute("textContent")
    # the server aborted the generation: nothing in flight, and the text no longer grows
    wait_for(lambda: httpx.get(chat_server + "/health").json()["inflight"] == 0, 5, "the abort")
    time.sleep(1.0)
    assert answer.get_attribute("textContent") == stopped_at
    assert by_css(browser, "#send")[0].is_enabled() and not by_css(browser, "#stop")[0].is_enabled()
    browser.save_screenshot(str(shots / "stop.png"))


def test_search_tab_modes_side_by_side_and_hostile_text_inert(browser: Any, chat_server: str,
                                                              shots: Path) -> None:
    ensure_open(browser, chat_server, shots)
    by_css(browser, 'nav .tab[data-tab="search"]')[0].click()
    query = by_css(browser, "#search-query")[0]
    query.send_keys("Glorp festival in Vennic\n")
    columns = wait_for(lambda: (cols := by_css(browser, "#search-results .column")) and len(cols) == 3
                       and all(by_css(c, ".source") for c in cols) and cols, 60, "three result columns")
    headers = {"Authorization": f"Bearer {KEY}"}
    for col in columns:
        mode = col.get_attribute("data-mode")
        hits = httpx.post(chat_server + "/v1/retrieve", headers=headers, timeout=60,
                          json={"query": "Glorp festival in Vennic", "top_k": 5, "mode": mode}).json()["data"]
        assert [e.get_attribute("data-id") for e in by_css(col, ".source")] == [h["id"] for h in hits]
        shown = "fused {:.4f}" if mode == "hybrid" else "score {:.3f}"  # a fused score only orders its list
        assert [by_css(e, ".score")[0].text for e in by_css(col, ".source")] == [shown.format(h["score"]) for h in hits]
    assert {c.get_attribute("data-mode") for c in columns} == {"dense", "bm25", "hybrid"}
    # the hostile passage shows as text: its markup is visible, nothing of it ran or rendered
    hostile = by_css(columns[0], '.source[data-id="x"]')[0]
    assert by_css(hostile, ".title")[0].text == HOSTILE_TITLE
    assert by_css(hostile, ".text")[0].text == HOSTILE_TEXT
    assert not by_css(browser, "#search-results img, #search-results script, #search-results b")
    assert browser.execute_script("return window.__pwned === undefined")
    browser.save_screenshot(str(shots / "search.png"))


def test_runs_tab_opens_a_report_from_the_served_folder_only(browser: Any, chat_server: str, runs_dir: Path,
                                                              shots: Path) -> None:
    ensure_open(browser, chat_server, shots)
    by_css(browser, 'nav .tab[data-tab="runs"]')[0].click()
    button = wait_for(lambda: by_css(browser, '#run-list button[data-run="toy"]'), 10, "the run list")[0]
    button.click()
    report = (runs_dir / "toy" / "report.md").read_text()
    wait_for(lambda: by_css(browser, "#run-report table"), 10, "the report table")
    assert by_css(browser, "#run-report h2")[0].text == report.splitlines()[0].lstrip("# ")
    first_row = next(line for line in report.splitlines() if line.startswith("|"))
    header = [c.strip() for c in first_row.strip("|").split("|")]
    assert [th.text for th in by_css(browser, "#run-report table th")][:len(header)] == header
    plots = [line[line.index("(") + 1:-1] for line in report.splitlines() if line.startswith("![")]
    assert plots
    wait_for(lambda: len(images := by_css(browser, "#run-report img.plot")) == len(plots) and all(
        browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
        for i in images), 20, "the plots to load")
    browser.save_screenshot(str(shots / "runs.png"))
    # files only by a listed run's name and one of its listed files; never a client path
    headers = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.get(chat_server + "/v1/runs/file", params={"run": "toy", "name": "report.md"}, headers=headers)
    assert ok.status_code == 200 and ok.text == report
    for params in ({"run": "toy/..", "name": "report.md"}, {"run": "..", "name": "report.md"},
                   {"run": "toy", "name": "../toy/report.md"}, {"run": "toy", "name": "predictions.jsonl"},
                   {"run": str(runs_dir / "toy"), "name": "report.md"}):
        r = httpx.get(chat_server + "/v1/runs/file", params=params, headers=headers)
        assert r.status_code == 404, params
    assert httpx.get(chat_server + "/v1/runs", ).status_code == 401


def test_selfrag_candidates_side_by_side(browser: Any, selfrag_server: str, shots: Path) -> None:
    browser.get(selfrag_server + "/")
    wait_for(lambda: "selfrag-critic" in by_css(browser, "#model")[0].text, 10, "the model name")
    assert not by_css(browser, "#key-dialog")[0].is_displayed()  # no key on this server
    turn = ask(browser, QUESTION)
    wait_for(lambda: turn.get_attribute("data-state") != "streaming", 180, "the answer")
    assert turn.get_attribute("data-state") == "done"
    r = httpx.post(selfrag_server + "/v1/chat/completions", timeout=180, json={
        "model": "selfrag-critic", "max_tokens": 24, "rag": {"top_k": 2},
        "messages": [{"role": "user", "content": QUESTION}]}).json()
    rag = r["rag"]
    assert by_css(turn, ".answer")[0].text == r["choices"][0]["message"]["content"]
    rows = by_css(turn, ".candidates-table tbody tr")
    assert len(rows) == len(rag["scores"]) == 2
    for i, (row, s) in enumerate(zip(rows, rag["scores"])):
        cells = [td.text for td in row.find_elements("css selector", "td")]
        assert cells[3:] == [fmt(s[k]) for k in ("s_rel", "s_sup", "s_use", "seq", "total")]
        assert cells[2] == s["text"]
        assert ("chosen" in (row.get_attribute("class") or "")) == (i == rag["chosen"])
    totals = [s["total"] for s in rag["scores"]]
    assert rag["chosen"] == totals.index(max(totals))
    decision = by_css(turn, ".decision")[0].text
    assert rag["retrieval"]["decision"] in decision and "critic prompted" in decision
    browser.save_screenshot(str(shots / "selfrag.png"))


@pytest.fixture(scope="module")
def two_server(index: Path, hf_smollm: Any) -> Iterator[str]:
    """Two pipelines on one server: ``tight`` (hybrid, three passages for a context budget that
    holds one, six tokens) and ``roomy`` (dense, forty tokens)."""
    from rag.retriever import open_retriever

    tight = ChatRagPipeline(ChatPipelineConfig(
        name="tight", retrieval={"mode": "hybrid", "top_k": 3, "context_chars": 40},
        prompt={"format": "hf_template", "context_position": "user"}, generation={"max_new_tokens": 6}),
        hf_smollm, open_retriever(index, "hybrid"))
    roomy = ChatRagPipeline(ChatPipelineConfig(
        name="roomy", retrieval={"mode": "dense", "top_k": 2},
        prompt={"format": "hf_template", "context_position": "user"}, generation={"max_new_tokens": 40}),
        hf_smollm, DenseRetriever.from_folder(index))
    with running(create_app([tight, roomy])) as base:
        yield base


def finish(turn: Any) -> Any:
    wait_for(lambda: turn.get_attribute("data-state") != "streaming", 120, "the answer")
    assert turn.get_attribute("data-state") == "done"
    return turn


def test_narrow_page_picker_follows_the_answer_and_says_what_was_cut(browser: Any, two_server: str,
                                                                    shots: Path) -> None:
    from selenium.webdriver.support.ui import Select

    browser.set_window_size(420, 800)
    try:
        browser.get(two_server + "/")
        wait_for(lambda: by_css(browser, "#picker")[0].is_displayed(), 10, "the pipeline picker")
        header = by_css(browser, "#model")[0].text
        assert "index idx" in header and "hf" not in header.split(" · ")[0]  # kind, model, index named
        assert "SmolLM2" in by_css(browser, "#model")[0].get_attribute("title")
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        for q in (QUESTION, "Where is the Nile?", "Who wrote Hamlet, and when?"):
            turn = finish(ask(browser, q))
        # the third answer ends above the sticky input form, not under it
        answer_bottom = browser.execute_script(
            "return arguments[0].querySelector('.assistant').getBoundingClientRect().bottom", turn)
        form_top = browser.execute_script("return document.getElementById('chat-form').getBoundingClientRect().top")
        assert answer_bottom <= form_top + 1, (answer_bottom, form_top)
        assert turn.get_attribute("data-finish") == "length"
        assert "cut at max tokens" in browser.execute_script(
            "return getComputedStyle(arguments[0].querySelector('.assistant'), '::after').content", turn)
        assert len(by_css(turn, ".sources .source")) == 1
        assert "2 more retrieved passages did not fit" in by_css(turn, ".sources .note")[0].text
        assert by_css(turn, ".sources .score")[0].text.startswith("fused ")
        browser.save_screenshot(str(shots / "narrow.png"))

        Select(by_css(browser, "#pipeline")[0]).select_by_value("roomy")
        wait_for(lambda: "dense" in by_css(browser, "#model")[0].text, 10, "the other pipeline")
        assert not by_css(browser, ".turn")  # a new conversation
        turn = finish(ask(browser, QUESTION))
        assert len(by_css(turn, ".sources .source")) == 2 and not by_css(turn, ".sources .note")
        assert by_css(turn, ".sources .score")[0].text.startswith("score ")
    finally:
        browser.set_window_size(1280, 1000)
