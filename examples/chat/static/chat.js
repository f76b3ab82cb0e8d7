// The chat demo page: plain JS on top of the llmgine_ws browser client served by the app.
//
// It survives a dropped connection and a page reload: the client resumes the app (its session, the
// running engine, an open question), and the page keeps its transcript and the id of the command in
// progress in sessionStorage, so after a reload the reply goes on where it was and a confirm dialog
// that was open comes back.
import { LlmgineClient, CommandError, DisconnectedError, StateLostError } from "/api/client/llmgine-ws.js";

const params = new URLSearchParams(location.search);
const engineConfig = {};
if (params.has("token_delay")) engineConfig.token_delay = Number(params.get("token_delay"));
if (params.has("name")) engineConfig.name = params.get("name");
const engineName = engineConfig.name || "Ada";

const $ = (selector) => document.querySelector(selector);
const transcript = $("[data-testid=transcript]");
const form = $("[data-testid=composer]");
const input = $("[data-testid=input]");
const sendButton = $("[data-testid=send]");
const stopButton = $("[data-testid=stop]");
const pill = $("[data-testid=conn-state]");
const appIdLabel = $("[data-testid=app-id]");
const toasts = $("[data-testid=toasts]");

const client = new LlmgineClient("/api/ws", {
  reconnect: { initialDelay: Number(params.get("reconnect_delay") || 500), maxDelay: 8000 },
});

// ------------------------------------------------------------------ what a reload keeps

const STORE_KEY = "llmgine-chat-demo";
const store = (() => { try { return globalThis.sessionStorage; } catch { return null; } })();
/** {sessionId, transcript: [{role, text, kind?, status?, note?, events?}], running: {commandId, index} | null} */
const saved = (() => {
  try {
    const value = JSON.parse(store?.getItem(STORE_KEY) ?? "null");
    if (value && Array.isArray(value.transcript)) return value;
  } catch { /* nothing usable */ }
  return { sessionId: null, transcript: [], running: null };
})();

function save() {
  try { store?.setItem(STORE_KEY, JSON.stringify(saved)); } catch { /* storage full: a reload starts afresh */ }
}

let sessionId = null;
let running = null; // AbortController of the command in progress

// Tests and the console can reach the demo's state.
window.chatDemo = {
  client,
  get sessionId() { return sessionId; },
  get busy() { return running !== null; },
  get runningCommand() { return saved.running?.commandId ?? null; },
  stop() { running?.abort(); }, // what the Stop button does (also while a modal dialog makes it unreachable)
};

// ------------------------------------------------------------------ rendering helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function scrollDown() {
  transcript.scrollTop = transcript.scrollHeight;
}

function addSystem(text, kind = "", record = true) {
  $("[data-testid=empty]")?.remove();
  const line = el("div", `system ${kind}`.trim(), text);
  line.dataset.testid = "system";
  transcript.append(line);
  scrollDown();
  if (record) {
    saved.transcript.push({ role: "system", text, kind });
    save();
  }
  return line;
}

function addUser(text, record = true) {
  $("[data-testid=empty]")?.remove();
  const msg = el("div", "msg user");
  msg.dataset.testid = "message-user";
  msg.append(el("span", "who", "You"), el("div", "bubble", text || "(empty message)"));
  transcript.append(msg);
  scrollDown();
  if (record) {
    saved.transcript.push({ role: "user", text });
    save();
  }
}

/** An assistant bubble; `entry` is its record in the saved transcript (created unless given). */
function addAssistant(entry = null) {
  $("[data-testid=empty]")?.remove();
  if (entry === null) {
    entry = { role: "assistant", text: "", status: "streaming", note: "", events: [] };
    saved.transcript.push(entry);
    save();
  }
  const msg = el("div", "msg assistant");
  msg.dataset.testid = "message-assistant";
  msg.dataset.status = entry.status;
  const bubble = el("div", "bubble", entry.text);
  const events = el("div", "events");
  for (const [text, kind] of entry.events) events.append(el("span", `event ${kind}`.trim(), text));
  const note = el("span", "status-note", entry.note);
  msg.append(el("span", "who", engineName), events, bubble, note);
  transcript.append(msg);
  scrollDown();
  return {
    index: saved.transcript.indexOf(entry),
    append(text) { bubble.textContent += text; entry.text += text; save(); scrollDown(); },
    event(text, kind = "") {
      events.append(el("span", `event ${kind}`.trim(), text));
      entry.events.push([text, kind]);
      save();
      scrollDown();
    },
    finish(status, text = "") {
      msg.dataset.status = status;
      note.textContent = text;
      bubble.textContent = bubble.textContent.trimEnd();
      if (!bubble.textContent) bubble.textContent = status === "cancelled" ? "…" : "";
      Object.assign(entry, { status, note: text, text: bubble.textContent });
      save();
    },
  };
}

/** The transcript a previous page of this tab left (a reload): drawn again, assistant bubbles kept by index. */
const bubbles = new Map();
for (const entry of saved.transcript) {
  if (entry.role === "user") addUser(entry.text, false);
  else if (entry.role === "system") addSystem(entry.text, entry.kind ?? "", false);
  else if (entry.role === "assistant") bubbles.set(saved.transcript.indexOf(entry), addAssistant(entry));
}

function toast(title, message, kind = "info", ttl = 6000) {
  const node = el("div", `toast ${kind}`);
  node.dataset.testid = "toast";
  node.append(el("div", "toast-title", title), el("div", "toast-message", message));
  node.addEventListener("click", () => node.remove());
  toasts.append(node);
  setTimeout(() => node.remove(), ttl);
}

const STATE_LABELS = { idle: "idle", connecting: "connecting…", open: "connected", reconnecting: "reconnecting…", closed: "offline" };

function renderState() {
  pill.dataset.state = client.state;
  pill.querySelector(".label").textContent = STATE_LABELS[client.state] ?? client.state;
  appIdLabel.textContent = client.appId ? `app ${client.appId.slice(0, 8)}` : "—";
  sendButton.disabled = !(client.isOpen && sessionId) || running !== null;
}

function setBusy(controller) {
  running = controller;
  stopButton.hidden = controller === null;
  sendButton.hidden = controller !== null;
  renderState();
}

// ------------------------------------------------------------------ dialogs for server requests

/** Show a modal; resolves with the user's answer, rejects when dismissed; closes itself when `signal` aborts. */
function showDialog({ kicker, text, build, signal }) {
  return new Promise((resolve, reject) => {
    const dialog = el("dialog");
    dialog.dataset.testid = "dialog";
    const body = el("form", "dialog-body");
    body.method = "dialog";
    body.append(el("span", "dialog-kicker", kicker), el("p", "dialog-text", text));
    const finish = (action) => {
      signal.removeEventListener("abort", onAbort);
      if (dialog.open) dialog.close();
      dialog.remove();
      action();
    };
    const onAbort = () => finish(() => {
      toast("Request withdrawn", `The engine stopped waiting (${signal.reason?.details?.reason ?? "cancelled"}).`, "warning");
      reject(signal.reason);
    });
    build(body, (value) => finish(() => resolve(value)));
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      finish(() => reject(new Error("the user dismissed the dialog")));
    });
    dialog.append(body);
    document.body.append(dialog);
    signal.addEventListener("abort", onAbort, { once: true });
    dialog.showModal();
  });
}

client.onServerRequest("user_confirmation", async (data, { signal }) => {
  const selection = await showDialog({
    kicker: `${engineName} asks`,
    text: data.message,
    signal,
    build(body, answer) {
      const actions = el("div", "dialog-actions");
      data.options.forEach((option, index) => {
        const button = el("button", index === 0 ? "primary" : "", option);
        button.type = "button";
        button.dataset.option = option;
        button.addEventListener("click", () => answer(option));
        actions.append(button);
      });
      body.append(actions);
    },
  });
  return { selection };
});

client.onServerRequest("user_input", async (data, { signal }) => {
  const text = await showDialog({
    kicker: `${engineName} asks`,
    text: data.prompt,
    signal,
    build(body, answer) {
      const field = el("input");
      field.name = "answer";
      field.placeholder = "Type your answer…";
      field.dataset.testid = "dialog-input";
      const actions = el("div", "dialog-actions");
      const submit = el("button", "primary", "Answer");
      submit.type = "submit";
      body.addEventListener("submit", (event) => { event.preventDefault(); answer(field.value); });
      actions.append(submit);
      body.append(field, actions);
      queueMicrotask(() => field.focus());
    },
  });
  return { user_input: text };
});

// ------------------------------------------------------------------ connection

client.onNotification((data) => {
  const kind = { session_expired: "warning", engine_stopped: "warning", error: "error" }[data.notification_type] ?? "info";
  toast(data.notification_type.replaceAll("_", " "), data.message || JSON.stringify(data.additional_data ?? {}), kind);
});

client.on("statechange", renderState);

client.on("reconnecting", (event) => {
  const seconds = (event.detail.delay / 1000).toFixed(1);
  addSystem(`Connection lost — reconnecting in ${seconds} s (attempt ${event.detail.attempt})`, "warn");
});

// A drop or a reload was resumed: the session and its engine are still there. A command that was
// running before a reload goes on: follow it (before the replayed events arrive, hence here).
client.on("resumed", () => {
  sessionId = saved.sessionId;
  const command = saved.running;
  if (command && !running) {
    const reply = bubbles.get(command.index);
    if (reply) follow(client.attach(command.commandId, { onEvent: (event) => render(reply, event) }), reply, new AbortController());
  }
});

client.on("statelost", (event) => {
  addSystem(`The server could not resume this conversation (${event.detail.reason}) — starting a new session`, "warn");
  if (saved.running && !running) bubbles.get(saved.running.index)?.finish("failed", "Lost with the connection");
  saved.running = null;
  saved.sessionId = null;
  save();
});

client.on("open", async (event) => {
  if (event.detail.resumed === true && saved.sessionId) {
    sessionId = saved.sessionId;
    addSystem(event.detail.reconnected ? "Reconnected — the conversation goes on" : "Resumed — the conversation goes on");
    renderState();
    return;
  }
  sessionId = null;
  renderState();
  try {
    const id = await client.createSession();
    await client.createEngine(id, "chat", engineConfig);
    sessionId = saved.sessionId = id;
    save();
    addSystem(event.detail.reconnected
      ? "Reconnected — the server gave this connection a new session"
      : `Connected — session ${id.slice(0, 8)} with a chat engine`);
  } catch (error) {
    addSystem(`Could not start a session: ${error.message}`, "warn");
  }
  renderState();
});

// ------------------------------------------------------------------ chatting

function render(reply, event) {
  const payload = event.payload ?? {};
  if (event.event_type === "token") reply.append(payload.text ?? "");
  else if (event.event_type === "tool_call") reply.event(`⚙ ${payload.tool}(${Object.values(payload.args ?? {}).join(", ")})`);
  else if (event.event_type === "tool_result") reply.event(`✓ ${payload.result}`, "result");
  else reply.event(`${event.event_type}`);
}

/** Wait for a command (sent now, or followed after a reload) and show how it ended. */
async function follow(promise, reply, controller) {
  saved.running = { commandId: promise.messageId, index: reply.index };
  save();
  setBusy(controller);
  controller.signal.addEventListener("abort", () => client.cancel(promise.messageId).catch(() => {}), { once: true });
  try {
    const result = await promise;
    reply.finish("completed", result && result.turn ? `turn ${result.turn}` : "");
  } catch (error) {
    if (error instanceof CommandError && error.status === "cancelled") reply.finish("cancelled", "Stopped");
    else if (error instanceof StateLostError) reply.finish("failed", "Lost with the connection");
    else if (error instanceof DisconnectedError) reply.finish("failed", "Connection lost before the reply finished");
    else reply.finish("failed", error.message);
  } finally {
    if (saved.running?.commandId === promise.messageId) saved.running = null;
    save();
    setBusy(null);
  }
}

async function send(text) {
  if (!client.isOpen || !sessionId || running) return;
  addUser(text);
  const reply = addAssistant();
  const controller = new AbortController();
  const promise = client.command(sessionId, { text }, { onEvent: (event) => render(reply, event) });
  await follow(promise, reply, controller);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  input.value = "";
  send(text.trim());
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => running?.abort());

for (const chip of document.querySelectorAll(".chip")) {
  chip.addEventListener("click", () => send(chip.dataset.text));
}

renderState();
