// The rag playground: chat (streamed), sources, Self-RAG candidates, search, eval reports.
// Every piece of text from the server (answers, passages, titles, reports) is put into the page
// with textContent or as a text node, never parsed as HTML. The API key lives in this tab's
// memory only and travels as the Authorization header.
"use strict";

const state = {
  key: null,           // the API key, once asked for
  info: null,          // GET /v1/info
  history: [],         // the conversation so far: {role, content}
  controller: null,    // AbortController of the stream in flight
};

// --- small DOM helpers ----------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);  // strings become text nodes
  return node;
}

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");

function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = kind;
}

// --- API --------------------------------------------------------------------------------------

class AuthNeeded extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) {
    askKey(state.key ? "The server refused that key." : "");
    throw new AuthNeeded("API key needed");
  }
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return r;
}

function askKey(error) {
  $("key-error").textContent = error;
  $("key-dialog").hidden = false;
  $("key-input").value = "";
  $("key-input").focus();
}

// The last part of a path: the index folder's name.
const baseName = (path) => (path || "").split(/[\\/]/).filter(Boolean).pop() || "";

async function start(model) {
  try {
    const query = model ? "?" + new URLSearchParams({ model }) : "";
    state.info = await (await api("/v1/info" + query)).json();
  } catch (e) {
    if (!(e instanceof AuthNeeded)) setStatus(e.message, "error");
    return;
  }
  $("key-dialog").hidden = true;
  const i = state.info;
  const parts = [i.kind, i.generator, i.index && i.index.index ? "index " + baseName(i.index.index) +
    (i.index.version ? " v" + i.index.version : "") : null, i.retrieval_mode];
  $("model").textContent = (i.models.length > 1 ? "" : i.model + " · ") + parts.filter(Boolean).join(" · ");
  $("model").title = [i.model, ...parts].filter(Boolean).join("\n");
  const picker = $("pipeline");
  picker.replaceChildren(...i.models.map((m) => el("option", { value: m, text: m, selected: m === i.model })));
  $("picker").hidden = i.models.length < 2;
  if (i.top_k) $("top-k").value = i.top_k;
  $("max-tokens").value = i.max_tokens || "";
  $("max-tokens").disabled = i.kind === "retrieval";
  setStatus("ready");
}

// What a hit's score means in a mode: fused scores only order their own list.
function scoreText(mode, score) {
  return mode === "hybrid" ? "fused " + fmt(score, 4) : "score " + fmt(score);
}
const SCORE_HELP = { hybrid: "hybrid: the dense and BM25 rankings fused (retrieval.fusion); the fused score orders " +
  "this list and is not a similarity", dense: "dense: the query and passage embeddings' similarity",
  bm25: "BM25: lexical relevance (unbounded)" };

// --- tabs -------------------------------------------------------------------------------------

function showTab(name) {
  for (const b of document.querySelectorAll("nav .tab")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const p of document.querySelectorAll("main .panel")) p.hidden = p.id !== "tab-" + name;
  if (name === "runs") loadRuns();
}

// --- chat -------------------------------------------------------------------------------------

const STOPWORDS = new Set(("the and for are was were with that this from has have had not but its " +
  "his her their they them you your our who what when where which how why can will would one " +
  "into than then also there these those been being about over under more most such").split(" "));

function words(text) {
  return (text.toLowerCase().match(/[\p{L}\p{N}]+/gu) || []).filter((w) => w.length > 2 && !STOPWORDS.has(w));
}

// `text` as text nodes, with the words that occur in `answerWords` wrapped in <mark>.
function highlighted(text, answerWords) {
  const frag = document.createDocumentFragment();
  for (const piece of text.split(/([\p{L}\p{N}]+)/u)) {
    if (!piece) continue;
    if (answerWords.has(piece.toLowerCase())) frag.append(el("mark", { text: piece }));
    else frag.append(piece);
  }
  return frag;
}

function renderSources(turn, sources, answer, cut, query) {
  turn.sources = sources;
  if (cut !== undefined) turn.cut = cut;
  if (query !== undefined) turn.query = query;
  const box = turn.querySelector(".sources");
  box.replaceChildren(el("h3", { text: "Sources (" + sources.length + ")" }));
  if (turn.query) box.append(el("p", { class: "query", text: "searched: " + turn.query }));
  if (turn.cut) {
    box.append(el("p", { class: "note", text: turn.cut + " more retrieved passage" + (turn.cut > 1 ? "s" : "") +
      " did not fit the pipeline's context budget (retrieval.context_chars) and " + (turn.cut > 1 ? "were" : "was") +
      " not given to the model" }));
  }
  const answerWords = new Set(words(answer || ""));
  const mode = state.info.retrieval_mode;
  for (const s of sources) {
    box.append(el("div", { class: "source", "data-id": s.id },
      el("div", { class: "meta" },
        el("span", { class: "rank", text: "#" + s.rank }),
        el("span", { class: "title", text: s.title || s.id }),
        el("span", { class: "score", text: scoreText(mode, s.score), title: SCORE_HELP[mode] || "" })),
      el("p", { class: "text" }, highlighted(s.text, answerWords))));
  }
}

function renderCandidates(turn, rag) {
  const box = turn.querySelector(".candidates");
  box.replaceChildren();
  if (rag.retrieval) {
    const r = rag.retrieval;
    const p = r.probability === null || r.probability === undefined ? "" : ", p = " + fmt(r.probability);
    box.append(el("p", { class: "decision", text: "Retrieval: " + r.decision + " (mode " + r.mode +
      ", critic " + r.critic + p + ")" }));
  }
  if (!rag.scores || !rag.scores.length) return;
  const titles = Object.fromEntries((turn.sources || []).map((s) => [s.id, s.title || s.id]));
  const head = el("tr", {}, ...["", "passage", "candidate answer", "IsRel", "IsSup", "IsUse", "sequence", "total"]
    .map((h) => el("th", { text: h })));
  const body = rag.scores.map((c, i) => {
    const chosen = i === rag.chosen;
    return el("tr", { class: chosen ? "chosen" : "", "data-index": String(i) },
      el("td", { text: chosen ? "★ chosen" : String(i + 1) }),
      el("td", { text: c.passage_id === null ? "(no passage)" : titles[c.passage_id] || c.passage_id }),
      el("td", { class: "answer", text: c.text }),
      el("td", { class: "num", text: fmt(c.s_rel) }), el("td", { class: "num", text: fmt(c.s_sup) }),
      el("td", { class: "num", text: fmt(c.s_use) }), el("td", { class: "num", text: fmt(c.seq) }),
      el("td", { class: "num", text: fmt(c.total) }));
  });
  box.append(el("h3", { text: "Self-RAG candidates" }),
    el("table", { class: "candidates-table" }, el("thead", {}, head), el("tbody", {}, ...body)));
}

function newTurn(question) {
  const turn = el("div", { class: "turn", "data-state": "streaming" },
    el("div", { class: "user", text: question }),
    el("div", { class: "assistant" }, el("span", { class: "answer" })),
    el("div", { class: "candidates" }),
    el("div", { class: "sources" }));
  $("conversation").append(turn);
  follow(turn);
  return turn;
}

// Keep the end of the turn being written in view, above the sticky input form.
function follow(turn) {
  turn.scrollIntoView({ block: "end" });
}

// Server-sent events from a fetch body: calls onData with each event's data.
async function readEvents(response, onData) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onData(data);
    }
  }
}

async function send(question) {
  const turn = newTurn(question);
  const answerNode = turn.querySelector(".answer");
  state.history.push({ role: "user", content: question });
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("streaming…");
  const body = { model: state.info.model, messages: state.history, stream: true,
    rag: { include_sources: true } };
  const topK = parseInt($("top-k").value, 10);
  if (topK > 0) body.rag.top_k = topK;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  let final = null;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
      signal: state.controller.signal });
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (!chunk.choices.length) return;  // a usage chunk
      const delta = chunk.choices[0].delta || {};
      if (delta.content) answerNode.textContent += delta.content;
      if (chunk.rag && chunk.rag.sources) renderSources(turn, chunk.rag.sources, "", chunk.rag.cut, chunk.rag.query);
      if (chunk.choices[0].finish_reason) {
        final = chunk.rag || {};
        turn.dataset.finish = chunk.choices[0].finish_reason;
      }
      if (delta.content || final) follow(turn);
    });
    turn.dataset.state = final ? "done" : "error";
    setStatus(final ? "done" : "the stream ended early", final ? "" : "error");
  } catch (e) {
    if (e.name === "AbortError") {
      turn.dataset.state = "stopped";
      setStatus("stopped");
    } else {
      turn.dataset.state = "error";
      turn.append(el("p", { class: "error", text: e.message }));
      setStatus(e.message, "error");
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  const answer = answerNode.textContent;
  state.history.push({ role: "assistant", content: answer });
  if (final) {
    renderSources(turn, final.sources || turn.sources || [], answer);
    renderCandidates(turn, final);
  } else if (turn.sources) {
    renderSources(turn, turn.sources, answer);
  }
  follow(turn);
}

// --- search -----------------------------------------------------------------------------------

async function search(query) {
  const k = parseInt($("search-k").value, 10) || 5;
  const box = $("search-results");
  box.replaceChildren();
  setStatus("searching…");
  await Promise.all(state.info.search_modes.map(async (mode) => {
    const col = el("div", { class: "column", "data-mode": mode }, el("h3", { text: mode }));
    box.append(col);
    try {
      const r = await api("/v1/retrieve", { method: "POST",
        body: JSON.stringify({ model: state.info.model, query, top_k: k, mode }) });
      const hits = (await r.json()).data;
      if (!hits.length) col.append(el("p", { text: "no results" }));
      for (const h of hits) {
        col.append(el("div", { class: "source", "data-id": h.id },
          el("div", { class: "meta" }, el("span", { class: "rank", text: "#" + h.rank }),
            el("span", { class: "title", text: h.title || h.id }),
            el("span", { class: "score", text: scoreText(mode, h.score), title: SCORE_HELP[mode] })),
          el("p", { class: "text", text: h.text })));
      }
    } catch (e) {
      col.append(el("p", { class: "error", text: e.message }));
    }
  }));
  setStatus("done");
}

// --- eval runs --------------------------------------------------------------------------------

async function loadRuns() {
  const list = $("run-list");
  if (!state.info || !state.info.runs) {
    list.replaceChildren(el("p", { text: "Start rag serve with --runs DIR to open eval reports here." }));
    return;
  }
  try {
    const runs = (await (await api("/v1/runs")).json()).data;
    list.replaceChildren(...(runs.length ? runs.map((run) => el("button", {
      type: "button", class: "run", "data-run": run.name, text: run.name + " — " + run.title,
      onclick: () => openRun(run) })) : [el("p", { text: "No reports (report.md) in the runs folder." })]));
  } catch (e) {
    if (!(e instanceof AuthNeeded)) list.replaceChildren(el("p", { class: "error", text: e.message }));
  }
}

function runFileUrl(run, name) {
  return "/v1/runs/file?" + new URLSearchParams({ run: run.name, name });
}

// A report.md as headings, paragraphs, tables and images: the subset `rag eval` writes.
async function openRun(run) {
  const out = $("run-report");
  out.replaceChildren(el("p", { text: "loading " + run.name + "…" }));
  const text = await (await api(runFileUrl(run, "report.md"))).text();
  const nodes = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const heading = line.match(/^(#{1,4})\s+(.*)$/);
    const image = line.match(/^!\[([^\]]*)\]\(([^)\s]+)\)$/);
    if (heading) {
      nodes.push(el("h" + Math.min(6, heading[1].length + 1), { text: heading[2] }));
    } else if (image) {
      const img = el("img", { alt: image[1], class: "plot" });
      if (run.files.includes(image[2])) {
        api(runFileUrl(run, image[2])).then((r) => r.blob()).then((b) => { img.src = URL.createObjectURL(b); })
          .catch(() => { img.alt = image[1] + " (not available)"; });
      }
      nodes.push(img);
    } else if (line.startsWith("|")) {
      const rows = [];
      while (i < lines.length && lines[i].startsWith("|")) rows.push(lines[i++]);
      i--;
      const cells = (row) => row.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const body = rows.slice(1).filter((r) => !/^\|[\s:|-]+\|$/.test(r));
      nodes.push(el("table", { class: "report-table" },
        el("thead", {}, el("tr", {}, ...cells(rows[0]).map((c) => el("th", { text: c })))),
        el("tbody", {}, ...body.map((r) => el("tr", {}, ...cells(r).map((c) => el("td", { text: c })))))));
    } else if (line.trim()) {
      nodes.push(el("p", { text: line }));
    }
  }
  out.replaceChildren(...nodes);
}

// --- wiring -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("nav .tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key-input").value;
    start();
  });
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("question").value.trim();
    if (!q || state.controller || !state.info) return;
    $("question").value = "";
    send(q);
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  const newChat = () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("conversation").replaceChildren();
  };
  $("new-chat").addEventListener("click", newChat);
  $("pipeline").addEventListener("change", () => {  // another pipeline: a new conversation
    newChat();
    $("search-results").replaceChildren();
    start($("pipeline").value);
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("search-query").value.trim();
    if (q && state.info) search(q);
  });
  start();
});
