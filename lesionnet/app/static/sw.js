// Service worker: caches the app shell so the page opens (and can be installed) offline, and the on-device mode's
// policy, runtime (onnxruntime-web) and model so that it also answers offline after its first use.
// Predictions from the server always go to the network and are never cached: an answer about someone's skin must be
// fresh. The on-device files hold no personal data.
const CACHE = "lesionnet-shell-v2";
const MODELS = "lesionnet-models-v1"; // /on-device/model-<key>.onnx: the name changes with the model, so cache-first
const SHELL = ["/", "/static/app.css", "/static/app.js", "/static/ondevice.js", "/manifest.webmanifest",
               "/static/icon-192.png", "/static/icon-512.png", "/on-device/policy.json"];
const RUNTIME = "/static/vendor/"; // cached when first used (absent when the server has no on-device runtime)

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k !== CACHE && k !== MODELS).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

// A model file: from the cache if there, else fetched and kept (older models dropped)
async function model(request) {
  const cache = await caches.open(MODELS);
  const hit = await cache.match(request);
  if (hit) return hit;
  const response = await fetch(request);
  if (response.ok) {
    for (const old of await cache.keys()) await cache.delete(old);
    await cache.put(request, response.clone());
  }
  return response;
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.pathname.startsWith("/api/")) return;  // network only
  if (url.pathname.startsWith("/on-device/model-")) { event.respondWith(model(event.request)); return; }
  // Network first (so a new model/page shows at once), cache as the offline fallback.
  event.respondWith(fetch(event.request)
    .then((response) => {
      if (response.ok && (SHELL.includes(url.pathname) || url.pathname.startsWith(RUNTIME))) {
        const copy = response.clone();
        caches.open(CACHE).then((cache) => cache.put(event.request, copy));
      }
      return response;
    })
    .catch(() => caches.match(event.request)));
});
