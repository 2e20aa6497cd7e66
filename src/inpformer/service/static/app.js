// Operator page: drop or pick images, POST each to /predict, show a result card and a line in the recent list.
// With feedback on (serve --feedback-dir), a card's button sends the image back to /feedback marked as the opposite
// of its decision: a false reject ("this part is good") or a missed defect ("this part is defective").
"use strict";

const KEY_STORAGE = "inpformer.apiKey";
const RECENT_LIMIT = 50;
const RETRIES = 5; // on 503 (queue full), wait Retry-After and try again

const keyInput = document.getElementById("api-key");
const categorySelect = document.getElementById("category");
const drop = document.getElementById("drop");
const picker = document.getElementById("files");
let feedbackOn = false;

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadModel() {
  const line = document.getElementById("model");
  try {
    const response = await fetch("model", { headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    const size = Array.isArray(body.image_size) ? body.image_size.join("×") : body.image_size;
    line.textContent = `${body.backbone} · ${size}px · ${body.categories.join(", ")}`;
    categorySelect.replaceChildren(new Option("recognise", ""), ...body.categories.map((c) => new Option(c, c)));
    categorySelect.disabled = body.categories.length < 2;
    feedbackOn = Boolean(body.feedback);
  } catch (error) {
    line.textContent = `model unavailable: ${error.message}`;
  }
}

async function predict(file) {
  const form = new FormData();
  form.append("files", file, file.name);
  const query = new URLSearchParams({ overlay: "true" });
  if (categorySelect.value) query.set("category", categorySelect.value);
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(`predict?${query}`, { method: "POST", body: form, headers: authHeaders() });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (response.status === 503 && attempt < RETRIES) {
      const seconds = Number(response.headers.get("Retry-After")) || 1;
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      continue;
    }
    if (body.results) return body.results[0];
    return { source: file.name, error: body.error || `HTTP ${response.status}` };
  }
}

function newCard(name) {
  const card = document.getElementById("card").content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = name;
  document.getElementById("results").prepend(card);
  return card;
}

async function mark(file, label, result) {
  const { mask_png, overlay_png, ...summary } = result; // the images stay here
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("label", label);
  form.append("result", JSON.stringify(summary));
  const response = await fetch("feedback", { method: "POST", body: form, headers: authHeaders() });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body.stored;
}

function offerFeedback(card, file, result) {
  const label = result.decision === "defective" ? "good" : "defective";
  const row = card.querySelector(".feedback");
  const button = row.querySelector(".mark");
  const status = row.querySelector(".mark-status");
  button.textContent = label === "good" ? "This part is good (false reject)" : "This part is defective (missed defect)";
  button.dataset.label = label;
  row.hidden = false;
  button.addEventListener("click", async () => {
    button.disabled = true;
    status.textContent = "saving…";
    try {
      status.textContent = `marked ${label}: ${await mark(file, label, result)}`;
    } catch (error) {
      status.textContent = `not saved: ${error.message}`;
      button.disabled = false;
    }
  });
}

function fillCard(card, result, file) {
  const badge = card.querySelector(".decision");
  if (result.error) {
    card.classList.add("error");
    badge.textContent = "failed";
    badge.classList.add("failed");
    card.querySelector(".images").remove();
    card.querySelector(".bar").remove();
    card.querySelector(".details").textContent = result.error;
    return;
  }
  card.classList.add(result.decision);
  badge.textContent = result.decision;
  badge.classList.add(result.decision);
  card.querySelector(".overlay").src = `data:image/png;base64,${result.overlay_png}`;
  card.querySelector(".mask").src = `data:image/png;base64,${result.mask_png}`;
  card.querySelector(".fill").style.width = `${Math.min(result.normalized_score, 1) * 100}%`;
  const regions = result.regions.length === 1 ? "1 region" : `${result.regions.length} regions`;
  card.querySelector(".details").textContent =
    `score ${result.score.toFixed(4)} vs threshold ${result.threshold.toFixed(4)} ` +
    `(normalised ${result.normalized_score.toFixed(2)}) · ${result.category || "-"} · ${regions}`;
  if (feedbackOn) offerFeedback(card, file, result);
}

function addRecent(result) {
  const row = document.createElement("tr");
  const cells = [
    new Date().toLocaleTimeString(),
    result.source,
    result.category || "",
    result.error ? "" : result.score.toFixed(4),
    result.error ? "failed" : result.decision,
  ];
  for (const text of cells) row.insertCell().textContent = text;
  row.lastChild.className = cells[4];
  if (result.error) row.title = result.error;
  const list = document.getElementById("recent");
  list.prepend(row);
  while (list.rows.length > RECENT_LIMIT) list.lastChild.remove();
}

async function handle(files) {
  await Promise.all([...files].map(async (file) => {
    const card = newCard(file.name);
    let result;
    try {
      result = await predict(file);
    } catch (error) {
      result = { source: file.name, error: `network error: ${error.message}` };
    }
    fillCard(card, result, file);
    addRecent(result);
  }));
}

keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  loadModel();
});
picker.addEventListener("change", () => {
  handle(picker.files);
  picker.value = "";
});
drop.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" && event.key !== " ") return;
  event.preventDefault();
  picker.click();
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  handle(event.dataTransfer.files);
});
loadModel();
