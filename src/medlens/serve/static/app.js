// The medlens page: upload an image, show the findings as bars and the heatmaps over the image.
// No build step, no dependencies. The token lives in this page's memory only, never in storage.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  token: "",
  model: null,
  file: null,
  previewUrl: null,
  heatmaps: new Map(), // label -> heatmap from /predict
  shown: null, // label of the heatmap on screen, or null for the original
};

async function call(path, options = {}, read = (response) => response.json()) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new Error(`the server cannot be reached (${err.message})`);
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const detail = body && body.detail ? body.detail : `HTTP ${response.status}`;
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return read(response);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

async function loadModel() {
  try {
    state.model = await call("/model");
    const m = state.model;
    $("model-name").textContent = `${m.card.name} · ${m.task} · ${m.labels.length} labels`;
    $("drop-text").textContent =
      m.inputs === "face-photo"
        ? "Choose or drop a photo of a face (PNG or JPEG)"
        : "Choose or drop a chest X-ray (PNG, JPEG or DICOM)";
    showError("");
  } catch (err) {
    state.model = null;
    $("model-name").textContent = "";
    const hint = err.status === 401 ? " Enter the server's token above." : "";
    showError(`The model cannot be described: ${err.message}.${hint}`);
  }
}

function choose(file) {
  if (!file) return;
  state.file = file;
  state.heatmaps = new Map();
  state.shown = null;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  const isDicom = /\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom";
  state.previewUrl = isDicom ? null : URL.createObjectURL(file);
  $("preview").src = state.previewUrl || "";
  $("results").hidden = true;
  $("ood").hidden = true;
  $("report-actions").hidden = true;
  showView();
  predict([]);
}

async function downloadReport() {
  const file = state.file;
  const form = new FormData();
  form.append("file", file);
  $("download-report").disabled = true;
  setStatus("Writing the report…");
  showError("");
  try {
    const blob = await call("/report", { method: "POST", body: form }, (response) => response.blob());
    const link = item("a", "");
    link.href = URL.createObjectURL(blob);
    link.download = `${file.name.replace(/\.[^.]*$/, "")}-report.html`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
    setStatus("");
  } catch (err) {
    setStatus("");
    const hint = err.status === 401 ? " Enter the server's token above." : "";
    showError(`The report could not be written: ${err.message}.${hint}`);
  } finally {
    $("download-report").disabled = false;
  }
}

async function predict(explain) {
  const file = state.file;
  const limit = state.model && state.model.limits.max_upload_bytes;
  if (limit && file.size > limit) {
    showError(`The file is ${file.size.toLocaleString()} bytes, over the server's limit of ${limit.toLocaleString()}.`);
    return;
  }
  const query = new URLSearchParams({ cam: "true" });
  if (explain.length) query.set("labels", explain.join(","));
  const form = new FormData();
  form.append("file", file);
  setStatus(explain.length ? `Drawing the heatmap of ${explain.join(", ")}…` : "Analysing…");
  showError("");
  try {
    const result = await call(`/predict?${query}`, { method: "POST", body: form });
    if (file !== state.file) return; // another image was chosen meanwhile
    render(result);
    setStatus("");
  } catch (err) {
    setStatus("");
    const hint = err.status === 401 ? " Enter the server's token above." : "";
    showError(`The server could not analyse this file: ${err.message}.${hint}`);
  }
}

function render(result) {
  for (const heatmap of result.heatmaps) state.heatmaps.set(heatmap.label, heatmap);
  if (result.heatmaps.length) state.shown = result.heatmaps[0].label;
  const flagged = Boolean(result.ood && result.ood.flag);
  $("report-actions").hidden = false;
  $("ood").hidden = !flagged;
  $("results").hidden = flagged;
  $("ood-reasons").replaceChildren(...(flagged ? result.ood.reasons : []).map((reason) => item("li", reason)));
  if (flagged) state.shown = null;
  renderFindings(result);
  renderDicom(result.image.dicom);
  const t = result.timings_ms;
  $("timings").textContent =
    `${result.image.format.toUpperCase()} ${result.image.width}×${result.image.height} · ` +
    `read ${t.read.toFixed(0)} ms, model ${t.forward.toFixed(0)} ms, heatmaps ${t.cam.toFixed(0)} ms, ` +
    `total ${t.total.toFixed(0)} ms`;
  showView();
}

function renderFindings(result) {
  const multiclass = result.task !== "multilabel";
  const rows = multiclass ? result.top_k : result.findings;
  $("findings-title").textContent = multiclass
    ? `Most probable ${rows.length} of ${result.findings.length} classes`
    : "Findings";
  $("findings-help").textContent = multiclass
    ? "Click a bar to see its heatmap."
    : "Sorted by probability; the black mark is each finding's threshold, bold ones are over it. " +
      "Click a bar to see its heatmap.";
  $("findings").replaceChildren(...rows.map((finding) => bar(finding, !multiclass)));
}

function bar(finding, withThreshold) {
  const row = item("li", "");
  row.className = "bar";
  row.classList.toggle("positive", finding.positive);
  row.classList.toggle("explained", state.heatmaps.has(finding.label));
  row.dataset.label = finding.label;
  const label = item("span", finding.label);
  label.className = "label";
  label.title = finding.label;
  const track = item("span", "");
  track.className = "track";
  track.title = withThreshold
    ? `p = ${finding.probability.toFixed(3)}, threshold ${finding.threshold.toFixed(3)}`
    : `p = ${finding.probability.toFixed(3)}`;
  const fill = item("span", "");
  fill.className = "fill";
  fill.style.width = `${(100 * finding.probability).toFixed(1)}%`;
  track.append(fill);
  if (withThreshold) {
    const mark = item("span", "");
    mark.className = "threshold";
    mark.style.left = `calc(${(100 * finding.threshold).toFixed(1)}% - 1px)`;
    track.append(mark);
  }
  track.addEventListener("click", () => explainFinding(finding.label));
  const value = item("span", `${(100 * finding.probability).toFixed(1)}%`);
  value.className = "value";
  row.append(label, track, value);
  return row;
}

function explainFinding(label) {
  if (state.heatmaps.has(label)) {
    state.shown = label;
    showView();
  } else {
    predict([label]);
  }
}

function renderDicom(fields) {
  $("dicom").hidden = !fields;
  const rows = Object.entries(fields || {}).map(([key, value]) => {
    const tr = item("tr", "");
    tr.append(item("td", key), item("td", Array.isArray(value) ? value.join(" \\ ") : String(value)));
    return tr;
  });
  $("dicom-fields").replaceChildren(...rows);
}

function showView() {
  const heatmap = state.shown && state.heatmaps.get(state.shown);
  $("viewer").hidden = !heatmap && !state.previewUrl;
  $("heatmap").hidden = !heatmap;
  $("preview").hidden = Boolean(heatmap) || !state.previewUrl;
  if (heatmap) $("heatmap").src = `data:image/png;base64,${heatmap.png_base64}`;
  // The jet scale of the CAM overlays; occlusion maps (face models) draw their own chart.
  $("legend").hidden = !heatmap || heatmap.method === "occlusion";
  $("view-caption").textContent = heatmap ? `${heatmap.method} heatmap:` : "The image as uploaded.";
  const buttons = [...state.heatmaps.keys()].map((label) => choiceButton(label, label === state.shown));
  if (state.heatmaps.size && state.previewUrl) buttons.push(choiceButton("original", !heatmap, null));
  $("heatmap-choice").replaceChildren(...buttons);
  for (const row of document.querySelectorAll(".bar")) {
    row.classList.toggle("explained", state.heatmaps.has(row.dataset.label));
  }
}

function choiceButton(text, pressed, label = text) {
  const button = item("button", text);
  button.type = "button";
  button.setAttribute("aria-pressed", String(pressed));
  button.addEventListener("click", () => {
    state.shown = label;
    showView();
  });
  return button;
}

function item(tag, text) {
  const element = document.createElement(tag);
  element.textContent = text;
  return element;
}

$("file").addEventListener("change", (event) => choose(event.target.files[0]));
$("download-report").addEventListener("click", downloadReport);
$("preview").addEventListener("error", () => {
  // Not displayable here (DICOM, or not an image at all): show nothing rather than a broken image.
  if (!state.previewUrl) return;
  URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  showView();
});
$("token-form").addEventListener("submit", (event) => event.preventDefault());
$("token").addEventListener("change", (event) => {
  state.token = event.target.value.trim();
  loadModel();
});
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  choose(event.dataTransfer.files[0]);
});
loadModel();
