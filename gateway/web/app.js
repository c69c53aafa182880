// Kiln's web page: a client of the gateway's own HTTP API only (GET /v1/models, POST /v1/generate as
// Server-Sent Events read with fetch, GET /v1/balance, POST /v1/interrupt). No build step, no dependencies.
// URLs are relative, so the page also works behind a reverse proxy that serves the gateway under a path.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "kiln.api_key";

// Request fields the server may name in an error, and the element that shows each (`err-<id>`).
const FIELD_ELEMENTS = {
  prompt: "prompt", negative_prompt: "negative_prompt", model: "model", sampler: "sampler", decoder: "decoder",
  width: "width", height: "height", steps: "steps", guidance_scale: "guidance_scale", num_images: "num_images",
  seed: "seed", init_image: "init_image", mask_image: "mask_image", strength: "strength", mask_blur: "mask_blur",
  api_key: "api_key",
};

const state = {
  models: [],          // ListModels' ModelInfo list
  init: null,          // {dataUrl, width, height} of the init image
  maskPainted: false,  // anything painted on the mask canvas since it was cleared
  busy: false,
};

// ---- API ----------------------------------------------------------------------------------------------

function headers(extra = {}) {
  const key = $("api_key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorBody(response) {
  try {
    return await response.json();
  } catch {
    return { error: `HTTP ${response.status}`, message: `${response.status} ${response.statusText}` };
  }
}

// ---- errors next to their fields ----------------------------------------------------------------------

function clearErrors() {
  for (const el of document.querySelectorAll(".error")) {
    el.hidden = true;
    el.textContent = "";
  }
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showFieldError(field, message) {
  const head = String(field || "").split(/[.[]/)[0];
  const id = FIELD_ELEMENTS[head];
  const box = id && $(`err-${id}`);
  if (!box) return false;
  if (!box.textContent.includes(message)) box.textContent = box.textContent ? `${box.textContent} ${message}` : message;
  box.hidden = false;
  const input = id === "init_image" ? $("init_file") : id === "mask_image" ? $("mask") : $(id);
  if (input) input.setAttribute("aria-invalid", "true");
  if (id === "init_image" || id === "mask_image" || id === "strength" || id === "mask_blur") $("init-box").scrollIntoView({ block: "nearest" });
  return true;
}

function showFormError(message) {
  $("form-error").textContent = message;
  $("form-error").hidden = false;
}

// One refusal (`{error, message, field, detail, details}`, and `status` for a mid-stream error event): each
// field violation next to its field, the rest below the Generate button.
function showApiError(body, status) {
  if (status === 401) {
    showFieldError("api_key", `API key needed${body.message ? ` (${body.message})` : ""}`);
    return;
  }
  const violations = [];
  for (const d of body.details || []) {
    for (const v of d.fieldViolations || []) violations.push([v.field, v.description]);
  }
  if (!violations.length && body.field) violations.push([body.field, body.message]);
  let shown = false;
  for (const [field, message] of violations) shown = showFieldError(field, message) || shown;
  if (!shown) showFormError(body.message || body.error || `HTTP ${status}`);
}

// ---- models ------------------------------------------------------------------------------------------

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === selected)));
}

async function loadModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) {
    showApiError(await errorBody(response), response.status);
    return;
  }
  const previous = $("model").value;
  state.models = (await response.json()).models || [];
  fillSelect($("model"), state.models.map((m) => m.name), previous);
  applyModel();
}

// The chosen model's defaults and limits into the form (the server still checks every value).
function applyModel() {
  const m = currentModel();
  if (!m) return;
  const limits = m.limits || {};
  fillSelect($("sampler"), m.samplers || [], m.default_sampler);
  const decoders = m.decoders || [];
  fillSelect($("decoder"), decoders, decoders[0]);
  $("decoder-field").hidden = decoders.length < 2;
  for (const id of ["width", "height"]) {
    Object.assign($(id), { min: limits.min_size || 8, max: limits.max_size || 4096 });
  }
  $("width").value = m.default_width || "";
  $("height").value = m.default_height || "";
  Object.assign($("steps"), { min: 1, max: limits.max_steps || 150, value: m.default_steps || "" });
  Object.assign($("guidance_scale"), { max: limits.max_guidance_scale || 30, value: m.default_guidance_scale ?? "" });
  $("num_images").max = limits.max_images || 1;
  if (state.init) fitSizeToInit();
}

// ---- credits -----------------------------------------------------------------------------------------

async function refreshBalance() {
  const box = $("credits");
  let response;
  try {
    response = await fetch("v1/balance", { headers: headers() });
  } catch {
    return;
  }
  if (!response.ok) {
    box.hidden = true;  // 409 FAILED_PRECONDITION: a server without accounts
    if (response.status === 401) showApiError(await errorBody(response), 401);
    return;
  }
  const b = await response.json();
  $("credits-remaining").textContent = b.remaining;
  $("credits-daily").textContent = b.daily_credits + (b.granted || 0);
  $("credits-tier").textContent = b.tier || "?";
  const reset = new Date(b.reset_unix * 1000);
  $("credits-reset").dateTime = reset.toISOString();
  $("credits-reset").textContent = reset.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  box.hidden = false;
}

// ---- init image and mask -----------------------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot decode this image"));
    img.src = src;
  });
}

async function setInitFromFile(file) {
  clearErrors();
  if (!file) return;
  try {
    let dataUrl = await readFile(file);
    const img = await loadImage(dataUrl);
    if (!/^data:image\/(png|jpeg|webp);/.test(dataUrl)) dataUrl = toPng(img);  // the server takes these three
    setInit(dataUrl, img);
  } catch (e) {
    showFieldError("init_image", `${file.name}: ${e.message}`);
  }
}

function toPng(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  c.getContext("2d").drawImage(img, 0, 0);
  return c.toDataURL("image/png");
}

async function setInitFromDataUrl(dataUrl) {
  clearErrors();
  setInit(dataUrl, await loadImage(dataUrl));
}

function setInit(dataUrl, img) {
  state.init = { dataUrl, width: img.naturalWidth, height: img.naturalHeight };
  $("init_preview").src = dataUrl;
  const mask = $("mask");
  mask.width = img.naturalWidth;  // the mask is sent at the init image's size
  mask.height = img.naturalHeight;
  clearMask();
  $("init").hidden = false;
  fitSizeToInit();
}

function removeInit() {
  state.init = null;
  $("init").hidden = true;
  $("init_file").value = "";
  $("init_preview").removeAttribute("src");
  for (const id of ["width", "height"]) $(id).placeholder = "";
  applyModel();
}

// Without width/height the server keeps the init image's size (rounded down to multiples of 8): leave them
// empty when that size is within the model's limits, else fill in the largest size that fits.
function fitSizeToInit() {
  const m = currentModel();
  const { width, height } = state.init;
  const lo = m?.limits?.min_size || 8;
  const hi = m?.limits?.max_size || 4096;
  const floor8 = (v) => Math.max(8, Math.floor(v / 8) * 8);
  if (Math.min(width, height) >= lo && Math.max(width, height) <= hi) {
    $("width").value = "";
    $("height").value = "";
    $("width").placeholder = floor8(width);
    $("height").placeholder = floor8(height);
  } else {
    const scale = Math.max(width, height) > hi ? hi / Math.max(width, height) : lo / Math.min(width, height);
    $("width").value = floor8(width * scale);
    $("height").value = floor8(height * scale);
  }
}

function clearMask() {
  const mask = $("mask");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  state.maskPainted = false;
}

// Brush strokes in an opaque colour on a transparent canvas over the init image (its coverage is the mask); the
// brush size is in screen pixels.
function setupBrush() {
  const mask = $("mask");
  const ctx = mask.getContext("2d");
  let last = null;
  const point = (e) => {
    const r = mask.getBoundingClientRect();
    const scale = mask.width / r.width;
    return { x: (e.clientX - r.left) * scale, y: (e.clientY - r.top) * (mask.height / r.height), scale };
  };
  const stroke = (from, to) => {
    ctx.strokeStyle = "#ff1f8f";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush").value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    state.maskPainted = true;
  };
  mask.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    mask.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
  });
  mask.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = point(e);
    stroke(last, p);
    last = p;
  });
  const end = () => { last = null; };
  mask.addEventListener("pointerup", end);
  mask.addEventListener("pointercancel", end);
}

// The mask as the server reads it: a PNG of the init image's size, white = redraw, black = keep (gray = the
// brush's coverage at antialiased edges; the server binarises at 0.5).
function maskPng() {
  const mask = $("mask");
  const pixels = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    d[i] = d[i + 1] = d[i + 2] = d[i + 3];
    d[i + 3] = 255;
  }
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

// ---- generate ----------------------------------------------------------------------------------------

// The form as a GenerateRequest (proto field names); empty numbers are left out (the model's default).
function buildRequest() {
  const request = { model: $("model").value, prompt: $("prompt").value, preview_every: 1 };
  const negative = $("negative_prompt").value;
  if (negative) request.negative_prompt = negative;
  if ($("sampler").value) request.sampler = $("sampler").value;
  if (!$("decoder-field").hidden && $("decoder").value) request.decoder = $("decoder").value;
  let ok = true;
  const number = (id, field = id) => {
    const input = $(id);
    if (input.validity.badInput) {
      showFieldError(field, `${field} must be a number`);
      ok = false;
    } else if (input.value !== "") {
      request[field] = Number(input.value);
    }
  };
  ["width", "height", "steps", "guidance_scale", "num_images"].forEach((id) => number(id));
  if (!$("random_seed").checked) number("seed");
  if (state.init) {
    request.init_image = state.init.dataUrl;
    request.strength = Number($("strength").value);
    if (state.maskPainted) {
      request.mask_image = maskPng();
      number("mask_blur");
    }
  }
  return ok ? request : null;
}

// Server-Sent Events from a fetch body: `event:` and `data:` lines, blank line between events.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
  $("form").setAttribute("aria-busy", String(busy));
}

function setStatus(text) {
  $("status").textContent = text;
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  clearErrors();
  const request = buildRequest();
  if (!request) return;
  setBusy(true);
  setStatus("Queued…");
  $("progress").value = 0;
  const t0 = performance.now();
  let started = null;
  let outcome = "";
  try {
    const response = await fetch("v1/generate", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(request),
    });
    if (!response.ok) {
      showApiError(await errorBody(response), response.status);
      setStatus("");
      return;
    }
    await readEvents(response.body, (kind, data) => {
      if (kind === "started") {
        started = { ...data.started, prompt: request.prompt, negative_prompt: request.negative_prompt || "" };
        const cost = started.cost ? `, ${started.cost} credits` : "";
        setStatus(`Started: ${started.mode.replaceAll("_", " ")}, ${started.width}x${started.height}${cost}`);
      } else if (kind === "progress") {
        showProgress(data.progress);
      } else if (kind === "artifact") {
        addToGallery(data.artifact, started);
      } else if (kind === "done") {
        outcome = `Done in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
        $("progress").value = 1;
      } else if (kind === "error") {
        if (data.error === "CANCELLED") outcome = "Stopped";
        else showApiError(data, data.status);
      }
    });
  } catch (e) {
    showFormError(`the connection to the gateway failed${started ? " during the generation" : ""}: ${e.message}`);
  } finally {
    setStatus(outcome || (started ? "Ended early" : ""));
    setBusy(false);
    refreshBalance();
  }
}

function showProgress(p) {
  if (p.stage === "denoise" && p.total_steps) {
    $("progress").value = p.step / p.total_steps;
    setStatus(`Denoising: step ${p.step} of ${p.total_steps}`);
  } else {
    setStatus(p.stage === "decode" ? "Decoding…" : p.stage === "text_encode" ? "Encoding the prompt…" : p.stage);
  }
  if (p.preview_png) {
    $("preview").src = `data:image/png;base64,${p.preview_png}`;
    $("preview").hidden = false;
  }
}

async function stop() {
  $("stop").disabled = true;
  setStatus("Stopping…");
  await fetch("v1/interrupt", { method: "POST", headers: headers() });
}

// ---- gallery -----------------------------------------------------------------------------------------

// PNG text chunks (tEXt, and uncompressed iTXt): the server writes the generation parameters as `parameters`.
function pngText(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const out = {};
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder();
  for (let i = 8; i + 8 <= bytes.length;) {
    const length = view.getUint32(i);
    const type = latin1.decode(bytes.subarray(i + 4, i + 8));
    const data = bytes.subarray(i + 8, i + 8 + length);
    const zero = data.indexOf(0);
    if (type === "tEXt" && zero > 0) {
      out[latin1.decode(data.subarray(0, zero))] = latin1.decode(data.subarray(zero + 1));
    } else if (type === "iTXt" && zero > 0 && data[zero + 1] === 0) {
      let j = data.indexOf(0, zero + 3);  // language tag
      j = data.indexOf(0, j + 1);         // translated keyword
      out[latin1.decode(data.subarray(0, zero))] = utf8.decode(data.subarray(j + 1));
    } else if (type === "IEND") {
      break;
    }
    i += 12 + length;
  }
  return out;
}

function addToGallery(artifact, started) {
  const src = `data:${artifact.mime || "image/png"};base64,${artifact.data}`;
  const s = started || {};
  const item = document.createElement("li");
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = `Seed ${artifact.seed}: ${s.prompt || ""}`;
  img.width = artifact.width;
  img.height = artifact.height;
  const caption = document.createElement("figcaption");
  const facts = [
    ["Mode", (s.mode || "").replaceAll("_", " ")], ["Model", s.model], ["Size", `${artifact.width}x${artifact.height}`],
    ["Sampler", s.sampler], ["Steps", s.mode === "text_to_image" ? s.steps : `${s.denoising_steps} of ${s.steps}`],
    ["Guidance", s.guidance_scale], ["Seed", artifact.seed],
  ];
  if (s.mode && s.mode !== "text_to_image") facts.push(["Strength", Number(s.strength).toFixed(2)]);
  const list = document.createElement("dl");
  for (const [name, value] of facts) {
    if (value === undefined || value === "") continue;
    list.append(Object.assign(document.createElement("dt"), { textContent: name }),
                Object.assign(document.createElement("dd"), { textContent: value }));
  }
  const parameters = pngText(artifact.data).parameters;
  caption.append(Object.assign(document.createElement("p"), { className: "prompt", textContent: s.prompt || "" }),
                 list);
  if (parameters) {
    const details = document.createElement("details");
    details.append(Object.assign(document.createElement("summary"), { textContent: "Parameters" }),
                   Object.assign(document.createElement("pre"), { textContent: parameters }));
    caption.append(details);
  }
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  const useInit = Object.assign(document.createElement("button"), { type: "button", textContent: "Use as init image" });
  useInit.addEventListener("click", () => {
    setInitFromDataUrl(src);
    $("init-box").scrollIntoView({ behavior: "smooth", block: "start" });
  });
  const useSeed = Object.assign(document.createElement("button"), { type: "button", textContent: "Use seed" });
  useSeed.addEventListener("click", () => {
    $("random_seed").checked = false;
    $("seed").disabled = false;
    $("seed").value = artifact.seed;
  });
  const download = Object.assign(document.createElement("a"), {
    href: src, download: `kiln-${artifact.seed}-${artifact.index}.png`, textContent: "Download",
  });
  buttons.append(useInit, useSeed, download);
  caption.append(buttons);
  figure.append(img, caption);
  item.append(figure);
  $("gallery").prepend(item);
  $("gallery-empty").hidden = true;
}

// ---- wiring ------------------------------------------------------------------------------------------

function main() {
  $("api_key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api_key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api_key").value.trim());
    clearErrors();
    loadModels();
    refreshBalance();
  });
  $("model").addEventListener("change", applyModel);
  $("random_seed").addEventListener("change", () => { $("seed").disabled = $("random_seed").checked; });
  $("strength").addEventListener("input", () => { $("strength_value").value = $("strength").value; });
  $("brush").addEventListener("input", () => { $("brush_value").value = $("brush").value; });
  $("init_file").addEventListener("change", () => setInitFromFile($("init_file").files[0]));
  const drop = $("init-box");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = [...(e.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) setInitFromFile(file);
  });
  $("clear_mask").addEventListener("click", clearMask);
  $("remove_init").addEventListener("click", removeInit);
  $("form").addEventListener("submit", generate);
  for (const id of ["prompt", "negative_prompt"]) {  // Ctrl+Enter (Cmd+Enter) in a prompt generates
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
    });
  }
  $("stop").addEventListener("click", stop);
  setupBrush();
  loadModels().catch((e) => showFormError(`the gateway did not answer: ${e.message}`));
  refreshBalance();
}

main();
