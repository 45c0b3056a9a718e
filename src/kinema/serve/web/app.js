// kinema web page: plain JavaScript against the server's own /v1 API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 300;
const seen = { statuses: [], progress: [] }; // what the live view showed (read by tests)
window.kinemaSeen = seen;

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.error) message = body.error.message + (body.error.param ? ` (${body.error.param})` : "");
    } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

// Whether a failed request may succeed later: the server unreachable (restarting: fetch
// throws with no status) or answering 5xx, not a 4xx about the request itself.
const passing = (err) => err.status === undefined || err.status >= 500;
const RETRY_MS = 2000;  // between polls while the server does not answer

const getJSON = async (path) => (await api(path)).json();
const postJSON = async (path, body) => (await api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
})).json();

// Object URLs of downloaded videos and thumbnails, "id variant" -> Promise of the URL: made
// once (a finished video never changes) and let go once the video leaves the page.
const blobs = new Map();
window.kinemaBlobs = blobs;  // read by tests

function blobURL(id, variant) {
  const key = `${id} ${variant}`;
  if (!blobs.has(key)) {
    const made = api(`/v1/videos/${encodeURIComponent(id)}/content?variant=${variant}`)
      .then(async (response) => URL.createObjectURL(await response.blob()));
    made.catch(() => blobs.delete(key));  // a failed download is tried again next time
    blobs.set(key, made);
  }
  return blobs.get(key);
}

// Revoke the object URLs of videos no longer shown (deleted, or paged out of the gallery).
function forgetBlobs(shown) {
  for (const [key, made] of blobs) {
    if (shown.has(key.split(" ")[0])) continue;
    blobs.delete(key);
    made.then((url) => URL.revokeObjectURL(url), () => {});
  }
}

function say(text) { $("message").textContent = text || ""; }

// -- the form ------------------------------------------------------------------------------

async function loadModel() {
  try {
    const models = await getJSON("/v1/models");
    const model = models.data[0];
    $("model").textContent = model.id;
    // the model's defaults are shown, not filled in: a field is sent (and said to be unused
    // by a restyle or an extension) only when the user gives it
    const d = model.defaults || {};
    for (const name of ["size", "seconds", "steps"]) {
      if (d[name]) $(name).placeholder = d[name];
    }
  } catch (err) { say(err.message); }
}

// timed prompts, as the CLI's --at: one SECONDS:PROMPT a line (also used by Extend and Remix)
function timedPrompts() {
  return $("at").value.split("\n").map((line) => line.trim()).filter((line) => line);
}

// the JSON body of an extension or a remix: its prompt and the timed prompts, if any
function withTimedPrompts(fields) {
  const at = timedPrompts();
  return at.length ? { ...fields, at } : fields;
}

// the form's fields by API name -> element id
const FIELDS = { negative_prompt: "negative", size: "size", seconds: "seconds", seed: "seed",
                 steps: "steps", strength: "strength" };

// where the form goes: a new video (maybe from the start image), or the user's own video
// restyled (edits) or continued (extensions); each endpoint takes its own fields
function target() {
  const image = $("image").files[0], video = $("video").files[0];
  if (image && video) throw new Error("give a start image or a video of yours, not both");
  if (!video) {
    return { path: "/v1/videos", file: ["input_reference", image], what: "a new video",
             fields: ["negative_prompt", "size", "seconds", "seed", "steps"] };
  }
  if ($("video-mode").value === "extend") {
    return { path: "/v1/videos/extensions", file: ["video", video], what: "an extension",
             fields: ["negative_prompt", "seconds", "seed", "steps"], required: ["seconds"] };
  }
  return { path: "/v1/videos/edits", file: ["video", video], what: "a restyle",
           fields: ["negative_prompt", "size", "seed", "steps", "strength"] };
}

// what the form holds that ``to`` does not send (strength without a video, ...), said
function unusedFields(to) {
  const unused = Object.keys(FIELDS).filter((n) => !to.fields.includes(n) && $(FIELDS[n]).value.trim());
  return unused.length ? `${unused.join(", ")}: not used by ${to.what}` : "";
}

// the form's values of these API fields, those filled in; a ``required`` one left empty
// sends the default its field shows (an extension needs its seconds)
function formFields(names, required = []) {
  const fields = {};
  for (const name of names) {
    const input = $(FIELDS[name]);
    const value = input.value.trim() || (required.includes(name) ? input.placeholder : "");
    if (value) fields[name] = value;
  }
  return fields;
}

function formBody(to) {
  const body = new FormData();
  body.append("prompt", $("prompt").value);
  for (const [name, value] of Object.entries(formFields(to.fields, to.required))) {
    body.append(name, value);
  }
  for (const line of timedPrompts()) body.append("at[]", line);
  const [name, file] = to.file;
  if (file) body.append(name, file, file.name);
  return body;
}

async function submit(event) {
  event.preventDefault();
  say("");
  try {
    const to = target();
    const video = await (await api(to.path, { method: "POST", body: formBody(to) })).json();
    track(video);
    say(unusedFields(to));
    refreshGallery();
  } catch (err) { say(err.message); }
}

// -- the live view -------------------------------------------------------------------------

let tracking = null;

function showStatus(video) {
  $("current").hidden = false;
  $("current-title").textContent = video.prompt || video.id;
  $("progress").value = video.progress;
  $("status").textContent = `${video.status} ${video.progress}%`;
  const said = video.warnings || [];
  $("warnings").replaceChildren(...said.map((text) => {
    const item = document.createElement("li");
    item.textContent = `warning: ${text}`;
    return item;
  }));
  $("warnings").hidden = said.length === 0;
  seen.statuses.push(video.status);
  seen.progress.push(video.progress);
}

async function track(video) {
  tracking = video.id;
  let retrying = false;
  $("player").removeAttribute("src");
  showStatus(video);
  while (tracking === video.id && (video.status === "queued" || video.status === "in_progress")) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (tracking !== video.id) break;  // deleted (or another one started) meanwhile
    try { video = await getJSON(`/v1/videos/${encodeURIComponent(video.id)}`); }
    catch (err) {
      if (tracking !== video.id) return;
      say(passing(err) ? `${err.message}; still trying` : err.message);
      if (!passing(err)) return;
      retrying = true;
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
      continue;  // a restarting server requeues the job: keep following it
    }
    if (tracking !== video.id) break;
    if (retrying) say("");  // the server answers again
    retrying = false;
    showStatus(video);
  }
  if (tracking !== video.id) return;
  if (video.status === "completed") await play(video);
  if (video.status === "failed") say(`failed: ${video.error ? video.error.message : "unknown"}`);
  refreshGallery();
}

async function play(video) {
  const player = $("player");
  $("current").hidden = false;
  $("current-title").textContent = video.prompt || video.id;
  player.dataset.id = video.id;
  player.src = await blobURL(video.id, "video");
  try { await player.play(); } catch (_) { /* autoplay may be refused; controls remain */ }
}

// -- the gallery ---------------------------------------------------------------------------

let galleryPageSize = 50;  // videos a page; "Show more" adds a page
let galleryPages = 1;

// the newest videos, as many pages as shown so far (the API's `after` cursor, page by page)
async function refreshGallery() {
  const videos = [];
  let after = null, more = false;
  try {
    for (let page = 0; page < galleryPages; page++) {
      const cursor = after ? `&after=${encodeURIComponent(after)}` : "";
      const list = await getJSON(`/v1/videos?limit=${galleryPageSize}&order=desc${cursor}`);
      videos.push(...list.data);
      [after, more] = [list.last_id, list.has_more];
      if (!more) break;
    }
  } catch (err) {  // not another key's videos
    say(err.message);
    $("gallery").replaceChildren();
    $("more").hidden = true;
    return;
  }
  $("gallery").replaceChildren(...videos.map(card));
  $("more").hidden = !more;
  forgetBlobs(new Set([...videos.map((v) => v.id), $("player").dataset.id]));
}

function card(video) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.dataset.id = video.id;
  node.dataset.status = video.status;
  node.querySelector(".prompt").textContent = video.prompt || "";
  node.querySelector(".meta").textContent =
    `${video.status} · ${video.size} · ${video.seconds}s · ${new Date(video.created_at * 1000).toLocaleString()}`;
  const done = video.status === "completed";
  for (const cls of ["play", "download", "extend", "remix"]) {
    node.querySelector(`.${cls}`).disabled = !done;
  }
  if (done) blobURL(video.id, "thumbnail").then((url) => { node.querySelector(".thumb").src = url; })
    .catch(() => {});
  node.querySelector(".play").onclick = () => play(video);
  node.querySelector(".download").onclick = () => download(video);
  node.querySelector(".extend").onclick = () => extend(video);
  node.querySelector(".remix").onclick = () => remix(video);
  node.querySelector(".delete").onclick = () => remove(video);
  return node;
}

async function download(video) {
  try {
    const link = document.createElement("a");
    link.href = await blobURL(video.id, "video");
    link.download = `${video.id}.mp4`;
    link.click();
  } catch (err) { say(err.message); }
}

async function extend(video) {
  const prompt = window.prompt("Prompt for the continuation", video.prompt || "");
  if (prompt === null) return;
  const fields = { seconds: "1", ...formFields(["negative_prompt", "seconds", "seed", "steps"]) };
  try { track(await postJSON("/v1/videos/extensions",
                                withTimedPrompts({ ...fields, prompt, video: { id: video.id } }))); }
  catch (err) { say(err.message); }
  refreshGallery();
}

async function remix(video) {
  const prompt = window.prompt("New prompt for the remix", video.prompt || "");
  if (prompt === null) return;
  try {
    const fields = formFields(["seed", "strength"]);  // the rest is the source's
    track(await postJSON(`/v1/videos/${encodeURIComponent(video.id)}/remix`,
                         withTimedPrompts({ ...fields, prompt })));
  }
  catch (err) { say(err.message); }
  refreshGallery();
}

async function remove(video) {
  try { await api(`/v1/videos/${encodeURIComponent(video.id)}`, { method: "DELETE" }); }
  catch (err) { say(err.message); }
  if (tracking === video.id) {  // the live view goes with it
    tracking = null;
    $("current").hidden = true;
    $("player").removeAttribute("src");
    delete $("player").dataset.id;
  }
  refreshGallery();
}

// -- start ---------------------------------------------------------------------------------

$("api-key").value = localStorage.getItem("kinema-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("kinema-api-key", $("api-key").value.trim());
  say("");  // the last key's error, if any, is this key's to repeat
  loadModel();
  refreshGallery();
});
$("create").addEventListener("submit", submit);
$("more").addEventListener("click", () => { galleryPages += 1; refreshGallery(); });
loadModel();
refreshGallery();
