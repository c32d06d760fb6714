// LesionNet page: pick or take a photo, send it to /api/v1/predict, show the answer. No external code.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_BYTES = 10 * 1024 * 1024;
let selected = null;
let previewUrl = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function choose(file) {
  if (!file) return;
  if (!["image/jpeg", "image/png", "image/webp"].includes(file.type)) {
    setStatus("Please choose a JPEG, PNG or WebP photo. (HEIC photos: set the camera to 'Most compatible'.)", true);
    return;
  }
  if (file.size > MAX_BYTES) { setStatus("The photo is larger than 10 MB.", true); return; }
  selected = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview-name").textContent = file.name;
  $("preview-box").hidden = false;
  $("submit").disabled = false;
  $("result").hidden = true;
  setStatus("Photo ready. Press 'Check the photo'.");
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function showResult(body) {
  const urgency = body.urgency || {};
  $("urgency").className = "urgency " + (urgency.level || "unknown");
  $("urgency").textContent = urgency.message || body.message;
  $("message").textContent = body.status === "ok" ? body.message : "";
  const reasons = $("reasons");
  reasons.replaceChildren(...[...(urgency.reasons || []), ...((body.image_check || {}).reasons || [])]
    .map((r) => el("li", r)));
  const bars = $("bars");
  const top = (body.probabilities || []).slice(0, 3);
  bars.replaceChildren(...top.map((c) => {
    const pct = Math.round(c.probability * 100);
    const item = el("li");
    item.append(el("strong", `${c.name}: ${pct}%`), el("div", c.description, "small"));
    const bar = el("div", undefined, "bar" + (c.malignant ? " malignant" : ""));
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${c.name} ${pct} percent`);
    const fill = el("span");
    fill.style.width = pct + "%";
    bar.append(fill);
    item.append(bar);
    return item;
  }));
  $("bars-title").hidden = top.length === 0;
  if (body.gradcam) {
    $("cam").src = "data:image/png;base64," + body.gradcam.overlay_png;
    $("cam-box").hidden = false;
  } else {
    $("cam-box").hidden = true;
  }
  $("version").textContent = "Model " + body.model_version + ". " + body.disclaimer;
  $("result").hidden = false;
  $("result").focus();
}

async function submit(event) {
  event.preventDefault();
  if (!selected) return;
  const form = new FormData();
  form.append("file", selected, selected.name);
  $("submit").disabled = true;
  setStatus("Checking the photo...");
  try {
    const response = await fetch("/api/v1/predict", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      setStatus((body.error && body.error.message) || "The server could not answer.", true);
      return;
    }
    setStatus("");
    showResult(body);
  } catch (err) {
    setStatus("No connection to the server. Check your network and try again.", true);
  } finally {
    $("submit").disabled = false;
  }
}

async function loadCard() {
  try {
    const card = await (await fetch("/api/v1/model")).json();
    const box = $("card");
    const m = card.metrics;
    const perf = m ? `Accuracy ${(m.accuracy * 100).toFixed(1)}%` +
      (m.accuracy_ci95 ? ` (95% CI ${(m.accuracy_ci95[0] * 100).toFixed(1)}-${(m.accuracy_ci95[1] * 100).toFixed(1)}%)` : "") +
      `, balanced accuracy ${(m.balanced_accuracy * 100).toFixed(1)}% on ${m.n_images} images (${m.evaluated_on}).`
      : card.metrics_note;
    const limits = el("ul");
    limits.append(...card.limitations.map((l) => el("li", l)));
    box.replaceChildren(el("p", card.intended_use), el("p", card.training_data), el("p", perf),
                        el("h3", "Limitations"), limits);
  } catch (err) {
    $("card").textContent = "Model information is not available.";
  }
}

$("camera").addEventListener("change", (e) => choose(e.target.files[0]));
$("file").addEventListener("change", (e) => choose(e.target.files[0]));
$("form").addEventListener("submit", submit);
loadCard();
if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});
