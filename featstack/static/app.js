// The photo app's page: sends each chosen or dropped photo to /api/predict and shows the answer as a card.
"use strict";

const TOP = 5;
const IN_FLIGHT = 4; // photos sent at once; the server batches them into one forward pass
const state = { token: sessionStorage.getItem("featstack-token") || "", examples: new Map(), ready: null };
const $ = (selector, root = document) => root.querySelector(selector);

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("#token-box").hidden = false;
    throw new Error("this server needs a token: enter it above");
  }
  return response;
}

// With a token, images and links cannot carry the header themselves: fetch them and hand over a blob URL.
async function imageSource(url) {
  if (!state.token) return url;
  const response = await api(url);
  return URL.createObjectURL(await response.blob());
}

function link(text, url) {
  const a = document.createElement("a");
  a.textContent = text;
  a.href = url;
  a.target = "_blank";
  a.rel = "noopener";
  a.addEventListener("click", async (event) => {
    if (!state.token) return;
    event.preventDefault();
    window.open(await imageSource(url), "_blank");
  });
  return a;
}

function percent(p) {
  return p > 0 && p < 0.00005 ? "< 0.01 %" : (100 * p).toFixed(2) + " %";
}

async function loadRun() {
  const run = await (await api("/api/run")).json();
  const line = $("#run");
  line.textContent = "";
  const parts = [["run ", run.run], [" · model ", run.model], [" on ", run.backbones.join(", ")]];
  if (run.holdout) {
    parts.push([" · holdout accuracy ", run.holdout.accuracy.toFixed(4)]);
    parts.push([" · log loss ", run.holdout.log_loss.toFixed(4)]);
  } else {
    parts.push([" · ", "no holdout score"]);
  }
  for (const [label, value] of parts) {
    line.append(label);
    const strong = document.createElement("strong");
    strong.textContent = value;
    line.append(strong);
  }
  const links = $("#links");
  links.textContent = "";
  if (run.report) links.append(link("Report", run.report));
  if (run.confusion) links.append(link("Confusion matrix", run.confusion));
  $("#banner").hidden = !run.random_weights;
  $("#open-banner").hidden = !run.open_api;
  const question = `Which ${run.noun || "class"} is this?`;
  $("#title").textContent = question;
  document.title = "featstack: " + question.toLowerCase();
  const classes = await (await api("/api/classes")).json();
  for (const c of classes.classes) state.examples.set(c.class, c.examples);
}

function newCard(name) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  $(".filename", card).textContent = name;
  setProgress(card, "waiting to be sent");
  $("#cards").prepend(card);
  return card;
}

// Each card says where its photo is: waiting, being sent, being answered; the answer replaces the line.
function setProgress(card, text) {
  $(".progress", card).textContent = text;
  card.dataset.state = text;
}

function showError(card, name, message) {
  // The card's heading names the file: the message does not repeat it ("name: reason" from the server).
  const prefix = name + ": ";
  const error = $(".error", card);
  error.textContent = message.startsWith(prefix) ? message.slice(prefix.length) : message;
  error.hidden = false;
  $(".photo", card).remove(); // no image to show: no empty frame, no broken-image icon or alt text
  setProgress(card, "");
  card.classList.add("failed");
  card.dataset.state = "failed";
}

async function showAnswer(card, result) {
  const photo = $(".photo", card);
  photo.src = result.image;
  photo.hidden = false;
  setProgress(card, "");
  card.dataset.state = "answered";
  const list = $(".predictions", card);
  for (const p of result.predictions.slice(0, TOP)) {
    const row = document.createElement("li");
    row.dataset.testid = "prediction";
    row.dataset.class = p.class;
    row.dataset.probability = String(p.probability);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = p.class;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * p.probability).toFixed(2) + "%";
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = percent(p.probability);
    row.append(name, bar, prob);
    list.append(row);
  }
  const top = result.predictions[0].class;
  const ids = state.examples.get(top) || [];
  if (!ids.length) return;
  $(".top-class", card).textContent = top;
  const row = $(".example-row", card);
  for (const id of ids) {
    const img = document.createElement("img");
    img.alt = "training photo " + id + " (" + top + ")";
    img.dataset.testid = "example";
    row.append(img);
    imageSource("/api/examples/" + encodeURIComponent(id)).then((src) => { img.src = src; }, () => img.remove());
  }
  $(".examples", card).hidden = false;
}

async function predictOne(file, card) {
  try {
    await state.ready;
    setProgress(card, "sending…");
    const form = new FormData();
    form.append("file", file, file.name);
    const sent = api("/api/predict?preview=true", { method: "POST", body: form });
    setProgress(card, "answering…");
    const response = await sent;
    const body = await response.json();
    if (!response.ok) return showError(card, file.name, body.detail);
    const result = body.results[0];
    if (result.error) return showError(card, file.name, result.error);
    await showAnswer(card, result);
  } catch (err) {
    showError(card, file.name, err.message);
  }
}

async function predictAll(files) {
  const queue = Array.from(files, (file) => [file, newCard(file.name)]);
  const total = queue.length;
  const progress = $("#progress");
  const text = $("#status-text");
  let done = 0;
  const show = () => {
    progress.max = total;
    progress.value = done;
    progress.hidden = done === total;
    text.textContent = done === total ? `${total} of ${total} answered` : `${done} of ${total} answered…`;
  };
  show();
  const worker = async () => {
    while (queue.length) {
      const [file, card] = queue.shift();
      await predictOne(file, card);
      done += 1;
      show();
    }
  };
  await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, queue.length) }, worker));
}

function setUp() {
  const drop = $("#drop");
  const input = $("#file-input");
  input.addEventListener("change", () => {
    if (input.files.length) predictAll(input.files);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) predictAll(event.dataTransfer.files);
  });
  $("#token-box").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("#token").value.trim();
    sessionStorage.setItem("featstack-token", state.token);
    $("#token-box").hidden = true;
    state.ready = loadRun().catch((err) => { $("#status-text").textContent = err.message; });
  });
  state.ready = loadRun().catch((err) => { $("#status-text").textContent = err.message; });
}

setUp();
