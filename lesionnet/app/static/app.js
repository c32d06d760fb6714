// LesionNet page: pick or take a photo, send it to /api/v1/predict (or analyse it on the device), show the answer.
// No external code.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_BYTES = 10 * 1024 * 1024;
const HEADER_BYTES = 1024 * 1024; // read for the image size: a JPEG's EXIF and colour profile come before its size
let maxPixels = 40000000; // the server's limits.max_pixels, from /on-device/policy.json once it has loaded
let selected = null;
let previewUrl = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// Width and height from the first bytes of a PNG (IHDR), JPEG (the start-of-frame segment) or WebP (VP8X, VP8L or
// VP8) file, read from its header without decoding any pixel; null when the bytes are none of these or cut short.
function imageSize(b) {
  const n = b.length;
  const be16 = (i) => (b[i] << 8) | b[i + 1];
  const be32 = (i) => be16(i) * 65536 + be16(i + 2);
  const le24 = (i) => b[i] | (b[i + 1] << 8) | (b[i + 2] << 16);
  const text = (i, length) => String.fromCharCode(...b.subarray(i, i + length));
  if (n >= 24 && be32(0) === 0x89504e47 && text(12, 4) === "IHDR") return { width: be32(16), height: be32(20) };
  if (n >= 4 && b[0] === 0xff && b[1] === 0xd8) {
    for (let i = 2; i + 9 < n;) {
      if (b[i] !== 0xff) return null;
      const marker = b[i + 1];
      if (marker === 0xff) { i += 1; continue; } // fill byte
      if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd8)) { i += 2; continue; } // markers without a length
      if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return { width: be16(i + 7), height: be16(i + 5) }; // SOF0-SOF15 but DHT, JPG and DAC
      }
      if (marker === 0xd9 || marker === 0xda) return null; // the end, or a scan, before any frame header
      i += 2 + be16(i + 2);
    }
    return null;
  }
  if (n >= 30 && text(0, 4) === "RIFF" && text(8, 4) === "WEBP") {
    const chunk = text(12, 4);
    if (chunk === "VP8X") return { width: le24(24) + 1, height: le24(27) + 1 };
    if (chunk === "VP8L" && b[20] === 0x2f) {
      const bits = le24(21) + b[24] * 16777216;
      return { width: (bits & 0x3fff) + 1, height: Math.floor(bits / 16384) % 16384 + 1 };
    }
    if (chunk === "VP8 " && b[23] === 0x9d && b[24] === 0x01 && b[25] === 0x2a) {
      return { width: (b[26] | (b[27] << 8)) & 0x3fff, height: (b[28] | (b[29] << 8)) & 0x3fff };
    }
  }
  return null;
}

function refuse(text) {
  selected = null;
  $("preview-box").hidden = true;
  $("submit").disabled = true;
  setStatus(text, true);
}

// A picked photo: its type, bytes and pixel count are checked before anything decodes it (a 20000 x 20000 PNG takes
// seconds to decode, and the preview would), with the server's messages.
async function choose(file) {
  if (!file) return;
  if (!["image/jpeg", "image/png", "image/webp"].includes(file.type)) {
    refuse("Please choose a JPEG, PNG or WebP photo. (HEIC photos: set the camera to 'Most compatible'.)");
    return;
  }
  if (file.size > MAX_BYTES) { refuse("The photo is larger than 10 MB."); return; }
  const size = imageSize(new Uint8Array(await file.slice(0, HEADER_BYTES).arrayBuffer()));
  if (size && size.width * size.height > maxPixels) {
    refuse(`The image has more than ${maxPixels.toLocaleString("en-US")} pixels; resize it and try again.`);
    return;
  }
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

// The demo banner: shown when the model card or an answer says the model was trained on the small sample only
function showDemo(isDemo, notice) {
  if (!isDemo) return;
  if (notice) $("demo-banner").textContent = notice;
  $("demo-banner").hidden = false;
}

function showResult(body) {
  const urgency = body.urgency || {};
  $("urgency").className = "urgency " + (urgency.level || "unknown");
  $("urgency").textContent = urgency.message || body.message;
  // Whether the "see a dermatologist" rule was checked on held-out images (not shown for a refused photo)
  const check = body.status !== "rejected" && body.referral_check ? body.referral_check.message : "";
  $("referral-check").textContent = check;
  $("referral-check").hidden = !check;
  showDemo(body.demo_model);
  // The app's two questions, each answered on its own: is this a dermatoscope image? is the lesion familiar?
  const answers = [];
  if (body.image_type) answers.push(`Dermatoscope image: ${body.image_type.dermoscopy ? "yes" : "no"}.`);
  if (body.familiarity) {
    answers.push(`Like the lesions the model learnt from: ${body.familiarity.familiar ? "yes" : "no, so it is sent to a doctor"}.`);
  }
  $("questions").textContent = answers.join(" ");
  $("questions").hidden = answers.length === 0;
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
  $("cam-box").hidden = !body.heatmap;
  if (body.heatmap) drawHeatmap(body.heatmap).catch(() => { $("cam-box").hidden = true; });
  $("version").textContent = "Model " + body.model_version + ". " + body.disclaimer;
  $("result").hidden = false;
  $("result").focus();
}

// Jet colour of v in [0, 1] (as matplotlib/OpenCV draw heatmaps), as [r, g, b].
function jet(v) {
  const channel = (offset) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - offset))));
  return [channel(3), channel(2), channel(1)];
}

// The model's view of the photo (the crop it saw) with the server's small heatmap grid coloured, smoothed and laid
// over it: the server sends a few hundred numbers instead of encoding images for every request.
async function drawHeatmap(heatmap) {
  const photo = await createImageBitmap(selected, { imageOrientation: "from-image" }); // upright, as the server sees it
  const [left, top, right, bottom] = heatmap.crop_box;
  const sx = left * photo.width, sy = top * photo.height;
  const sw = (right - left) * photo.width, sh = (bottom - top) * photo.height;
  const scale = 256 / Math.max(sw, sh);
  const canvas = $("cam");
  canvas.width = Math.max(1, Math.round(sw * scale));
  canvas.height = Math.max(1, Math.round(sh * scale));
  const context = canvas.getContext("2d");
  context.drawImage(photo, sx, sy, sw, sh, 0, 0, canvas.width, canvas.height);
  photo.close();
  const rows = heatmap.grid.length, columns = heatmap.grid[0].length;
  const cells = new ImageData(columns, rows);
  heatmap.grid.forEach((row, y) => row.forEach((v, x) => {
    cells.data.set([...jet(v), Math.round(200 * v)], 4 * (y * columns + x));
  }));
  const small = document.createElement("canvas");
  small.width = columns;
  small.height = rows;
  small.getContext("2d").putImageData(cells, 0, 0);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(small, 0, 0, canvas.width, canvas.height);
}

// On-device mode (static/ondevice.js): the model runs in this browser and the photo is not sent. Offered when the
// server's /on-device/policy.json says it can be (else the reason is shown); the choice is remembered, so an
// offline visit (page, policy, runtime and model from the service worker's cache) analyses on the device at once.
const ON_DEVICE_KEY = "lesionnet-on-device";
let onDevice = null; // the loaded runtime and model (a promise)

function loadOnDevice() {
  if (!onDevice) {
    onDevice = import("/static/ondevice.js").then((m) => m.load());
    onDevice.catch(() => { onDevice = null; });
  }
  return onDevice;
}

async function setOnDevice(on) {
  const note = $("on-device-note");
  localStorage.setItem(ON_DEVICE_KEY, on ? "1" : "0");
  if (!on) { note.textContent = "The photo is sent to this server to be analysed."; return; }
  note.textContent = "Loading the model into this browser (once; afterwards it also works offline)...";
  try {
    await loadOnDevice();
    note.textContent = "The photo is analysed on this device and never leaves it.";
  } catch (err) {
    $("on-device").checked = false;
    note.textContent = "Analysing on this device failed: " + err.message + " The photo will be sent to the server.";
  }
}

async function initOnDevice() {
  const box = $("on-device"), note = $("on-device-note");
  try {
    const policy = await (await fetch("/on-device/policy.json")).json(); // the service worker's copy when offline
    if (policy.limits && policy.limits.max_pixels) maxPixels = policy.limits.max_pixels;
    showDemo(policy.demo_model); // also offline, before any analysis
    if (!policy.available) { note.textContent = policy.reason + " The photo is sent to this server to be analysed."; return; }
  } catch (err) {
    note.textContent = "Analysing on this device is not available (no connection and nothing cached yet).";
    return;
  }
  box.disabled = false;
  box.checked = localStorage.getItem(ON_DEVICE_KEY) === "1";
  box.addEventListener("change", () => setOnDevice(box.checked));
  await setOnDevice(box.checked);
}

async function submitOnDevice() {
  setStatus("Analysing on this device...");
  try {
    const body = await (await loadOnDevice()).analyse(selected);
    setStatus("");
    showResult(body);
  } catch (err) {
    setStatus(err.message || "The analysis on this device failed.", true);
  } finally {
    $("submit").disabled = false;
  }
}

async function submit(event) {
  event.preventDefault();
  if (!selected) return;
  if ($("on-device").checked) { $("submit").disabled = true; await submitOnDevice(); return; }
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

// The model card; the last one shown is kept in this browser (it holds nothing personal), so that offline (the
// on-device mode) the card and the demo banner still show at once instead of after the first analysis.
const CARD_KEY = "lesionnet-model-card";

function showCard(card, note) {
  const training = card.training_data;
  const limits = el("ul");
  limits.append(...card.limitations.map((l) => el("li", l)));
  // Every sentence is written by the server (lesionnet/app/content.py) from the run and its evaluation
  $("card").replaceChildren(
    ...(note ? [el("p", note, "small")] : []),
    el("p", card.intended_use),
    el("h3", "What it was trained on"), el("p", training.summary), el("p", training.dataset, "small"),
    el("h3", "How well it did"), el("p", card.performance), el("p", card.referral_check.message),
    el("h3", "Limitations"), limits);
  showDemo(training.demo_model, training.demo_notice);
}

async function loadCard() {
  let card;
  try {
    card = await (await fetch("/api/v1/model")).json();
    showCard(card);
  } catch (err) {
    try {
      const note = "No connection: this is the model card from your last visit.";
      showCard(JSON.parse(localStorage.getItem(CARD_KEY)), note);
    } catch (stored) {
      $("card").textContent = "Model information is not available.";
    }
    return;
  }
  try { localStorage.setItem(CARD_KEY, JSON.stringify(card)); } catch (full) { /* storage full or off: not kept */ }
}

for (const picker of ["camera", "file"]) {
  $(picker).addEventListener("change", (e) => {
    choose(e.target.files[0]).catch(() => refuse("The photo could not be read; choose it again."));
  });
}
$("form").addEventListener("submit", submit);
loadCard();
initOnDevice();
if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});
