// Operator page: drop or pick images, POST each to /predict, show a result card and a line in the recent list.
"use strict";

const KEY_STORAGE = "inpformer.apiKey";
const RECENT_LIMIT = 50;
const RETRIES = 5; // on 503 (queue full), wait Retry-After and try again

const keyInput = document.getElementById("api-key");
const categorySelect = document.getElementById("category");
const drop = document.getElementById("drop");
const picker = document.getElementById("files");

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

function fillCard(card, result) {
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
    fillCard(card, result);
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
