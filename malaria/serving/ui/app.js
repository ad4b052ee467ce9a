// The lab page: plain JavaScript against the service's own API (same origin), no build step, no CDN.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { fields: [], crops: [], selected: null, queue: [] };
const CHUNK = 8; // cell crops per /classify request (at or under the server's per-request limit)

// --- the API --------------------------------------------------------------------------------
function headers() {
  const token = sessionStorage.getItem("malaria-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function post(route, form) {
  // A FormData is sent as multipart; anything else as JSON.
  const json = !(form instanceof FormData);
  const options = { method: "POST", headers: { ...headers(), ...(json ? { "Content-Type": "application/json" } : {}) } };
  const response = await fetch(route, { ...options, body: json ? JSON.stringify(form) : form });
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      const body = await response.json();
      message += `: ${body.error || JSON.stringify(body)}`;
      if (Array.isArray(body.detail) && body.detail.length) message += ` (${body.detail[0].loc.join(".")}: ${body.detail[0].msg})`;
    } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response.json();
}

const pct = (value) => (value === null || value === undefined ? "-" : `${value.toFixed(2)} %`);
function status(message, error = false) { const el = $("#status"); el.textContent = message; el.className = error ? "error" : ""; }

// --- fields ----------------------------------------------------------------------------------
function fieldForm(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  const diameter = $("#diameter").value;
  if (diameter) form.append("cell_diameter_px", diameter);
  return form;
}

function drawField(field, index) {
  const section = document.createElement("article");
  section.className = "field";
  const a = field.analysis;
  const title = document.createElement("h3");
  title.textContent = a.usable
    ? `${field.file.name}: ${a.counts.cells} cells, ${a.counts.parasitized} parasitized, ${pct(a.parasitemia_percent)}`
    : `${field.file.name}: not counted (${a.reason})`;
  section.append(title);
  const stage = document.createElement("div");
  stage.className = "stage";
  const img = document.createElement("img");
  img.src = field.url;
  img.alt = field.file.name;
  stage.append(img);
  const [width, height] = a.image_size;
  a.cells.forEach((cell, cellIndex) => {
    const box = document.createElement("div");
    box.className = `cell-box ${cell.edge ? "edge" : cell.decision}`;
    const [x, y, w, h] = cell.box;
    Object.assign(box.style, { left: `${(100 * x) / width}%`, top: `${(100 * y) / height}%`, width: `${(100 * w) / width}%`, height: `${(100 * h) / height}%` });
    box.title = `${cell.label} P=${cell.probability_parasitized.toFixed(3)} (${cell.decision})${cell.edge ? ", edge: not counted" : ""}${cell.joined ? ", two segmented parts counted as one cell" : ""}`;
    box.dataset.field = index;
    box.dataset.cell = cellIndex;
    box.addEventListener("click", () => openCell({ kind: "field", field: index, cell: cellIndex }, box));
    stage.append(box);
  });
  section.append(stage);
  const legend = document.createElement("p");
  legend.className = "legend";
  legend.innerHTML = ["parasitized", "uninfected", "refer", "edge"].map((k) => `<span><span class="swatch" style="border-color: var(--${k})"></span>${k}</span>`).join("");
  section.append(legend);
  $("#fields").append(section);
}

async function summariseSlide() {
  // The service pools the fields and gives the interval and the minimum-cells flag (the CLI's rule too).
  const slide = await post("/summarize_slide", { fields: state.fields.map((f) => ({ usable: f.analysis.usable, counts: f.analysis.counts })) });
  $("#slide-summary").hidden = state.fields.length === 0;
  $("#slide-name").textContent = $("#slide-id").value || "(no id)";
  $("#parasitemia").textContent = pct(slide.parasitemia_percent);
  const ci = slide.parasitemia_ci95;
  $("#parasitemia-ci").textContent = ci ? `(95 % interval ${ci[0].toFixed(2)}-${ci[1].toFixed(2)} %)` : "";
  $("#cell-count").textContent = String(slide.cells);
  $("#field-count").textContent = String(slide.usable_fields);
  $("#refer-count").textContent = String(slide.refer);
  const skipped = slide.fields - slide.usable_fields;
  const warnings = [];
  if (skipped) warnings.push(`${skipped} field(s) could not be counted and are left out.`);
  if (!slide.enough_cells) warnings.push(`Counted on ${slide.cells} red cells, fewer than the ${slide.min_cells} a slide needs: read more fields.`);
  $("#slide-warning").hidden = warnings.length === 0;
  $("#slide-warning").textContent = warnings.join(" ");
  const body = $("#field-table tbody");
  body.replaceChildren(...state.fields.map((f) => {
    const a = f.analysis, row = document.createElement("tr");
    const interval = a.parasitemia_ci95 ? `${a.parasitemia_ci95[0].toFixed(2)}-${a.parasitemia_ci95[1].toFixed(2)} %` : "-";
    [f.file.name, a.counts.cells, a.counts.parasitized, pct(a.parasitemia_percent), interval, a.usable ? "" : a.reason].forEach((v) => {
      const td = document.createElement("td"); td.textContent = String(v); row.append(td);
    });
    return row;
  }));
}

async function analyzeFields(files) {
  for (const [i, file] of files.entries()) {
    status(`analysing field ${i + 1} of ${files.length}: ${file.name}`);
    try {
      const analysis = await post("/analyze_smear", fieldForm(file));
      const field = { file, url: URL.createObjectURL(file), analysis };
      state.fields.push(field);
      drawField(field, state.fields.length - 1);
      analysis.cells.forEach((cell, cellIndex) => {  // referred cells, and the server's random audit sample
        if (cell.review) enqueue({ kind: "field", field: state.fields.length - 1, cell: cellIndex }, cell.review);
      });
      await summariseSlide();
    } catch (error) {
      status(`${file.name}: ${error.message}`, true);
      return;
    }
  }
  status(`${files.length} field(s) analysed`);
}

// --- cell crops ------------------------------------------------------------------------------
async function classifyCrops(files) {
  $("#crops").hidden = false;
  const body = $("#crops tbody");
  for (let start = 0; start < files.length; start += CHUNK) {
    const chunk = files.slice(start, start + CHUNK);
    const form = new FormData();
    chunk.forEach((file) => form.append("images", file, file.name));
    status(`classifying crops ${start + 1}-${start + chunk.length} of ${files.length}`);
    let answers;
    try { answers = await post("/classify", form); } catch (error) { status(error.message, true); return; }
    answers.forEach((answer, i) => {
      const crop = { file: chunk[i], url: URL.createObjectURL(chunk[i]), answer };
      state.crops.push(crop);
      const index = state.crops.length - 1;
      const row = document.createElement("tr");
      row.className = "crop-row";
      [crop.file.name, answer.label, answer.probability_parasitized.toFixed(3), answer.decision].forEach((v) => {
        const td = document.createElement("td"); td.textContent = v; row.append(td);
      });
      const td = document.createElement("td"), button = document.createElement("button");
      button.type = "button"; button.textContent = "why?";
      button.addEventListener("click", () => openCell({ kind: "crop", crop: index }, row));
      td.append(button); row.append(td); body.append(row);
      if (answer.review) enqueue({ kind: "crop", crop: index }, answer.review);  // referred, or the audit sample
    });
  }
  status(`${files.length} crop(s) classified`);
}

// --- one cell: crop, heatmap, review ---------------------------------------------------------
function cellOf(ref) {
  if (ref.kind === "crop") {
    const crop = state.crops[ref.crop];
    return { file: crop.file, url: crop.url, answer: crop.answer, box: null, requestId: crop.answer.request_id };
  }
  const field = state.fields[ref.field];
  const cell = field.analysis.cells[ref.cell];
  return { file: field.file, url: field.url, answer: { ...cell, model_version: field.analysis.model_version }, box: cell.box, requestId: field.analysis.request_id };
}

function cellForm(ref) {
  const cell = cellOf(ref);
  const form = new FormData();
  form.append("image", cell.file, cell.file.name);
  if (cell.box) {
    form.append("box", cell.box.join(","));
    const diameter = $("#diameter").value;
    if (diameter) form.append("cell_diameter_px", diameter);
  }
  return form;
}

function drawCrop(canvas, ref) {
  const cell = cellOf(ref);
  const image = new Image();
  image.onload = () => {
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const [x, y, w, h] = cell.box || [0, 0, image.naturalWidth, image.naturalHeight];
    ctx.drawImage(image, x, y, w, h, 0, 0, canvas.width, canvas.height);
  };
  image.src = cell.url;
}

function drawHeatmap(canvas, heatmap) {
  const ctx = canvas.getContext("2d");
  const n = heatmap.length, cell = canvas.width / n;
  const peak = Math.max(1e-6, ...heatmap.flat().map(Math.abs));
  for (let y = 0; y < n; y++) {
    for (let x = 0; x < n; x++) {
      const v = heatmap[y][x] / peak; // red: the answer leans on it; blue: it argues against
      ctx.fillStyle = v >= 0 ? `rgba(255, 30, 30, ${v * 0.75})` : `rgba(30, 90, 255, ${-v * 0.75})`;
      ctx.fillRect(x * cell, y * cell, cell + 0.5, cell + 0.5);
    }
  }
}

async function openCell(ref, element) {
  document.querySelectorAll(".selected").forEach((el) => el.classList.remove("selected"));
  element.classList.add("selected");
  state.selected = ref;
  const cell = cellOf(ref);
  $("#cell-detail").hidden = false;
  $("#cell-answer").textContent = `${cell.answer.label}, P(parasitized) = ${cell.answer.probability_parasitized.toFixed(3)}, decision ${cell.answer.decision}`;
  drawCrop($("#cell-crop"), ref);
  const heat = $("#cell-heatmap");
  heat.getContext("2d").clearRect(0, 0, heat.width, heat.height);
  heat.dataset.ready = "false";
  drawCrop(heat, ref);
  try {
    const explanation = await post("/explain", cellForm(ref));
    setTimeout(() => { drawHeatmap(heat, explanation.heatmap); heat.dataset.ready = "true"; }, 50);
  } catch (error) {
    status(`explain: ${error.message}`, true);
  }
}

function enqueue(ref, reason) {
  const key = JSON.stringify(ref);
  if (state.queue.some((item) => item.key === key)) return;
  const item = { key, ref, reason };
  state.queue.push(item);
  const cell = cellOf(ref);
  const li = document.createElement("li");
  li.className = "review-item";
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 64;
  drawCrop(canvas, ref);
  const text = document.createElement("span");
  text.textContent = `${cell.file.name}${cell.box ? ` [${cell.box.join(", ")}]` : ""}: model says ${cell.answer.label} (P=${cell.answer.probability_parasitized.toFixed(3)}, ${reason})`;
  li.append(canvas, text);
  for (const label of ["Parasitized", "Uninfected", "unsure"]) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.label = label;
    button.addEventListener("click", () => submitReview(item, label, li));
    li.append(button);
  }
  $("#review-queue").append(li);
}

async function submitReview(item, label, li) {
  const reviewer = $("#reviewer").value.trim();
  if (!reviewer) { status("enter your name before labelling", true); $("#reviewer").focus(); return; }
  const cell = cellOf(item.ref);
  const form = cellForm(item.ref);
  form.append("label", label);
  form.append("reviewer", reviewer);
  form.append("reason", item.reason);
  form.append("request_id", cell.requestId || "");
  form.append("model_version", cell.answer.model_version || "");
  form.append("model_label", cell.answer.label);
  form.append("probability_parasitized", String(cell.answer.probability_parasitized));
  try {
    const stored = await post("/review", form);
    li.classList.add("done");
    li.dataset.reviewId = String(stored.id);
    li.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    li.append(document.createTextNode(` labelled ${label} (review ${stored.id})`));
    status(`review ${stored.id} stored`);
  } catch (error) {
    status(`review: ${error.message}`, true);
  }
}

// --- wiring ----------------------------------------------------------------------------------
async function analyze() {
  const files = Array.from($("#upload").files);
  if (!files.length) { status("choose one or more images first", true); return; }
  if ($("#mode").value === "field") await analyzeFields(files); else await classifyCrops(files);
}

async function showModel() {
  try {
    const info = await post("/model_info", new FormData());
    $("#model-version").textContent = `model ${info.registered_model || ""} v${info.mlflow_version || "?"}`;
  } catch (_) { /* a token may be needed first */ }
}

$("#token").value = sessionStorage.getItem("malaria-token") || "";
$("#token").addEventListener("change", (e) => { sessionStorage.setItem("malaria-token", e.target.value.trim()); showModel(); });
$("#reviewer").value = sessionStorage.getItem("malaria-reviewer") || "";
$("#reviewer").addEventListener("change", (e) => sessionStorage.setItem("malaria-reviewer", e.target.value.trim()));
$("#analyze").addEventListener("click", analyze);
$("#print").addEventListener("click", () => window.print());
$("#close-detail").addEventListener("click", () => { $("#cell-detail").hidden = true; });
$("#send-to-review").addEventListener("click", () => { if (state.selected) enqueue(state.selected, "clicked"); });
showModel();
