// Service worker: caches the app shell so the page opens (and can be installed) offline.
// Predictions always go to the network and are never cached: an answer about someone's skin must be fresh.
const CACHE = "lesionnet-shell-v1";
const SHELL = ["/", "/static/app.css", "/static/app.js", "/manifest.webmanifest", "/static/icon-192.png",
               "/static/icon-512.png"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()));
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.pathname.startsWith("/api/")) return;  // network only
  // Network first (so a new model/page shows at once), cache as the offline fallback.
  event.respondWith(fetch(event.request)
    .then((response) => {
      if (response.ok && SHELL.includes(url.pathname)) {
        const copy = response.clone();
        caches.open(CACHE).then((cache) => cache.put(event.request, copy));
      }
      return response;
    })
    .catch(() => caches.match(event.request)));
});
