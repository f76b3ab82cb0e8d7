// The chat demo page: plain JS on top of the llmgine_ws browser client served by the app.
import { LlmgineClient, CommandError, DisconnectedError } from "/api/client/llmgine-ws.js";

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

let sessionId = null;
let running = null; // AbortController of the command in progress

// Tests and the console can reach the demo's state.
window.chatDemo = {
  client,
  get sessionId() { return sessionId; },
  get busy() { return running !== null; },
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

function addSystem(text, kind = "") {
  $("[data-testid=empty]")?.remove();
  const line = el("div", `system ${kind}`.trim(), text);
  line.dataset.testid = "system";
  transcript.append(line);
  scrollDown();
  return line;
}

function addUser(text) {
  $("[data-testid=empty]")?.remove();
  const msg = el("div", "msg user");
  msg.dataset.testid = "message-user";
  msg.append(el("span", "who", "You"), el("div", "bubble", text || "(empty message)"));
  transcript.append(msg);
  scrollDown();
}

function addAssistant() {
  const msg = el("div", "msg assistant");
  msg.dataset.testid = "message-assistant";
  msg.dataset.status = "streaming";
  const bubble = el("div", "bubble");
  const events = el("div", "events");
  const note = el("span", "status-note");
  msg.append(el("span", "who", engineName), events, bubble, note);
  transcript.append(msg);
  scrollDown();
  return {
    append(text) { bubble.textContent += text; scrollDown(); },
    event(text, kind = "") { events.append(el("span", `event ${kind}`.trim(), text)); scrollDown(); },
    finish(status, text = "") {
      msg.dataset.status = status;
      note.textContent = text;
      bubble.textContent = bubble.textContent.trimEnd();
      if (!bubble.textContent) bubble.textContent = status === "cancelled" ? "…" : "";
    },
  };
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

client.on("open", async (event) => {
  sessionId = null;
  renderState();
  try {
    const id = await client.createSession();
    await client.createEngine(id, "chat", engineConfig);
    sessionId = id;
    addSystem(event.detail.reconnected
      ? "Reconnected — the server gave this connection a new session"
      : `Connected — session ${id.slice(0, 8)} with a chat engine`);
  } catch (error) {
    addSystem(`Could not start a session: ${error.message}`, "warn");
  }
  renderState();
});

// ------------------------------------------------------------------ chatting

async function send(text) {
  if (!client.isOpen || !sessionId || running) return;
  addUser(text);
  const reply = addAssistant();
  const controller = new AbortController();
  setBusy(controller);
  try {
    const result = await client.command(sessionId, { text }, {
      signal: controller.signal,
      onEvent(event) {
        const payload = event.payload ?? {};
        if (event.event_type === "token") reply.append(payload.text ?? "");
        else if (event.event_type === "tool_call") reply.event(`⚙ ${payload.tool}(${Object.values(payload.args ?? {}).join(", ")})`);
        else if (event.event_type === "tool_result") reply.event(`✓ ${payload.result}`, "result");
        else reply.event(`${event.event_type}`);
      },
    });
    reply.finish("completed", result && result.turn ? `turn ${result.turn}` : "");
  } catch (error) {
    if (error instanceof CommandError && error.status === "cancelled") reply.finish("cancelled", "Stopped");
    else if (error instanceof DisconnectedError) reply.finish("failed", "Connection lost before the reply finished");
    else reply.finish("failed", error.message);
  } finally {
    setBusy(null);
  }
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
