// The page of `tipcap serve`: uploads images, asks for captions with and without prompt words, shows
// CLIP's entity guesses as chips that add their word to the prompt, and downloads the results as JSONL.
"use strict";

const ALL = "*";
const settings = { methods: [], maxUploadBytes: 0, maxBeams: 10 };
const cards = [];

const $ = (selector, root = document) => root.querySelector(selector);

function megabytes(bytes) {
  if (bytes < 2 ** 20) return `${Math.round(bytes / 2 ** 10)} KB`;
  return `${(bytes / 2 ** 20).toFixed(1).replace(".0", "")} MB`;
}

function setStatus(text) {
  $("#status").textContent = text;
}

async function request(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch {
    body = { error: `the server answered ${response.status} ${response.statusText}` };
  }
  if (!response.ok) {
    const error = new Error(body.error || `the server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function postJson(url, payload) {
  return request(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
}

function shownMethods() {
  const chosen = $("#method").value;
  return chosen === ALL ? settings.methods.map((m) => m.name) : [chosen];
}

// The most prompt words every shown method reads (methods trained without prompts ignore them).
function promptLimit() {
  const shown = settings.methods.filter((m) => shownMethods().includes(m.name));
  const prompted = shown.filter((m) => m.prompt !== "none");
  return Math.min(...(prompted.length ? prompted : shown).map((m) => m.max_prompt_words));
}

function beams() {
  const value = Number($("#beams").value);
  if (!Number.isInteger(value) || value < 1 || value > settings.maxBeams) {
    throw new Error(`Beams: give a whole number from 1 to ${settings.maxBeams}.`);
  }
  return value;
}

async function upload(card) {
  if (card.file.size > settings.maxUploadBytes) {
    throw new Error(
      `${card.name}: ${megabytes(card.file.size)} is over the upload limit of ` +
        `${megabytes(settings.maxUploadBytes)}; scale the image down.`,
    );
  }
  // Sent as bytes: the browser's type for a file comes from its name (empty or odd for some), and the
  // server decodes the formats it reads whatever the type says.
  const held = await request(`/api/images?name=${encodeURIComponent(card.name)}`, {
    method: "POST",
    headers: { "Content-Type": "application/octet-stream" },
    body: card.file,
  });
  card.imageId = held.image_id;
}

async function captionWith(card, method, beamWidth) {
  const payload = () => ({ image_id: card.imageId, method, prompt: card.prompt, beams: beamWidth });
  try {
    return await postJson("/api/caption", payload());
  } catch (error) {
    if (error.status !== 404) throw error;
    await upload(card); // the server let the image go: send it again once
    return await postJson("/api/caption", payload());
  }
}

// Caption one card with every shown method; only the latest round of a card is drawn.
async function run(card) {
  const round = ++card.round;
  card.element.dataset.state = "busy";
  showError(card, null);
  try {
    const beamWidth = beams();
    if (!card.imageId) await upload(card);
    const methods = shownMethods();
    const answers = await Promise.all(methods.map((method) => captionWith(card, method, beamWidth)));
    if (round !== card.round) return;
    card.results = Object.fromEntries(answers.map((answer) => [answer.method, answer]));
    card.methods = methods;
    card.element.dataset.requests = String(Number(card.element.dataset.requests) + 1);
    card.element.dataset.state = "done";
  } catch (error) {
    if (round !== card.round) return;
    card.element.dataset.state = "error";
    card.element.classList.toggle("unreadable", !card.imageId); // nothing to prompt without an image
    showError(card, error.message);
  }
  render(card);
  $("#download").disabled = !cards.some((c) => Object.keys(c.results).length);
}

function showError(card, message) {
  const line = $(".error", card.element);
  line.hidden = !message;
  line.textContent = message || "";
}

// Add words to a card's prompt and re-caption it; false, with a message, when the shown methods read fewer.
function addWords(card, words) {
  const prompt = [...new Set([...card.prompt, ...words])];
  const limit = promptLimit();
  if (prompt.length > limit) {
    showError(card, `At most ${limit} prompt words for ${shownMethods().join(", ")}.`);
    return false;
  }
  card.prompt = prompt;
  run(card);
  return true;
}

// The words of `caption` that are not in `plain` (a longest common subsequence of words apart), as a list
// of [word, changed] pairs: what the prompt changed in the caption.
function changedWords(plain, caption) {
  const a = plain.split(/\s+/).filter(Boolean);
  const b = caption.split(/\s+/).filter(Boolean);
  const common = Array.from({ length: a.length + 1 }, () => new Array(b.length + 1).fill(0));
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      common[i][j] = a[i] === b[j] ? common[i + 1][j + 1] + 1 : Math.max(common[i + 1][j], common[i][j + 1]);
    }
  }
  const marked = [];
  let i = 0;
  for (let j = 0; j < b.length; j++) {
    if (i < a.length && a[i] === b[j] && common[i][j] === common[i + 1][j + 1] + 1) {
      marked.push([b[j], false]);
      i++;
    } else if (i < a.length && common[i + 1][j] >= common[i][j + 1]) {
      i++;
      j--;
    } else {
      marked.push([b[j], true]);
    }
  }
  return marked;
}

function captionCell(result) {
  const cell = document.createElement("td");
  cell.className = "caption";
  cell.dataset.label = "with prompt";
  cell.dataset.prompt = result.prompt.join(", ");
  const text = document.createElement("span");
  text.className = "text";
  const words = result.prompt.length ? changedWords(result.plain, result.caption) : [[result.caption, false]];
  words.forEach(([word, changed], index) => {
    if (index) text.append(" ");
    if (!changed) {
      text.append(word);
      return;
    }
    const mark = document.createElement("mark");
    mark.className = "changed";
    mark.title = "changed by the prompt";
    mark.textContent = word;
    text.append(mark);
  });
  cell.append(text);
  const about = document.createElement("small");
  about.className = "about";
  if (result.prompt.length) about.append(`prompt: ${result.prompt.join(", ")}`);
  else if (!result.note) about.append("no prompt");
  if (result.missing && result.missing.length) {
    const missing = document.createElement("span");
    missing.className = "missing";
    missing.textContent = `not in the caption: ${result.missing.join(", ")}`;
    about.append(" · ", missing);
  }
  if (result.note) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = result.note;
    if (about.childNodes.length) about.append(document.createElement("br"));
    about.append(note);
  }
  cell.append(document.createElement("br"), about);
  return cell;
}

function render(card) {
  const root = card.element;
  const prompt = $(".prompt", root);
  prompt.replaceChildren(
    ...card.prompt.map((word) => {
      const tag = document.createElement("span");
      tag.className = "prompt-word";
      tag.dataset.word = word;
      tag.textContent = word;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.title = `remove ${word}`;
      remove.setAttribute("aria-label", `remove ${word}`);
      remove.textContent = "×";
      remove.addEventListener("click", () => {
        card.prompt = card.prompt.filter((w) => w !== word);
        run(card);
      });
      tag.append(remove);
      return tag;
    }),
  );
  const first = card.methods.map((m) => card.results[m]).find((r) => r && r.guesses.length);
  $(".guesses", root).replaceChildren(
    ...(first ? first.guesses : []).map(({ word, probability }) => {
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = card.prompt.includes(word) ? "chip used" : "chip";
      chip.setAttribute("aria-pressed", String(card.prompt.includes(word)));
      chip.dataset.word = word;
      chip.textContent = `${word} ${Math.round(probability * 100)}%`;
      chip.addEventListener("click", () => addWords(card, [word]));
      return chip;
    }),
  );
  $(".results tbody", root).replaceChildren(
    ...card.methods
      .filter((m) => card.results[m])
      .map((method) => {
        const result = card.results[method];
        const row = document.createElement("tr");
        row.dataset.method = method;
        const name = document.createElement("td");
        name.className = "method";
        name.dataset.label = "method";
        name.textContent = method;
        const plain = document.createElement("td");
        plain.className = "plain";
        plain.dataset.label = "without prompt";
        plain.textContent = result.plain;
        row.append(name, plain, captionCell(result));
        return row;
      }),
  );
}

function addFiles(files) {
  for (const file of files) {
    const element = $("#card-template").content.firstElementChild.cloneNode(true);
    const card = { file, name: file.name || "image", element, imageId: null, prompt: [], results: {},
                   methods: [], round: 0 };
    $(".name", element).textContent = card.name;
    const thumb = $(".thumb", element);
    thumb.src = URL.createObjectURL(file);
    thumb.alt = card.name;
    const input = $(".words", element);
    const add = () => {
      const words = input.value.split(",").map((w) => w.trim().toLowerCase()).filter(Boolean);
      if (!words.length) {
        showError(card, "Empty prompt: type one or more words, separated by commas.");
        return;
      }
      if (addWords(card, words)) input.value = "";
    };
    $(".add", element).addEventListener("click", add);
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") add();
    });
    $(".clear", element).addEventListener("click", () => {
      card.prompt = [];
      run(card);
    });
    cards.push(card);
    $("#cards").prepend(element);
    run(card);
  }
}

async function download() {
  const several = shownMethods().length > 1;
  const results = [];
  for (const card of cards) {
    for (const method of card.methods) {
      const result = card.results[method];
      if (!result) continue;
      const row = { image: card.name, caption: result.caption, prompt: result.prompt };
      if (several) row.method = method;
      results.push(row);
    }
  }
  const response = await fetch("/api/jsonl", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ results }),
  });
  if (!response.ok) {
    setStatus((await response.json()).error);
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = "captions.jsonl";
  link.click();
  URL.revokeObjectURL(link.href);
}

async function start() {
  let served;
  try {
    served = await request("/api/methods");
  } catch (error) {
    setStatus(`Cannot reach the server: ${error.message}`);
    return;
  }
  Object.assign(settings, {
    methods: served.methods,
    maxUploadBytes: served.max_upload_bytes,
    maxBeams: served.max_beams,
  });
  const select = $("#method");
  for (const method of served.methods) {
    select.add(new Option(method.prompt === "none" ? method.name : `${method.name} (prompts: ${method.prompt})`,
                          method.name));
  }
  if (served.methods.length > 1) select.add(new Option("all, side by side", ALL));
  select.value = served.default;
  $("#beams").max = String(served.max_beams);
  $("#limit").textContent = megabytes(served.max_upload_bytes);
  const rerun = () => cards.forEach(run);
  select.addEventListener("change", rerun);
  $("#beams").addEventListener("change", rerun);
  $("#pick").addEventListener("click", () => $("#files").click());
  $("#files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  $("#download").addEventListener("click", download);
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    $("#drop").classList.add("over");
  });
  document.addEventListener("dragleave", () => $("#drop").classList.remove("over"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    $("#drop").classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  document.body.dataset.ready = "true";
  setStatus(`${served.methods.length} method${served.methods.length > 1 ? "s" : ""} served.`);
}

start();
