// The chat page: a client of this server's OpenAI-compatible API (POST /v1/chat/completions, streamed as
// server-sent events), with the defaults and limits from GET /config. Nothing is fetched from elsewhere.
import {Attachments, KINDS, formatBytes, mediaElement} from "/page/attach.js";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("conversation"), empty: $("empty-note"), form: $("composer"), message: $("message"),
  send: $("send"), stop: $("stop"), status: $("status"), newChat: $("new-chat"), model: $("model-name"),
  temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"),
  reset: $("reset-settings"), steerlm: $("steerlm"), sliders: $("steerlm-sliders"),
};

let config = null;          // GET /config
let history = [];           // the messages the server accepted (user and assistant turns)
let controller = null;      // AbortController of the request in flight
const attachments = new Attachments(
  {list: $("attachments"), note: $("attach-note"), alert: $("attach-alert"), drop: $("drop-zone"),
   pickers: {image: $("image"), video: $("video")}},
  (kind) => history.reduce((n, m) => n + (Array.isArray(m.content)
    ? m.content.filter((p) => p.type === KINDS[kind].part).length : 0), 0));

// ------------------------------------------------------------------------------------------------ setup
async function init() {
  wire();
  try {
    const resp = await fetch("/config");
    if (!resp.ok) throw new Error(await errorText(resp));
    config = await resp.json();
  } catch (err) {
    showError("Could not read the server's configuration: " + err.message);
    ui.send.disabled = true;
    return;
  }
  ui.model.textContent = `${config.model} (template ${config.template})`;
  ui.maxTokens.max = config.limits.max_tokens;
  ui.maxTokens.placeholder = `auto, ≤ ${config.limits.max_tokens}`;
  ui.maxTokens.title = `Empty: as many as the server's cap (${config.limits.max_tokens}) and the context allow`;
  if (config.steerlm) buildSliders(config.steerlm);
  resetSettings();
  attachments.limits = config.limits;
  attachments.refreshPickers();
  ui.message.focus();
}

function resetSettings() {
  const d = config.defaults;
  ui.temperature.value = d.temperature;
  ui.topP.value = d.top_p;
  ui.maxTokens.value = d.max_tokens ?? "";
  ui.seed.value = d.seed ?? "";
  if (config.steerlm) {
    for (const [name, value] of Object.entries(config.steerlm)) {
      $("steer-" + name).value = value;
      $("steer-" + name + "-value").textContent = value;
    }
  }
}

function buildSliders(attributes) {
  for (const name of Object.keys(attributes)) {
    const row = document.createElement("div");
    row.className = "slider";
    const label = document.createElement("label");
    label.htmlFor = "steer-" + name;
    label.textContent = name.replace(/_/g, " ");
    const input = document.createElement("input");
    Object.assign(input, {type: "range", id: "steer-" + name, min: 0, max: 9, step: 1});
    input.dataset.attribute = name;
    const out = document.createElement("output");
    out.id = "steer-" + name + "-value";
    out.htmlFor = input.id;
    input.addEventListener("input", () => { out.textContent = input.value; });
    row.append(label, input, out);
    ui.sliders.append(row);
  }
  ui.steerlm.hidden = false;
}

function wire() {
  ui.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.stop.addEventListener("click", () => controller && controller.abort());
  ui.newChat.addEventListener("click", newChat);
  ui.reset.addEventListener("click", resetSettings);
  attachments.wire();
}

// ------------------------------------------------------------------------------------------------ chat
function requestBody(messages) {
  const body = {model: config.model, messages, stream: true, stream_options: {include_usage: true}};
  const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
  const t = number(ui.temperature), p = number(ui.topP), n = number(ui.maxTokens), s = number(ui.seed);
  if (t !== null) body.temperature = t;
  if (p !== null) body.top_p = p;
  if (n !== null) body.max_tokens = n;
  if (s !== null) body.seed = s;
  if (config.steerlm) {
    body.steerlm = {};
    for (const input of ui.sliders.querySelectorAll("input")) body.steerlm[input.dataset.attribute] = Number(input.value);
  }
  return body;
}

async function send() {
  if (!config || controller) return;
  const text = ui.message.value.trim();
  if (!text && !attachments.items.length) { setStatus("Type a message or add an image or a video."); return; }
  if (attachments.reading) { setStatus("Still reading the attachment; send again in a moment."); return; }
  // The attachments first, in the order they came: the server places each where its part stands, and
  // "<image>\n{question}" is the layout NeVA is trained and prompted with.
  const content = attachments.parts();
  if (text) content.push({type: "text", text});
  const userMsg = {role: "user", content};
  const body = JSON.stringify(requestBody([...history, userMsg]));
  const size = new TextEncoder().encode(body).length;
  if (size > config.limits.max_body_bytes) {  // the whole conversation goes with every request
    attachments.refuse(`This request would be ${formatBytes(size)} with the conversation so far; this server ` +
                       `takes up to ${formatBytes(config.limits.max_body_bytes)} (server.max_body_bytes). ` +
                       "Remove an attachment or start a New chat.");
    return;
  }
  attachments.refuse("");
  const sent = attachments.take();
  const userBubble = addBubble("user", text, sent);
  const answer = addBubble("assistant", "");
  answer.el.classList.add("streaming");
  ui.message.value = "";
  busy(true);
  const started = performance.now();
  let reply = "", usage = null, finish = null, failure = null;
  controller = new AbortController();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, signal: controller.signal,
      body,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const event of serverEvents(resp)) {
      if (event.error) throw new Error(describe(event.error));
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        answer.text.textContent = reply;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (!finish) throw new Error("the answer stream ended early");
  } catch (err) {
    failure = err.name === "AbortError" ? "Stopped." : err.message || String(err);
  } finally {
    controller = null;
    busy(false);
    answer.el.classList.remove("streaming");
  }
  const seconds = (performance.now() - started) / 1000;
  if (failure) {
    if (!reply) answer.el.remove();
    userBubble.el.classList.add("failed");
    showError(failure);
    // Nothing of this turn joins the history: put it back in the composer to edit and resend.
    ui.message.value = text;
    attachments.restore(sent);
  } else {
    history.push(userMsg, {role: "assistant", content: reply});
    answer.usage.textContent = usageText(usage, seconds, finish);
  }
  attachments.refreshPickers();
  ui.message.focus();
}

async function* serverEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function newChat() {
  if (controller) controller.abort();
  history = [];
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.message.value = "";
  attachments.clear();
  setStatus("");
  ui.message.focus();
}

// ------------------------------------------------------------------------------------------------ view
function addBubble(role, text, media = []) {
  ui.empty.hidden = true;
  const el = document.createElement("div");
  el.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  el.append(who);
  for (const item of media) {
    el.append(mediaElement(item, item.kind === "image" ? "Image sent" : `Video sent: ${item.name}`));
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  el.append(body);
  const usage = document.createElement("div");
  usage.className = "usage";
  if (role === "assistant") el.append(usage);
  ui.log.append(el);
  scrollDown();
  return {el, text: body, usage};
}

function showError(message) {
  const el = document.createElement("div");
  el.className = "error";
  el.setAttribute("role", "alert");
  el.textContent = "Error: " + message;
  ui.empty.hidden = true;
  ui.log.append(el);
  scrollDown();
}

function usageText(usage, seconds, finish) {
  const parts = [];
  if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  parts.push(`${seconds.toFixed(2)} s`);
  if (usage && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
  if (finish) parts.push(finish === "length" ? "stopped at max tokens" : "finished");
  return parts.join(" · ");
}

async function errorText(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (body && body.error) return describe(body.error);
  return `HTTP ${resp.status} ${resp.statusText}`.trim();
}

function describe(error) {
  return error.message + (error.param ? ` (${error.param})` : "");
}

function busy(on) {
  ui.send.disabled = on;
  ui.stop.hidden = !on;
  setStatus(on ? "Answering…" : "");
}

function setStatus(text) { ui.status.textContent = text; }
function scrollDown() { ui.log.scrollTop = ui.log.scrollHeight; }

init();
