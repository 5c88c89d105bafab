// The page of view.py: the fit and its source side by side in OpenSeadragon, pan and zoom
// kept in step, tiles refreshed whenever the server's version moves on (a reloaded
// checkpoint, or more training steps), the visible region's PSNR, the PSNR curve so far.
"use strict";
const $ = (id) => document.getElementById(id);
let status = null, fitViewer = null, sourceViewer = null, syncing = false, psnrTimer = null;
let shown = false;          // every viewer open, the linked view applied

async function getJSON(url) {
  const reply = await fetch(url, {cache: "no-store"});
  if (!reply.ok) throw new Error(`${url}: HTTP ${reply.status}`);
  return reply.json();
}

function fitTiles() {
  return `/${$("error").checked ? "error" : "fit"}.dzi?v=${status.version}`;
}

function makeViewer(id, tileSources, maxZoomPixelRatio) {
  return OpenSeadragon({
    id, tileSources, maxZoomPixelRatio, prefixUrl: "/openseadragon/images/",
    drawer: "canvas", imageLoaderLimit: 4, tileRetryMax: 5, tileRetryDelay: 1000,
    visibilityRatio: 0.5, showRotationControl: false,
  });
}

// Both images are one viewport unit wide, so one zoom and centre show the same region.
function follow(leader, follower) {
  leader.addHandler("viewport-change", () => {
    if (!syncing && follower) {
      syncing = true;
      follower.viewport.zoomTo(leader.viewport.getZoom(), null, true);
      follower.viewport.panTo(leader.viewport.getCenter(), true);
      syncing = false;
    }
    schedulePsnr();
  });
}

// New tiles drawn over the old ones; the old image goes once the new one is fully loaded.
function refresh() {
  fitViewer.addTiledImage({tileSource: fitTiles(), success: (event) => {
    const item = event.item, world = fitViewer.world;
    const done = () => {
      while (world.getItemCount() > 1 && world.getItemAt(0) !== item) world.removeItem(world.getItemAt(0));
    };
    if (item.getFullyLoaded()) done(); else item.addOnceHandler("fully-loaded-change", done);
  }});
  schedulePsnr();
}

function schedulePsnr() {
  clearTimeout(psnrTimer);
  psnrTimer = setTimeout(updatePsnr, 300);
}

async function updatePsnr() {
  if (!status.source) return;
  const b = fitViewer.viewport.getBounds(), aspect = status.height / status.width;
  const query = `x0=${b.x}&y0=${b.y / aspect}&x1=${b.x + b.width}&y1=${(b.y + b.height) / aspect}`;
  try {
    const r = await getJSON(`/psnr.json?${query}`);
    $("psnr").textContent = r.points === 0 ? "region: outside the image"
      : r.psnr === null ? `region PSNR: exact (${r.points} px)`
      : `region PSNR ${r.psnr.toFixed(2)} dB (${r.points} px, step ${r.step})`;
  } catch (error) {
    $("psnr").textContent = "region PSNR: busy";
  }
}

function showStatus() {
  $("step").textContent = `step ${status.step}${status.live ? " (training)" : ""}`;
  $("fit-label").textContent = $("error").checked
    ? "per-pixel error (black 0, white 32+ levels)" : `fit, step ${status.step}`;
  const curve = status.curve;
  if (curve.length > 1) {
    const steps = curve.map((p) => p[0]), dbs = curve.map((p) => p[1]);
    const s0 = Math.min(...steps), s1 = Math.max(...steps), d0 = Math.min(...dbs), d1 = Math.max(...dbs);
    const points = curve.map(([s, d]) =>
      `${(210 * (s - s0) / (s1 - s0 || 1) + 5).toFixed(1)},${(30 - 26 * (d - d0) / (d1 - d0 || 1)).toFixed(1)}`);
    document.querySelector("#curve polyline").setAttribute("points", points.join(" "));
    $("curve-label").textContent = `PSNR ${d1.toFixed(2)} dB max, ${dbs[dbs.length - 1].toFixed(2)} last`;
  }
}

// The view as the page's address: #x=..&y=..&zoom=.. (the centre in image coordinates,
// 0..1 each way, and the zoom, 1 = the whole width), kept as one pans, opened from a link.
function showLink() {
  const view = new URLSearchParams(location.hash.slice(1));
  const x = parseFloat(view.get("x")), y = parseFloat(view.get("y")), zoom = parseFloat(view.get("zoom"));
  if ([x, y, zoom].every(Number.isFinite)) {
    fitViewer.viewport.zoomTo(zoom, null, true);
    fitViewer.viewport.panTo(new OpenSeadragon.Point(x, y * status.height / status.width), true);
  }
  shown = true;
}

function keepLink() {
  const c = fitViewer.viewport.getCenter(), aspect = status.height / status.width;
  const view = `x=${c.x.toFixed(5)}&y=${(c.y / aspect).toFixed(5)}&zoom=${fitViewer.viewport.getZoom().toFixed(3)}`;
  history.replaceState(null, "", `#${view}`);
}

async function poll() {
  try {
    const next = await getJSON("/status.json");
    const changed = next.version !== status.version;
    status = next;
    $("state").textContent = "";
    if (changed) refresh();
    showStatus();
  } catch (error) {
    $("state").textContent = "server not answering";
  }
  setTimeout(poll, 2000);
}

async function start() {
  status = await getJSON("/status.json");
  if (!window.OpenSeadragon) {
    $("missing").textContent = status.viewer || "OpenSeadragon did not load";
    $("missing").style.display = "block";
    $("panes").style.display = "none";
    return;
  }
  fitViewer = makeViewer("fit", fitTiles(), 1.1);
  if (status.source) {
    // the source has ZOOM times fewer pixels: it may be enlarged as far as the fit goes
    sourceViewer = makeViewer("source", "/source.dzi", 1.1 * status.zoom);
    follow(sourceViewer, fitViewer);
  } else {
    $("source-pane").style.display = "none";
    $("error-toggle").style.display = "none";
  }
  follow(fitViewer, sourceViewer);
  const viewers = [fitViewer, sourceViewer].filter(Boolean);
  let opened = 0;
  for (const v of viewers) v.addOnceHandler("open", () => { if (++opened === viewers.length) showLink(); });
  fitViewer.addHandler("animation-finish", keepLink);
  $("error").addEventListener("change", () => { refresh(); showStatus(); });
  showStatus();
  setTimeout(poll, 2000);
}

start();
