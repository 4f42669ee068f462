// The page of app.py: the form, the queue (polled while anything is in it) and this
// run's results. Plain DOM, no framework; every text the user typed is set as text.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "seconds_total", "steps", "cfg_scale", "sampler", "seed",
  "batch_size", "format", "overlap", "mode", "init_noise_level", "inpaint_ranges", "bpm", "bars"];
let info = null;
let upload = null; // {id, name, seconds, ...} of the file the server accepted
let wave = null; // {peaks: [[min, max], ...] per canvas column, seconds: what the canvas spans}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(field, message) {
  const target = $("error-" + field) ? field : "form";
  $("error-" + target).textContent = message;
  const input = $(target);
  if (input) input.classList.add("invalid");
}

function clearErrors() {
  for (const node of document.querySelectorAll(".error")) node.textContent = "";
  for (const node of document.querySelectorAll(".invalid")) node.classList.remove("invalid");
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: `The server answered ${response.status}.` }; }
  if (!response.ok) throw Object.assign(new Error(body.error), { field: body.field });
  return body;
}

function showMode() {
  const mode = $("mode").value;
  for (const node of document.querySelectorAll(".audio-only")) node.classList.toggle("hidden", mode === "text");
  for (const node of document.querySelectorAll(".variation-only")) node.classList.toggle("hidden", mode !== "variation");
  for (const node of document.querySelectorAll(".inpaint-only")) node.classList.toggle("hidden", mode !== "inpaint");
}

async function sendUpload() {
  const file = $("upload").files[0];
  upload = null;
  $("upload-info").textContent = "";
  $("error-upload").textContent = "";
  if (!file) return;
  if (file.size > info.max_upload) {
    showError("upload", `The upload is larger than the limit of ${info.max_upload / 1e6} MB (--max-upload-mb).`);
    return;
  }
  $("upload-info").textContent = "Uploading…";
  try {
    upload = await api("/api/upload", {
      method: "POST", body: file,
      headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    });
    $("upload-info").textContent = `${file.name}: ${upload.seconds.toFixed(2)} s, ${upload.sample_rate} Hz, ${upload.channels} channel(s)`;
    await readWave(file);
  } catch (error) {
    $("upload-info").textContent = "";
    showError("upload", error.message);
  }
}

// The inpainting picture: the upload's first window, drawn by the browser's own decoder,
// with the ranges of the ranges field over it; a drag adds one.
async function readWave(file) {
  wave = null;
  let audio;
  try {
    audio = await new OfflineAudioContext(1, 1, 44100).decodeAudioData(await file.arrayBuffer());
  } catch (error) {
    drawWave(); // the browser cannot decode it (the server could): type the ranges
    return;
  }
  const canvas = $("waveform");
  const seconds = Math.min(audio.duration, info.window);
  const samples = audio.getChannelData(0).subarray(0, Math.round(seconds * audio.sampleRate));
  const peaks = [];
  for (let x = 0; x < canvas.width; x++) {
    const from = Math.floor(x * samples.length / canvas.width);
    const to = Math.max(Math.floor((x + 1) * samples.length / canvas.width), from + 1);
    let low = 0, high = 0;
    for (const v of samples.subarray(from, to)) { low = Math.min(low, v); high = Math.max(high, v); }
    peaks.push([low, high]);
  }
  wave = { peaks, seconds };
  drawWave();
}

function typedRanges() {
  return $("inpaint_ranges").value.split(/[,\s]+/).filter(Boolean).map((part) => part.split(":").map(Number))
    .filter((r) => r.length === 2 && r.every(Number.isFinite));
}

function drawWave(drag = null) {
  const canvas = $("waveform");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (!wave) return;
  const scale = Math.max(...wave.peaks.map(([low, high]) => Math.max(-low, high)), 1e-6);
  const middle = canvas.height / 2;
  context.fillStyle = "rgba(91, 45, 145, 0.25)";
  for (const [start, end] of drag ? [...typedRanges(), drag] : typedRanges()) {
    const x0 = start / wave.seconds * canvas.width, x1 = end / wave.seconds * canvas.width;
    context.fillRect(Math.min(x0, x1), 0, Math.abs(x1 - x0), canvas.height);
  }
  context.fillStyle = "#5b2d91";
  wave.peaks.forEach(([low, high], x) => {
    context.fillRect(x, middle - high / scale * middle, 1, Math.max((high - low) / scale * middle, 1));
  });
}

function secondsAt(event) {
  const box = $("waveform").getBoundingClientRect();
  return Math.min(Math.max((event.clientX - box.left) / box.width, 0), 1) * wave.seconds;
}

function markRanges() {
  const canvas = $("waveform");
  let start = null;
  canvas.addEventListener("mousedown", (event) => { if (wave) start = secondsAt(event); });
  canvas.addEventListener("mousemove", (event) => { if (start !== null) drawWave([start, secondsAt(event)]); });
  window.addEventListener("mouseup", (event) => {
    if (start === null) return;
    const end = secondsAt(event);
    const digits = wave.seconds < 1 ? 4 : 2;
    if (Math.abs(end - start) > wave.seconds / 200) {
      const range = `${Math.min(start, end).toFixed(digits)}:${Math.max(start, end).toFixed(digits)}`;
      const field = $("inpaint_ranges");
      field.value = field.value.trim() ? `${field.value.trim()}, ${range}` : range;
    }
    start = null;
    drawWave();
  });
  $("inpaint_ranges").addEventListener("input", () => drawWave());
}

function describe(settings) {
  const parts = [`seed ${settings.seed}`, `${settings.steps ?? info.defaults.steps} steps`,
    `cfg ${settings.cfg_scale ?? info.defaults.cfg_scale}`, settings.sampler ?? info.defaults.sampler,
    `${(settings.seconds_total ?? info.window).toFixed(2)} s`];
  if (settings.mode !== "text") parts.push(`${settings.mode} of ${settings.upload}`);
  if (settings.inpaint_ranges) parts.push(`regenerating ${settings.inpaint_ranges.map(([a, b]) => `${a}–${b} s`).join(", ")}`);
  if (settings.init_noise_level !== undefined) parts.push(`noise level ${settings.init_noise_level}`);
  if (settings.loop) parts.push("loop");
  if (settings.negative_prompt) parts.push(`not “${settings.negative_prompt}”`);
  return parts.join(" · ");
}

function addResult(result) {
  const list = $("history");
  list.querySelector(".empty")?.remove();
  const useSeed = element("button", { type: "button", class: "use-seed" }, "use this seed");
  useSeed.addEventListener("click", () => { $("seed").value = result.seed; $("seed").focus(); });
  const item = element("li", { class: "result", "data-name": result.name },
    element("div", { class: "head" }, element("strong", {}, result.settings.prompt), element("span", {}, result.name)),
    element("p", { class: "settings" }, describe(result.settings)),
    element("audio", { controls: "", preload: "auto", src: result.audio }),
    element("div", { class: "links" },
      element("a", { href: result.audio, download: result.name }, `download ${result.name.split(".").pop()}`),
      useSeed),
    element("a", { href: result.spectrogram, target: "_blank", title: "the spectrogram, full size" },
      element("img", { src: result.spectrogram, alt: `spectrogram of ${result.name}: time (s), frequency (Hz, log scale), level (dB)` })));
  list.prepend(item);
}

function addJob(job) {
  const list = $("jobs");
  list.querySelector(".empty")?.remove();
  const cancel = element("button", { type: "button", class: "cancel" }, "cancel");
  const item = element("li", { class: "job", id: "job-" + job.id },
    element("div", { class: "what" }, element("strong", {}, job.settings.prompt), element("br"),
      element("span", { class: "state" }, "queued")),
    element("progress", { class: "progress", max: "1", value: "0" }),
    cancel);
  cancel.addEventListener("click", () => api(`/api/jobs/${job.id}/cancel`, { method: "POST" }).catch(() => {}));
  list.append(item);
  follow(job.id, item);
}

async function follow(id, item) {
  const state = item.querySelector(".state");
  const bar = item.querySelector("progress");
  for (;;) {
    let job;
    try { job = await api(`/api/jobs/${id}`); } catch (error) { state.textContent = error.message; return; }
    if (job.total) { bar.max = job.total; bar.value = job.step; }
    if (job.state === "queued") state.textContent = job.position === 1 ? "next in line" : `waiting: ${job.position} in line`;
    if (job.state === "running") state.textContent = !job.total ? "encoding" : job.step < job.total ? `step ${job.step} of ${job.total}` : "decoding";
    if (job.state === "done") {
      bar.value = bar.max;
      item.remove();
      job.results.forEach(addResult);
      if (!$("jobs").children.length) $("jobs").append(element("li", { class: "empty" }, "Nothing running."));
      return;
    }
    if (job.state === "failed" || job.state === "cancelled") {
      item.classList.add(job.state);
      state.textContent = job.state === "failed" ? job.error : "cancelled";
      item.querySelector(".cancel").remove();
      if (job.state === "failed" && job.field) showError(job.field, job.error);
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function generate(event) {
  event.preventDefault();
  clearErrors();
  const data = {};
  for (const name of FIELDS) data[name] = $(name).value;
  data.loop = $("loop").checked;
  data.upload = upload ? upload.id : null;
  try {
    const job = await api("/api/generate", {
      method: "POST", body: JSON.stringify(data), headers: { "Content-Type": "application/json" },
    });
    addJob(job);
  } catch (error) {
    showError(error.field || "form", error.message);
  }
}

async function start() {
  info = await api("/api/info");
  const d = info.defaults;
  const adapters = info.adapters.map((a) => `${a.file} at ${a.strength}`).join(", ");
  $("model").textContent = `${info.model} · ${info.sample_rate} Hz · window ${info.window.toFixed(2)} s, ` +
    `up to ${info.longest} s · results in ${info.output_dir}` + (adapters ? ` · adapters: ${adapters}` : "");
  $("seconds_total").placeholder = info.window.toFixed(2);
  $("steps").placeholder = d.steps;
  $("cfg_scale").placeholder = d.cfg_scale;
  $("sampler").append(element("option", { value: "" }, `${d.sampler} (default)`));
  for (const name of info.samplers) if (name !== d.sampler) $("sampler").append(element("option", { value: name }, name));
  for (const name of info.formats) $("format").append(element("option", { value: name }, name));
  $("form").addEventListener("submit", generate);
  $("mode").addEventListener("change", showMode);
  $("upload").addEventListener("change", sendUpload);
  $("random-seed").addEventListener("click", () => { $("seed").value = ""; });
  markRanges();
  showMode();
  for (const result of (await api("/api/history")).reverse()) addResult(result);
  document.body.dataset.ready = "true";
}

start().catch((error) => { $("model").textContent = `Cannot reach the server: ${error.message}`; });
