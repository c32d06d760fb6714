// On-device mode: the photo is analysed in this browser by onnxruntime-web (WebAssembly) and never leaves the device.
// Every threshold, rule, class name and sentence applied here comes from the server's /on-device/policy.json
// (lesionnet/app/ondevice.py, built from the objects the server answers with); the model file is the served checkpoint
// exported with its OOD gate (lesionnet/export.py). This file only computes what the server computes with OpenCV: the
// image check's statistics (lesionnet/inference/decision/image_check.py) and the eval resize and crop
// (lesionnet/data/transforms.py).
// The answer has the shape of the server's /api/v1/predict answer, so the page shows both alike.

const COEF_BITS = 11; // OpenCV's fixed-point resize: coefficients x 2048, rows and columns combined with 22 bits
const COEF_SCALE = 1 << COEF_BITS;

// Python's round(): halves to even (used for sizes, as the server computes them)
function roundHalfEven(x) {
  const f = Math.floor(x), d = x - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : (f % 2 === 0 ? f : f + 1);
}

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

// ---------------------------------------------------------------------------------------------------- decoding

// The file as upright RGB bytes (EXIF orientation applied, no colour management: as the server's Pillow decoder)
export async function decode(blob) {
  const bitmap = await createImageBitmap(blob, {
    imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  return { width, height, rgb };
}

// ---------------------------------------------------------------------------------------------------- resizing

// OpenCV's bicubic kernel (a = -0.75) at fraction x
function cubic(x) {
  const A = -0.75;
  const c0 = ((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A;
  const c1 = ((A + 2) * x - (A + 3)) * x * x + 1;
  const c2 = ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1;
  return [c0, c1, c2, 1 - c0 - c1 - c2];
}

// Source indices and fixed-point weights along one axis, as cv::resize computes them for INTER_LINEAR / INTER_CUBIC
function taps(srcLen, dstLen, mode) {
  const scale = srcLen / dstLen, size = mode === "bicubic" ? 4 : 2;
  const index = new Int32Array(dstLen * size), weight = new Float64Array(dstLen * size);
  for (let d = 0; d < dstLen; d++) {
    let f = Math.fround((d + 0.5) * scale - 0.5);
    let s = Math.floor(f);
    f = Math.fround(f - s);
    if (mode !== "bicubic") {
      if (s < 0) { f = 0; s = 0; }
      if (s >= srcLen - 1) { f = 0; s = srcLen - 1; }
    }
    const c = mode === "bicubic" ? cubic(f) : [1 - f, f];
    for (let k = 0; k < size; k++) {
      index[d * size + k] = clamp(s - size / 2 + 1 + k, 0, srcLen - 1);
      weight[d * size + k] = Math.round(c[k] * COEF_SCALE);
    }
  }
  return { index, weight, size };
}

// cv::resize's INTER_AREA weights along one axis (downscaling): each output cell averages the input cells it covers
function areaTaps(srcLen, dstLen) {
  const scale = srcLen / dstLen, rows = [];
  for (let d = 0; d < dstLen; d++) {
    const f1 = d * scale, f2 = f1 + scale, cell = Math.min(scale, srcLen - f1);
    const s2 = Math.min(Math.floor(f2), srcLen - 1), s1 = Math.min(Math.ceil(f1), s2);
    const row = [];
    if (s1 - f1 > 1e-3) row.push([s1 - 1, (s1 - f1) / cell]);
    for (let s = s1; s < s2; s++) row.push([s, 1 / cell]);
    if (f2 - s2 > 1e-3) row.push([s2, Math.min(Math.min(f2 - s2, 1), cell) / cell]);
    rows.push(row);
  }
  return rows;
}

function resizeArea(img, dw, dh) {
  const { width, height, rgb } = img, out = new Uint8Array(dw * dh * 3);
  const xs = areaTaps(width, dw), ys = areaTaps(height, dh);
  for (let y = 0; y < dh; y++) {
    for (let x = 0; x < dw; x++) {
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        for (const [sy, wy] of ys[y]) for (const [sx, wx] of xs[x]) sum += wy * wx * rgb[(sy * width + sx) * 3 + c];
        out[(y * dw + x) * 3 + c] = clamp(roundHalfEven(sum), 0, 255);
      }
    }
  }
  return { width: dw, height: dh, rgb: out };
}

// cv::resize(..., INTER_LINEAR | INTER_CUBIC) of 8-bit RGB, in OpenCV's fixed-point arithmetic
export function resize(img, dw, dh, mode) {
  const { width, height, rgb } = img;
  if (dw === width && dh === height) return img;
  if (mode === "area" || (mode === "bilinear" && width === 2 * dw && height === 2 * dh)) {
    return resizeArea(img, dw, dh); // OpenCV itself turns an exact 2x linear downscale into INTER_AREA
  }
  const tx = taps(width, dw, mode), ty = taps(height, dh, mode);
  const rows = new Float64Array(height * dw * 3); // each source row resized horizontally (computed once)
  const done = new Uint8Array(height);
  const out = new Uint8Array(dw * dh * 3);
  const rowOf = (sy) => {
    if (!done[sy]) {
      for (let x = 0; x < dw; x++) {
        for (let c = 0; c < 3; c++) {
          let sum = 0;
          for (let k = 0; k < tx.size; k++) sum += tx.weight[x * tx.size + k] * rgb[(sy * width + tx.index[x * tx.size + k]) * 3 + c];
          rows[(sy * dw + x) * 3 + c] = sum;
        }
      }
      done[sy] = 1;
    }
    return sy * dw * 3;
  };
  const half = 2 ** (2 * COEF_BITS - 1), unit = 2 ** (2 * COEF_BITS);
  for (let y = 0; y < dh; y++) {
    const starts = [], weights = [];
    for (let k = 0; k < ty.size; k++) { starts.push(rowOf(ty.index[y * ty.size + k])); weights.push(ty.weight[y * ty.size + k]); }
    for (let i = 0; i < dw * 3; i++) {
      let sum = 0;
      for (let k = 0; k < ty.size; k++) sum += weights[k] * rows[starts[k] + i];
      out[y * dw * 3 + i] = clamp(Math.floor((sum + half) / unit), 0, 255);
    }
  }
  return { width: dw, height: dh, rgb: out };
}

// ---------------------------------------------------------------------------------------------------- image check

function reflect101(i, n) {
  if (n === 1) return 0;
  if (i < 0) return -i;
  return i >= n ? 2 * n - 2 - i : i;
}

function neighbourCorr(grey, width, height, dx, dy) {
  const pairs = [];
  for (let y = 0; y + dy < height; y++) for (let x = 0; x + dx < width; x++) {
    pairs.push([grey[y * width + x], grey[(y + dy) * width + x + dx]]);
  }
  if (!pairs.length) return 1;
  const ma = pairs.reduce((s, p) => s + p[0], 0) / pairs.length, mb = pairs.reduce((s, p) => s + p[1], 0) / pairs.length;
  let ab = 0, aa = 0, bb = 0;
  for (const [a, b] of pairs) { ab += (a - ma) * (b - mb); aa += (a - ma) ** 2; bb += (b - mb) ** 2; }
  const denom = Math.sqrt(aa * bb);
  return denom > 0 ? ab / denom : 1;
}

// The statistics of lesionnet.inference.decision.image_check.image_stats, with its parameters from the policy
export function imageStats(img, params) {
  const scale = Math.min(1, params.max_side / Math.max(img.width, img.height));
  const small = resize(img, Math.max(1, roundHalfEven(img.width * scale)), Math.max(1, roundHalfEven(img.height * scale)), "area");
  const { width, height, rgb } = small, n = width * height;
  const grey = new Float64Array(n);
  const sdiv = (v) => (v === 0 ? 0 : roundHalfEven((255 << 12) / v));
  let blank = 0, saturation = 0;
  for (let i = 0; i < n; i++) {
    const r = rgb[3 * i], g = rgb[3 * i + 1], b = rgb[3 * i + 2];
    grey[i] = (r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14; // cv::cvtColor RGB2GRAY, 8-bit
    const max = Math.max(r, g, b), min = Math.min(r, g, b);
    if (max < params.blank_dark || min > params.blank_bright) blank++;
    saturation += ((max - min) * sdiv(max) + (1 << 11)) >> 12; // cv::cvtColor RGB2HSV's S, 8-bit
  }
  const mean = grey.reduce((s, v) => s + v, 0) / n;
  const std = Math.sqrt(grey.reduce((s, v) => s + (v - mean) ** 2, 0) / n);
  let flat = 0;
  const at = (x, y) => grey[reflect101(y, height) * width + reflect101(x, width)];
  for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) { // cv::Sobel 3x3, BORDER_REFLECT_101
    const gx = at(x + 1, y - 1) - at(x - 1, y - 1) + 2 * (at(x + 1, y) - at(x - 1, y)) + at(x + 1, y + 1) - at(x - 1, y + 1);
    const gy = at(x - 1, y + 1) - at(x - 1, y - 1) + 2 * (at(x, y + 1) - at(x, y - 1)) + at(x + 1, y + 1) - at(x + 1, y - 1);
    if (Math.hypot(gx, gy) < params.flat_gradient) flat++;
  }
  return {
    contrast: std,
    brightness: mean,
    blank_fraction: blank / n,
    smoothness: Math.min(neighbourCorr(grey, width, height, 1, 0), neighbourCorr(grey, width, height, 0, 1)),
    flat_edges: (flat / n) * std,
    saturation: saturation / n / 255,
  };
}

const round = (x, digits) => Math.round(x * 10 ** digits) / 10 ** digits;

export function checkImage(img, spec) {
  const stats = imageStats(img, spec.params);
  const reasons = spec.rules.filter((r) => (r.op === "<" ? stats[r.stat] < spec.thresholds[r.threshold]
    : stats[r.stat] > spec.thresholds[r.threshold])).map((r) => r.reason);
  return { passed: reasons.length === 0, reasons,
           stats: Object.fromEntries(Object.entries(stats).map(([k, v]) => [k, round(v, 4)])) };
}

// ---------------------------------------------------------------------------------------------------- model input

// build_eval_transform: resize (shorter side to floor(size / crop_pct), or both sides when not square), centre crop,
// normalise; returns the NCHW tensor data and the crop inside the photo as fractions (for the heatmap)
export function preprocess(img, pre) {
  const [, h, w] = pre.input_size;
  let nh, nw;
  if (h === w) {
    const scale = Math.floor(h / pre.crop_pct) / Math.min(img.width, img.height);
    nh = Math.max(1, roundHalfEven(img.height * scale));
    nw = Math.max(1, roundHalfEven(img.width * scale));
  } else {
    nh = Math.floor(h / pre.crop_pct);
    nw = Math.floor(w / pre.crop_pct);
  }
  const resized = resize(img, nw, nh, pre.interpolation);
  const top = Math.floor((nh - h) / 2), left = Math.floor((nw - w) / 2);
  const data = new Float32Array(3 * h * w);
  for (let c = 0; c < 3; c++) {
    const offset = pre.mean[c] * 255, divisor = pre.std[c] * 255;
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
      data[(c * h + y) * w + x] = (resized.rgb[((y + top) * nw + x + left) * 3 + c] - offset) / divisor;
    }
  }
  const cropBox = [left / nw, top / nh, (left + w) / nw, (top + h) / nh];
  return { data, dims: [1, 3, h, w], cropBox };
}

// ---------------------------------------------------------------------------------------------------- the answer

// ReferralPolicy.calibrate: the shown percentages, softmax(scale * log p + bias) per class, else softmax(log p / T)
function calibrate(probs, r) {
  const logits = probs.map((p, k) => {
    const logP = Math.log(clamp(p, 1e-12, 1));
    return r.display_scale ? logP * r.display_scale[k] + r.display_bias[k] : logP / r.temperature;
  });
  const top = Math.max(...logits);
  const z = logits.map((l) => Math.exp(l - top));
  const total = z.reduce((s, v) => s + v, 0);
  return z.map((v) => v / total);
}

// ReferralPolicy.assess
function assess(probs, policy) {
  const r = policy.referral, codes = policy.classes.map((c) => c.code);
  const pMel = codes.includes("mel") ? probs[codes.indexOf("mel")] : 0;
  const pMalignant = codes.reduce((s, c, k) => s + (r.malignant_classes.includes(c) ? probs[k] : 0), 0);
  const reasons = [];
  if (r.melanoma_threshold !== null && pMel >= r.melanoma_threshold) reasons.push(r.reasons.melanoma.replace("{p}", pMel.toFixed(2)));
  if (pMalignant >= r.malignant_threshold) reasons.push(r.reasons.malignant.replace("{p}", pMalignant.toFixed(2)));
  return { refer: reasons.length > 0, reasons, melanoma_probability: pMel, malignant_probability: pMalignant,
           melanoma_threshold: r.melanoma_threshold, malignant_threshold: r.malignant_threshold, threshold_source: r.source };
}

// LesionService.analyse, from the image check and the graph's outputs for one image
export function answer(policy, check, out, cropBox) {
  const M = policy.messages;
  const base = { model_version: policy.model_version, demo_model: policy.demo_model, disclaimer: policy.disclaimer,
                 image_check: check, on_device: true };
  const rejected = { ...base, status: "rejected", message: M.rejected, top_class: null, probabilities: [],
    urgency: { refer: null, reasons: [], level: "unknown", message: M.rejected }, referral_check: policy.referral_check,
    confidence: null, heatmap: null, image_type: null, familiarity: null };
  if (!check.passed) return rejected;
  let imageType = null; // question 1: is this a dermatoscope image? (the only refusal by the model)
  if (policy.image_type) {
    const t = policy.image_type;
    imageType = { dermoscopy: !(out.imageTypeScore < t.threshold), score: round(out.imageTypeScore, 4),
                  threshold: round(t.threshold, 4), source: t.source };
    if (!imageType.dermoscopy) {
      return { ...rejected, message: M.not_dermoscopy, image_type: imageType,
               urgency: { ...rejected.urgency, message: M.not_dermoscopy, reasons: [M.not_dermoscopy_reason] } };
    }
  }
  let familiarity = null; // question 2: is the lesion like the ones the model learnt? (flags, never refuses)
  if (policy.familiarity) {
    const f = policy.familiarity, scores = f.validation_scores;
    familiarity = { familiar: !(out.oodScore > f.threshold), method: f.method, score: round(out.oodScore, 4),
                    threshold: round(f.threshold, 4),
                    percentile: round(scores.filter((s) => s <= out.oodScore).length / scores.length, 4),
                    source: f.source };
  }
  const unfamiliar = familiarity !== null && !familiarity.familiar;
  const probs = out.probs;
  const gate = policy.confidence;
  const score = gate.method === "energy" ? out.negEnergy : Math.max(...probs);
  const unconfident = score < gate.threshold;
  const urgency = assess(probs, policy);
  const shown = calibrate(probs, policy.referral);
  const classes = policy.classes.map((c, k) => ({ ...c, probability: round(shown[k], 4) }))
    .sort((a, b) => b.probability - a.probability);
  const topIndex = probs.indexOf(Math.max(...probs)); // the decision: the model's scores, not the shown percentages
  const decided = classes.find((c) => c.code === policy.classes[topIndex].code);
  const named = decided.probability >= classes[0].probability ? M.most_likely : M.decided;
  const heatmap = policy.heatmap && out.camGrid ? {
    method: "cam", grid: out.camGrid.map((row) => row.map((v) => round(v, 3))), crop_box: cropBox,
    class_code: policy.classes[topIndex].code, layer: "forward_features" } : null;
  const reasons = [...urgency.reasons]; // an unfamiliar lesion and an unsure answer go to a doctor too
  if (unfamiliar) reasons.push(M.unfamiliar_reason);
  if (unconfident) reasons.push(M.unsure_reason.replace("{score}", score.toFixed(2)));
  const unsure = unfamiliar || unconfident;
  const message = unfamiliar ? M.unfamiliar : unconfident ? M.unsure : named.replace("{name}", decided.name);
  return {
    ...base,
    status: unsure ? "unsure" : "ok",
    message,
    top_class: unsure ? null : decided,
    probabilities: classes,
    urgency: { ...urgency, refer: reasons.length > 0, reasons,
               level: reasons.length > 0 ? "see_dermatologist" : "routine",
               message: urgency.refer ? M.refer : unsure ? message : M.routine },
    referral_check: policy.referral_check,
    confidence: { method: gate.method, score: round(score, 4), threshold: round(gate.threshold, 4),
                  threshold_source: gate.source },
    heatmap,
    image_type: imageType,
    familiarity,
  };
}

// ---------------------------------------------------------------------------------------------------- the model

// The service worker controls the page shortly after its first start: wait for it (at most 3 s), so that the runtime
// and the model are fetched through it and kept for offline use
async function serviceWorkerInControl() {
  if (!("serviceWorker" in navigator) || navigator.serviceWorker.controller) return;
  const controlled = new Promise((resolve) => navigator.serviceWorker.addEventListener("controllerchange", resolve));
  await Promise.race([navigator.serviceWorker.ready.then(() => controlled), new Promise((r) => setTimeout(r, 3000))]);
}

// The runtime, the policy and the model, loaded once (from the service worker's cache when offline)
export async function load(policyUrl = "/on-device/policy.json") {
  await serviceWorkerInControl();
  const policy = await (await fetch(policyUrl)).json();
  if (!policy.available) throw new Error(policy.reason);
  const ort = await import(policy.runtime.module);
  ort.env.logLevel = "error";
  ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one thread works everywhere
  ort.env.wasm.wasmPaths = { wasm: policy.runtime.wasm };
  const session = await ort.InferenceSession.create(policy.model_url, { executionProviders: ["wasm"] });

  // The graph's outputs for a preprocessed NCHW batch (what the parity test feeds directly)
  async function run(data, dims) {
    const outputs = await session.run({ image: new ort.Tensor("float32", data, dims) });
    const n = dims[0], k = policy.classes.length;
    const rows = (name, width) => Array.from({ length: n }, (_, i) => Array.from(outputs[name].data.slice(i * width, (i + 1) * width)));
    const result = { probs: rows("probs", k), negEnergy: Array.from(outputs.neg_energy.data) };
    if (outputs.ood_score) result.oodScore = Array.from(outputs.ood_score.data);
    if (outputs.image_type_score) result.imageTypeScore = Array.from(outputs.image_type_score.data);
    if (outputs.cam_grid) {
      const [, gh, gw] = outputs.cam_grid.dims;
      result.camGrid = rows("cam_grid", gh * gw).map((flat) => Array.from({ length: gh }, (_, y) => flat.slice(y * gw, (y + 1) * gw)));
    }
    return result;
  }

  // One photo (a File or Blob) to the answer the server would give, without sending it anywhere
  async function analyse(blob) {
    const img = await decode(blob);
    const { min_side: minSide, max_pixels: maxPixels } = policy.limits;
    if (Math.min(img.width, img.height) < minSide) {
      throw new Error(`The image is too small (${img.width}x${img.height}); it needs at least ${minSide} pixels on each side.`);
    }
    if (img.width * img.height > maxPixels) throw new Error("The image has too many pixels; resize it and try again.");
    const check = checkImage(img, policy.image_check);
    if (!check.passed) return answer(policy, check, null, null);
    const x = preprocess(img, policy.preprocessing);
    const out = await run(x.data, x.dims);
    const one = { probs: out.probs[0], negEnergy: out.negEnergy[0], oodScore: out.oodScore && out.oodScore[0],
                  imageTypeScore: out.imageTypeScore && out.imageTypeScore[0],
                  camGrid: out.camGrid && out.camGrid[0] };
    return answer(policy, check, one, x.cropBox);
  }

  return { policy, run, analyse, decode, preprocess, checkImage };
}
