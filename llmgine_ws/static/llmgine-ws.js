/**
 * llmgine-ws.js — the browser client of the llmgine_ws WebSocket protocol.
 *
 * One dependency-free ES module, served by every llmgine_ws app at `/api/client/llmgine-ws.js`
 * (types: `/api/client/llmgine-ws.d.ts`).
 *
 *   import { connect } from "/api/client/llmgine-ws.js";
 *   const client = await connect("/api/ws", { token });          // resolves once `connected` arrived
 *   client.onServerRequest("user_input", async (data, { signal }) => ({ user_input: await ask(data.prompt, signal) }));
 *   const sessionId = await client.createSession();
 *   await client.createEngine(sessionId, "chat");
 *   const result = await client.command(sessionId, { text: "hi" }, { onEvent: (e) => render(e) });
 *
 * Guarantees: every promise settles — a request is answered, rejected with a `ServerError` (error
 * envelope), a `RequestTimeoutError`, or a `DisconnectedError` the moment the connection drops; a
 * `server_request` with no handler is refused at once (a server-initiated frame of a custom type is a
 * server request when `onServerRequest` has a handler for that type); `server_request_cancelled` aborts the
 * handler's `AbortSignal`; `server_ping` is answered automatically; a lost connection is reopened
 * with exponential backoff and jitter.
 *
 * Resume (on by default, with a server that announces a `resume_token`): the client acks what it
 * received and, after a drop *or a page reload* (`{app_id, resume_token, last_seq}` are kept in
 * `sessionStorage`), sends `resume` first: sessions, engines, running commands and open questions
 * survive, every frame arrives once and in order, requests not answered are sent again with their
 * message_id, a question the server asks again brings its dialog back (a handler is never started
 * twice for one message_id). When the server cannot resume, what waited rejects with
 * `StateLostError` and a `statelost` event says so; the client goes on as a new app.
 */

export const SUBPROTOCOL = "llmgine.v1";
export const AUTH_SUBPROTOCOL_PREFIX = "llmgine.auth.";
export const DEFAULT_PATH = "/api/ws";

/** Characters allowed in a subprotocol (an RFC 7230 token): the token must be made of these. */
const TOKEN_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

// ------------------------------------------------------------------------------------------ errors

/** Base class of every error this client rejects with. `code` says what happened. */
export class LlmgineError extends Error {
  constructor(code, message, details = null, messageId = null) {
    super(message);
    this.name = "LlmgineError";
    /** @type {string} */ this.code = code;
    /** @type {unknown} */ this.details = details;
    /** @type {string | null} */ this.messageId = messageId;
  }
}

/** The server answered with an `error` envelope: `code`, `message`, `details` are the server's. */
export class ServerError extends LlmgineError {
  constructor(code, message, details, messageId) {
    super(code, message, details, messageId);
    this.name = "ServerError";
  }
}

/** No answer within the request's timeout (code `TIMEOUT`). */
export class RequestTimeoutError extends LlmgineError {
  constructor(message, messageId) {
    super("TIMEOUT", message, null, messageId);
    this.name = "RequestTimeoutError";
  }
}

/** The connection is not open, dropped while waiting, or was closed (codes `NOT_CONNECTED`, `DISCONNECTED`, `CLOSED`). */
export class DisconnectedError extends LlmgineError {
  constructor(code, message, details = null, messageId = null) {
    super(code, message, details, messageId);
    this.name = "DisconnectedError";
  }
}

/**
 * The server could not resume the app after a drop or a reload (code `STATE_LOST`): its sessions,
 * engines and pending requests are gone. `reason`: `unknown`, `expired`, `gap`, `disabled` or
 * `superseded` (the app was resumed elsewhere, e.g. by a duplicated tab).
 */
export class StateLostError extends LlmgineError {
  constructor(reason, previousAppId, appId, messageId = null) {
    super("STATE_LOST", `the server could not resume the app (${reason}): its sessions and pending requests are gone`,
      { reason, previousAppId, appId }, messageId);
    this.name = "StateLostError";
    /** @type {string} */ this.reason = reason;
    /** @type {string | null} */ this.previousAppId = previousAppId;
    /** @type {string | null} */ this.appId = appId;
  }
}

/** The caller's AbortSignal fired before the answer came (code `ABORTED`). */
export class AbortedError extends LlmgineError {
  constructor(message, reason, messageId) {
    super("ABORTED", message, reason ?? null, messageId);
    this.name = "AbortedError";
  }
}

/** An engine command ended `cancelled` or `failed`; `response` is its `engine_command_res` data. */
export class CommandError extends LlmgineError {
  constructor(response, messageId) {
    const cancelled = response.status === "cancelled";
    super(cancelled ? "COMMAND_CANCELLED" : "COMMAND_FAILED",
      cancelled ? "the command was cancelled" : (response.error || "the command failed"), response, messageId);
    this.name = "CommandError";
    /** @type {"cancelled" | "failed"} */ this.status = response.status;
    this.response = response;
  }
}

// ------------------------------------------------------------------------------------------ helpers

function newMessageId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  // Outside a secure context randomUUID is missing, getRandomValues is not.
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Resolve `/api/ws` or `http(s)://…` against the page into a `ws(s)://` URL. */
export function resolveUrl(url) {
  const base = globalThis.location ? globalThis.location.href : "http://localhost/";
  const u = new URL(url ?? DEFAULT_PATH, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.toString();
}

/**
 * The subprotocols to offer: `llmgine.v1`, then `llmgine.auth.<token>` when there is a token (the
 * server selects `llmgine.v1` and never echoes the token), then any extra ones.
 */
export function protocolsFor(token, extra = []) {
  const protocols = [SUBPROTOCOL];
  if (token) {
    if (typeof token !== "string" || !TOKEN_CHARS.test(token)) {
      throw new LlmgineError("INVALID_TOKEN", "a token must be a non-empty string of subprotocol-safe characters (e.g. base64url)");
    }
    protocols.push(AUTH_SUBPROTOCOL_PREFIX + token);
  }
  return protocols.concat(extra);
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function errorText(error) {
  if (error instanceof Error) return error.message || error.name;
  return typeof error === "string" ? error : JSON.stringify(error);
}

const DEFAULT_RECONNECT = Object.freeze({ initialDelay: 500, maxDelay: 15000, factor: 2, jitter: 0.5, maxRetries: Infinity });

const ANSWERED_LIMIT = 1000; // server-request answers remembered, to answer a re-sent request again

/** sessionStorage, or null where there is none (Node, a sandboxed frame) or it throws. */
function sessionStore() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------------------------------ client

/**
 * A connection to an llmgine_ws server, reopened by itself when it drops.
 *
 * Events (an `EventTarget`; `client.on(name, fn)` returns an unsubscribe function; `event.detail`):
 *  - `statechange` {state, previous}: every change of `client.state`.
 *  - `connecting` {attempt}: a socket is being opened.
 *  - `open` {appId, reconnected, resumed}: the connection is ready; requests may be sent. `resumed` is
 *    `true` when a resume restored the app, `false` when one was refused, `null` when none was tried.
 *  - `resumed` {appId, replayed, sessions}: a drop or reload was resumed (fired before `open`, and
 *    before the replayed frames: attach to a command started before a reload here, see `attach`).
 *  - `statelost` {error, reason, previousAppId, appId}: the server could not resume; pending
 *    promises were rejected with `StateLostError` first.
 *  - `disconnect` {code, reason, wasClean}: the socket was lost (every pending promise is rejected first).
 *  - `reconnecting` {attempt, delay, code, reason}: waiting `delay` ms before the next attempt.
 *  - `closed` {code, reason}: for good (`close()` was called, or reconnecting is off or gave up).
 *  - `message` {message}: every message received.
 *  - `requestcancelled` {messageId, reason}: the server withdrew a server_request.
 *  - `protocolerror` {error}: an error envelope that answers none of our requests.
 */
export class LlmgineClient extends EventTarget {
  /**
   * @param {string | URL} [url] the WebSocket endpoint: `ws(s)://…`, `http(s)://…` or a path such as
   *   `/api/ws` (resolved against the page). Defaults to `/api/ws`.
   * @param {object} [options] see `LlmgineClientOptions` in llmgine-ws.d.ts.
   */
  constructor(url, options = {}) {
    super();
    this.url = resolveUrl(url);
    this.options = {
      token: options.token ?? null,
      protocols: options.protocols ?? [],
      requestTimeout: options.requestTimeout ?? 30000,
      connectTimeout: options.connectTimeout ?? 10000,
      reconnect: options.reconnect === false ? false : { ...DEFAULT_RECONNECT, ...(options.reconnect === true ? {} : options.reconnect ?? {}) },
      WebSocket: options.WebSocket ?? globalThis.WebSocket,
      logger: options.logger ?? globalThis.console,
      resume: options.resume !== false,
      persist: options.persist === false ? null : (options.persist ?? `llmgine-ws:resume:${resolveUrl(url)}`),
      ackInterval: options.ackInterval ?? 1000,
      ackFrames: options.ackFrames ?? 64,
    };
    /** @type {"idle" | "connecting" | "open" | "reconnecting" | "closed"} */
    this.state = "idle";
    /** The app_id the server gave the current connection (`null` while not open). */
    this.appId = null;
    if (typeof this.options.token === "string") protocolsFor(this.options.token); // fail now on a bad token
    this._ws = null;
    this._openSeq = 0;
    this._attempt = 0;
    this._everOpened = false;
    this._retryTimer = null;
    this._connectTimer = null;
    this._pending = new Map(); // message_id -> {resolve, reject, timer, kind, onEvent, type, cleanup}
    this._abandoned = new Set(); // requests given up (timeout, abort): their late answers are dropped quietly
    this._requestHandlers = new Map(); // request_type -> handler
    this._running = new Map(); // server_request message_id -> AbortController
    this._notificationHandlers = new Map(); // notification_type | "*" -> Set
    this._messageHandlers = new Map(); // type | "*" -> Set
    this._onOnline = () => this.reconnectNow();
    /** Resume state: the app to resume, its single-use token, the last seq received and acked. */
    this._rs = { appId: null, token: null, window: 0, lastSeq: 0, ackedSeq: -1 };
    this._resuming = null; // {messageId, held: [], previousAppId} while waiting for resume_res
    this._answered = new Map(); // server request message_id -> answer fields
    this._ackTimer = null;
    /** How the last resume ended: `null` before any, then `true` or `false`. */
    this.resumed = null;
    this._restore();
    // Connect in a microtask, so that listeners added right after `new` see the first events too.
    this._autoConnect = options.autoConnect !== false;
    if (this._autoConnect) {
      queueMicrotask(() => {
        if (this._autoConnect) this.connect().catch(() => {});
      });
    }
  }

  // -------------------------------------------------------------------- connection state

  /** Whether requests can be sent now. */
  get isOpen() {
    return this.state === "open";
  }

  /**
   * Start connecting (if idle or closed) and resolve with the app_id once open.
   * Rejects with a `DisconnectedError` if the client is closed first, or a `RequestTimeoutError` after `timeout` ms.
   */
  connect({ timeout } = {}) {
    this._autoConnect = false;
    if (this.state === "idle" || this.state === "closed") {
      this._attempt = 0;
      if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);
      this._open();
    }
    return this.opened({ timeout });
  }

  /** Resolve with the app_id when the connection is (next) open; never starts a connection. */
  opened({ timeout } = {}) {
    if (this.state === "open") return Promise.resolve(this.appId);
    if ((this.state === "idle" && !this._autoConnect) || this.state === "closed") {
      return Promise.reject(new DisconnectedError("NOT_CONNECTED", `the client is ${this.state}`));
    }
    return new Promise((resolve, reject) => {
      let timer = null;
      const done = () => {
        offOpen();
        offClosed();
        if (timer !== null) clearTimeout(timer);
      };
      const offOpen = this.on("open", (e) => { done(); resolve(e.detail.appId); });
      const offClosed = this.on("closed", (e) => {
        done();
        reject(new DisconnectedError("CLOSED", `the connection closed (${e.detail.reason || e.detail.code})`, e.detail));
      });
      if (timeout != null && timeout > 0) {
        timer = setTimeout(() => { done(); reject(new RequestTimeoutError(`not connected within ${timeout} ms`, null)); }, timeout);
      }
    });
  }

  /**
   * Close for good: no reconnect; every pending promise is rejected with `DisconnectedError` (code
   * `CLOSED`). Code 1000 (the default) is a goodbye: the server ends the app at once, and the saved
   * resume state is forgotten.
   */
  close(code = 1000, reason = "client closed") {
    this._autoConnect = false;
    if (code === 1000) this._forgetResume();
    if (this.state === "closed") return;
    this._openSeq += 1;
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try { ws.close(code, reason); } catch { /* already closing */ }
    }
    this._failEverything(new DisconnectedError("CLOSED", `the client was closed: ${reason}`, { code, reason }));
    this.appId = null;
    this._setState("closed");
    this._emit("closed", { code, reason });
  }

  /** While waiting to reconnect, try right away (also done on the browser's `online` event). */
  reconnectNow() {
    if (this.state !== "reconnecting") return;
    this._clearTimers();
    this._open();
  }

  /** Whether a drop (or reload) now would be resumed: resume is on and the server gave a token. */
  get resumable() {
    return this.options.resume && !!this._rs.token;
  }

  /** The highest `seq` received from the server (0 before any, or without resume). */
  get lastSeq() {
    return this._rs.lastSeq;
  }

  /** `client.on("open", fn)` = addEventListener; returns the function that removes it. */
  on(type, listener) {
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  // -------------------------------------------------------------------- requests

  /**
   * Send a message and resolve with the server's reply message (`{type, message_id, data}`).
   * Rejects with `ServerError` (error envelope), `RequestTimeoutError` (after `timeout` ms, default
   * `requestTimeout`; 0 = none), `DisconnectedError` (not open, or the connection dropped) or
   * `AbortedError` (`signal` fired; a `cancel` is sent for the request).
   */
  request(type, data = {}, { timeout, signal } = {}) {
    return this._track(type, data, { kind: "request", timeout: timeout ?? this.options.requestTimeout, signal });
  }

  /** Send a message expecting no reply; returns its message_id. Throws `DisconnectedError` when not open. */
  send(type, data = {}, messageId = newMessageId()) {
    if (!this._sendFrame({ type, message_id: messageId, data })) {
      throw new DisconnectedError("NOT_CONNECTED", `cannot send '${type}': the client is ${this.state}`, null, messageId);
    }
    return messageId;
  }

  /** Round trip time of a `ping`, in milliseconds. */
  async ping({ timeout } = {}) {
    const started = performance.now();
    await this.request("ping", { timestamp: new Date().toISOString() }, { timeout });
    return performance.now() - started;
  }

  /** Create a session owned by this connection; resolves with its session_id. */
  async createSession() {
    const reply = await this.request("create_session", {});
    return reply.data.session_id;
  }

  /** `status_res` data of one of this connection's sessions. */
  async status(sessionId) {
    return (await this.request("status", { session_id: sessionId })).data;
  }

  /** Close a session (its engine is stopped); resolves with `close_session_res` data. */
  async closeSession(sessionId) {
    return (await this.request("close_session", { session_id: sessionId })).data;
  }

  /** Create the session's engine; resolves with `create_engine_res` data ({session_id, engine_id, engine_type}). */
  async createEngine(sessionId, engineType, config = {}) {
    return (await this.request("create_engine", { session_id: sessionId, engine_type: engineType, config })).data;
  }

  /** Stop and delete the session's engine (the session stays). */
  async deleteEngine(sessionId) {
    return (await this.request("delete_engine", { session_id: sessionId })).data;
  }

  /**
   * Run an engine command. `onEvent(data, message)` gets each `engine_event` in order; the promise
   * resolves with the command's `result` when it completes, and rejects with `CommandError` when it
   * ends `cancelled` or `failed` (plus the `request` rejections). `signal` sends a `cancel`; the
   * promise then settles with the server's final answer. The returned promise has `messageId`
   * (the command id, for `cancel`). No timeout unless `timeout` (ms) is given.
   */
  command(sessionId, command, { onEvent, signal, timeout = 0 } = {}) {
    return this._track("engine_command", { session_id: sessionId, command }, { kind: "command", timeout, signal, onEvent });
  }

  /**
   * Follow a command started before a page reload (its `messageId`, kept by the page): `onEvent` gets
   * its events from the resume on, and the promise settles like `command()`'s. Nothing is sent. Call
   * it from a `resumed` listener (or an `open` one with `resumed: true`), before the replay arrives.
   */
  attach(messageId, { onEvent, signal, timeout = 0 } = {}) {
    return this._track("engine_command", null, { kind: "command", timeout, signal, onEvent, messageId, send: false });
  }

  /** Cancel a running request of ours (e.g. a command) by its message_id; resolves with `cancel_res` data. */
  async cancel(messageId) {
    return (await this.request("cancel", { target_message_id: messageId })).data;
  }

  // -------------------------------------------------------------------- server-initiated messages

  /**
   * Answer server requests of `requestType`: `server_request` frames whose `request_type` is
   * `requestType`, and server-initiated frames whose own `type` is `requestType` (what the backend's
   * `send_to_app_and_wait(appId, "ask_color", data)` sends; without a handler such a frame is an
   * ordinary message for `onMessage`). The handler gets the request's
   * data and `{signal, messageId, message, client}`; its return value (an object, or nothing) becomes
   * the `server_response` data (with `response_type` added); a thrown error becomes `{error}`. The
   * signal aborts when the server withdraws the request or the connection drops; then no answer is sent.
   * One handler per type (a new one replaces the old). Returns an unsubscribe function.
   */
  onServerRequest(requestType, handler) {
    this._requestHandlers.set(requestType, handler);
    return () => {
      if (this._requestHandlers.get(requestType) === handler) this._requestHandlers.delete(requestType);
    };
  }

  /**
   * Receive notifications: `onNotification(handler)` for all, or `onNotification(type, handler)` for one
   * `notification_type`. The handler gets `(data, message)`. Returns an unsubscribe function.
   */
  onNotification(typeOrHandler, maybeHandler) {
    const [type, handler] = typeof typeOrHandler === "function" ? ["*", typeOrHandler] : [typeOrHandler, maybeHandler];
    return this._subscribe(this._notificationHandlers, type, handler);
  }

  /** Every received message of `type` (`"*"` for all, e.g. custom server messages): `handler(data, message)`. */
  onMessage(type, handler) {
    return this._subscribe(this._messageHandlers, type, handler);
  }

  // -------------------------------------------------------------------- internals: socket

  _open() {
    this._attempt += 1;
    const attempt = ++this._openSeq;
    this._setState("connecting");
    this._emit("connecting", { attempt: this._attempt });
    Promise.resolve()
      .then(() => (typeof this.options.token === "function" ? this.options.token() : this.options.token))
      .then((token) => {
        if (attempt !== this._openSeq || this.state !== "connecting") return; // closed meanwhile
        const ws = new this.options.WebSocket(this.url, protocolsFor(token, this.options.protocols));
        this._ws = ws;
        ws.onmessage = (event) => { if (ws === this._ws) this._onFrame(event.data); };
        ws.onclose = (event) => { if (ws === this._ws) this._socketLost(ws, event.code, event.reason, event.wasClean); };
        ws.onerror = () => { /* a close event follows */ };
        if (this.options.connectTimeout > 0) {
          this._connectTimer = setTimeout(() => {
            if (ws === this._ws && this.state === "connecting") {
              this._socketLost(ws, 4008, `no 'connected' message within ${this.options.connectTimeout} ms`, false);
            }
          }, this.options.connectTimeout);
        }
      })
      .catch((error) => {
        if (attempt !== this._openSeq || this.state !== "connecting") return;
        this.options.logger.error("llmgine-ws: cannot open", this.url, error);
        this._socketLost(null, 1006, errorText(error), false);
      });
  }

  _detach(ws) {
    ws.onmessage = ws.onclose = ws.onerror = ws.onopen = null;
  }

  /**
   * The socket is gone (or never came): fail what waited on it — unless the app will be resumed,
   * then it waits for the new connection — and reconnect or close.
   */
  _socketLost(ws, code, reason, wasClean) {
    if (ws) {
      this._detach(ws);
      if (ws.readyState === 0 || ws.readyState === 1) {
        try { ws.close(); } catch { /* nothing to do */ }
      }
    }
    this._ws = null;
    this._clearTimers();
    this._openSeq += 1;
    this._resuming = null;
    const wasOpen = this.state === "open";
    const policy = this.options.reconnect;
    const givingUp = !policy || this._attempt >= policy.maxRetries + 1;
    if (code === 4000 && this._rs.token) {
      // "superseded": the app was resumed on another connection (a duplicated tab): it is not ours any more.
      const previous = this._rs.appId;
      this._rs = { appId: null, token: null, window: 0, lastSeq: 0, ackedSeq: -1 };
      this._persist();
      this._stateLost("superseded", previous);
    }
    if (givingUp || !this.resumable) {
      this._failEverything(new DisconnectedError("DISCONNECTED", `the connection was lost (${reason || code})`, { code, reason }));
    }
    this.appId = null;
    this._emit("disconnect", { code, reason, wasClean, wasOpen });
    if (givingUp) {
      if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
      this._setState("closed");
      this._emit("closed", { code, reason });
      return;
    }
    const base = Math.min(policy.maxDelay, policy.initialDelay * Math.pow(policy.factor, Math.max(0, this._attempt - 1)));
    const delay = Math.round(base * (1 - policy.jitter * Math.random()));
    this._setState("reconnecting");
    this._emit("reconnecting", { attempt: this._attempt, delay, code, reason });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this.state === "reconnecting") this._open();
    }, delay);
  }

  _clearTimers() {
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    if (this._connectTimer !== null) clearTimeout(this._connectTimer);
    if (this._ackTimer !== null) clearInterval(this._ackTimer);
    this._retryTimer = this._connectTimer = this._ackTimer = null;
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("statechange", { state, previous });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _sendFrame(frame) {
    const ws = this._ws;
    if (!ws || this.state !== "open" || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _failEverything(error) {
    const pending = Array.from(this._pending.entries());
    this._pending.clear();
    this._abandoned.clear();
    for (const [messageId, entry] of pending) {
      entry.cleanup();
      entry.reject(new DisconnectedError(error.code, error.message, error.details, messageId));
    }
    const running = Array.from(this._running.values());
    this._running.clear();
    this._answered.clear();
    for (const controller of running) controller.abort(error);
  }

  // -------------------------------------------------------------------- internals: resume

  /** Load `{appId, token, lastSeq}` saved by a previous page (a reload resumes). */
  _restore() {
    const store = this.options.persist && sessionStore();
    if (!store || !this.options.resume) return;
    try {
      const saved = JSON.parse(store.getItem(this.options.persist) ?? "null");
      if (saved && typeof saved.appId === "string" && typeof saved.token === "string" && Number.isInteger(saved.lastSeq)) {
        this._rs = { appId: saved.appId, token: saved.token, window: 0, lastSeq: saved.lastSeq, ackedSeq: -1 };
      }
    } catch { /* nothing usable saved */ }
  }

  _persist() {
    const store = this.options.persist && sessionStore();
    if (!store) return;
    try {
      if (this.options.resume && this._rs.token) {
        store.setItem(this.options.persist, JSON.stringify({ appId: this._rs.appId, token: this._rs.token, lastSeq: this._rs.lastSeq }));
      } else {
        store.removeItem(this.options.persist);
      }
    } catch { /* storage full or denied: a reload will not resume */ }
  }

  _forgetResume() {
    this._rs = { appId: null, token: null, window: 0, lastSeq: 0, ackedSeq: -1 };
    this._persist();
  }

  /** The server could not resume: what waited on the old app rejects with `StateLostError`. */
  _stateLost(reason, previousAppId) {
    const error = new StateLostError(reason, previousAppId, this._rs.appId);
    const pending = Array.from(this._pending.entries());
    this._pending.clear();
    this._abandoned.clear();
    for (const [messageId, entry] of pending) {
      entry.cleanup();
      entry.reject(new StateLostError(reason, previousAppId, this._rs.appId, messageId));
    }
    const running = Array.from(this._running.values());
    this._running.clear();
    this._answered.clear();
    for (const controller of running) controller.abort(error);
    this._emit("statelost", { error, reason, previousAppId, appId: this._rs.appId });
  }

  /** Ack what arrived: at once the first time (it opts in) and every `ackFrames` frames, else periodically. */
  _maybeAck(periodic) {
    const rs = this._rs;
    if (!this.resumable || this.state !== "open") return;
    const unacked = rs.lastSeq - rs.ackedSeq;
    if (rs.ackedSeq < 0 || unacked >= this.options.ackFrames || (periodic && unacked > 0)) {
      if (this._sendFrame({ type: "ack", message_id: newMessageId(), data: { seq: rs.lastSeq } })) rs.ackedSeq = rs.lastSeq;
    }
  }

  _onResumeRes(message, data) {
    const resuming = this._resuming;
    this._resuming = null;
    const previousAppId = this._rs.appId;
    if (message.type === "resume_res" && data.resumed === true) {
      this._rs.appId = typeof data.app_id === "string" ? data.app_id : previousAppId;
      this._rs.token = typeof data.resume_token === "string" ? data.resume_token : null;
      this._rs.ackedSeq = -1;
      this._persist();
      this.resumed = true;
      this._ready(this._rs.appId, true, () => {
        // Requests not answered before the drop go out again, same message_id: the server runs each once.
        for (const entry of this._pending.values()) if (entry.frame) this._ws.send(entry.frame);
        this._emit("resumed", { appId: this._rs.appId, replayed: data.replayed ?? 0, sessions: data.sessions ?? [] });
      });
      return;
    }
    const next = resuming.next;
    const failed = message.type === "resume_res";
    const reason = failed ? (typeof data.reason === "string" ? data.reason : "unknown") : "disabled";
    this._rs = {
      appId: (failed && typeof data.app_id === "string") ? data.app_id : (next.app_id ?? null),
      token: (failed && typeof data.resume_token === "string") ? data.resume_token : (next.resume_token ?? null),
      window: next.resume_window ?? 0, lastSeq: 0, ackedSeq: -1,
    };
    this._persist();
    this.resumed = false;
    this._ready(this._rs.appId, false, () => this._stateLost(reason, previousAppId));
    for (const held of resuming.held) this._onMessage(held);
  }

  /** The connection is usable: state `open`, acks started, `before()` run, then the `open` event. */
  _ready(appId, resumed, before = null) {
    if (this._connectTimer !== null) clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this.appId = appId ?? null;
    const reconnected = this._everOpened;
    this._everOpened = true;
    this._attempt = 0;
    this._setState("open");
    if (this.resumable && this.options.ackInterval > 0) {
      this._ackTimer = setInterval(() => this._maybeAck(true), this.options.ackInterval);
    }
    if (before) before();
    this._maybeAck(false);
    this._emit("open", { appId: this.appId, reconnected, resumed });
  }

  // -------------------------------------------------------------------- internals: requests

  _track(type, data, { kind, timeout, signal, onEvent, messageId = newMessageId(), send = true }) {
    let entry = null;
    const promise = new Promise((resolve, reject) => {
      if (signal && signal.aborted) {
        reject(new AbortedError(`'${type}' aborted before it was sent`, signal.reason, messageId));
        return;
      }
      let timer = null;
      const onAbort = () => {
        if (this._pending.get(messageId) !== entry) return;
        if (kind === "command") {
          // The server has the final word: it answers the command `cancelled` (or `completed` if it won the race).
          this.cancel(messageId).catch(() => {});
          return;
        }
        this._pending.delete(messageId);
        entry.cleanup();
        this._abandon(messageId);
        reject(new AbortedError(`'${type}' was aborted`, signal.reason, messageId));
      };
      const frame = send ? { type, message_id: messageId, data } : null;
      entry = {
        type, kind, onEvent, resolve, reject,
        frame: frame && JSON.stringify(frame), // sent again after a resume
        cleanup: () => {
          if (timer !== null) clearTimeout(timer);
          if (signal) signal.removeEventListener("abort", onAbort);
        },
      };
      // While a resumable connection is being reopened, the request waits: it goes out after the resume.
      const waits = this.resumable && (this.state === "reconnecting" || this.state === "connecting");
      if (frame && !this._sendFrame(frame) && !waits) {
        reject(new DisconnectedError("NOT_CONNECTED", `cannot send '${type}': the client is ${this.state}`, null, messageId));
        return;
      }
      this._pending.set(messageId, entry);
      if (timeout && timeout > 0) {
        timer = setTimeout(() => {
          if (this._pending.get(messageId) !== entry) return;
          this._pending.delete(messageId);
          entry.cleanup();
          this._abandon(messageId);
          reject(new RequestTimeoutError(`no answer to '${type}' within ${timeout} ms`, messageId));
        }, timeout);
      }
      if (signal) signal.addEventListener("abort", onAbort, { once: true });
    });
    promise.messageId = messageId;
    return promise;
  }

  /** Nobody waits for this request any more: let the server stop the work, and drop its late answer. */
  _abandon(messageId) {
    this._abandoned.add(messageId);
    if (this._abandoned.size > 1000) this._abandoned.delete(this._abandoned.values().next().value);
    this._sendFrame({ type: "cancel", message_id: newMessageId(), data: { target_message_id: messageId } });
  }

  _settle(message) {
    const entry = this._pending.get(message.message_id);
    if (!entry) return false;
    if (entry.kind === "command" && message.type !== "engine_command_res" && message.type !== "error") return false;
    this._pending.delete(message.message_id);
    entry.cleanup();
    const data = message.data ?? {};
    if (message.type === "error") {
      entry.reject(new ServerError(data.code ?? "ERROR", data.message ?? "request failed", data.details ?? null, message.message_id));
    } else if (entry.kind === "command") {
      if (data.status === "completed") entry.resolve(data.result);
      else entry.reject(new CommandError(data, message.message_id));
    } else {
      entry.resolve(message);
    }
    return true;
  }

  // -------------------------------------------------------------------- internals: inbound

  _onFrame(raw) {
    if (typeof raw !== "string") return; // the protocol is JSON text frames only
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      this.options.logger.warn("llmgine-ws: ignored a frame that is not JSON");
      return;
    }
    if (!isPlainObject(message) || typeof message.type !== "string") return;
    if (this._resuming && message.type !== "connected") {
      const data = isPlainObject(message.data) ? message.data : {};
      if (message.type === "resume_res" || (message.type === "error" && message.message_id === this._resuming.messageId)) {
        this._onResumeRes(message, data);
      } else if (this._resuming.held.length < 1000) {
        this._resuming.held.push(message); // the new connection's own app: delivered if the resume fails
      }
      return;
    }
    this._onMessage(message);
  }

  _onMessage(message) {
    const seq = message.seq;
    const counted = this.options.resume && Number.isInteger(seq);
    if (counted && seq <= this._rs.lastSeq) return; // seen already: a replay overlapping what had arrived
    const data = isPlainObject(message.data) ? message.data : {};
    switch (message.type) {
      case "connected":
        this._onConnected(data);
        break;
      case "server_ping":
        this._sendFrame({ type: "server_pong", message_id: message.message_id,
          data: { timestamp: data.timestamp, server_timestamp: new Date().toISOString() } });
        break;
      case "server_request":
        this._onServerRequest(message, data);
        break;
      case "server_request_cancelled":
        this._onRequestCancelled(data);
        break;
      case "notification":
        this._call(this._notificationHandlers, data.notification_type, data, message);
        this._call(this._notificationHandlers, "*", data, message);
        break;
      case "engine_event": {
        const entry = this._pending.get(data.command_id);
        if (entry && entry.kind === "command" && entry.onEvent) {
          try { entry.onEvent(data, message); } catch (error) { this.options.logger.error("llmgine-ws: onEvent failed", error); }
        }
        break;
      }
      default:
        // send_to_app_and_wait(app, "ask_color", data) sends a frame of type ask_color that waits for
        // a server_response: it is a server request when a handler is registered for that type.
        if (message.server_initiated && this._requestHandlers.has(message.type)) {
          this._onServerRequest(message, data, message.type);
          break;
        }
        if (!message.server_initiated && this._abandoned.delete(message.message_id)) break;
        if (!message.server_initiated && !this._settle(message) && message.type === "error") {
          this._emit("protocolerror", { error: new ServerError(data.code, data.message, data.details ?? null, message.message_id) });
        }
    }
    this._emit("message", { message });
    this._call(this._messageHandlers, message.type, data, message);
    this._call(this._messageHandlers, "*", data, message);
    if (counted && this._rs.token) {
      // Only now: a page unloaded in the middle of the handlers gets this frame again after its reload.
      this._rs.lastSeq = seq;
      this._persist();
      this._maybeAck(false);
    }
  }

  _onConnected(data) {
    if (this.options.resume && this._rs.token && this._rs.appId && this._ws) {
      // A drop or a reload: the first message is `resume`; the connection is ours once resume_res says so.
      const messageId = newMessageId();
      this._resuming = { messageId, held: [], next: data };
      this._ws.send(JSON.stringify({ type: "resume", message_id: messageId,
        data: { app_id: this._rs.appId, resume_token: this._rs.token, last_seq: this._rs.lastSeq } }));
      return;
    }
    this._rs = { appId: data.app_id ?? null, token: typeof data.resume_token === "string" ? data.resume_token : null,
      window: data.resume_window ?? 0, lastSeq: 0, ackedSeq: -1 };
    this._persist();
    this._ready(data.app_id ?? null, null);
  }

  _onServerRequest(message, data, requestType = data.request_type) {
    const messageId = message.message_id;
    if (this._running.has(messageId)) return; // sent again (after a resume) while its dialog is open: answered once
    const answered = this._answered.get(messageId);
    if (answered) {
      // Answered already, but the answer was lost with the old connection: the same answer again.
      this._sendFrame({ type: "server_response", message_id: messageId, data: answered });
      return;
    }
    const handler = this._requestHandlers.get(requestType);
    const ws = this._ws;
    const answer = (fields) => {
      // Without resume the request died with its connection; with it, the answer goes out now or,
      // lost, again when the server asks again after the resume.
      if (ws !== this._ws && !this.resumable) return;
      const reply = { ...fields, response_type: requestType };
      this._answered.set(messageId, reply);
      if (this._answered.size > ANSWERED_LIMIT) this._answered.delete(this._answered.keys().next().value);
      this._sendFrame({ type: "server_response", message_id: messageId, data: reply });
    };
    if (!handler) {
      answer({ error: `this client has no handler for request type '${requestType}'` });
      return;
    }
    const controller = new AbortController();
    this._running.set(messageId, controller);
    const context = { signal: controller.signal, messageId, message, client: this };
    Promise.resolve()
      .then(() => handler(data, context))
      .then(
        (value) => {
          if (controller.signal.aborted) return;
          answer(value === undefined || value === null ? {} : isPlainObject(value) ? value : { value });
        },
        (error) => {
          if (!controller.signal.aborted) answer({ error: errorText(error) });
        },
      )
      .finally(() => {
        if (this._running.get(messageId) === controller) this._running.delete(messageId);
      });
  }

  _onRequestCancelled(data) {
    const controller = this._running.get(data.message_id);
    this._running.delete(data.message_id);
    const reason = data.reason ?? "cancelled";
    if (controller) {
      controller.abort(new LlmgineError("REQUEST_WITHDRAWN", `the server withdrew the request (${reason})`, { reason }, data.message_id));
    }
    this._emit("requestcancelled", { messageId: data.message_id, reason });
  }

  _subscribe(map, key, handler) {
    if (!map.has(key)) map.set(key, new Set());
    map.get(key).add(handler);
    return () => map.get(key)?.delete(handler);
  }

  _call(map, key, data, message) {
    const handlers = map.get(key);
    if (!handlers) return;
    for (const handler of Array.from(handlers)) {
      try {
        handler(data, message);
      } catch (error) {
        this.options.logger.error(`llmgine-ws: a '${key}' handler failed`, error);
      }
    }
  }
}

/** Create a client and resolve with it once it is open (rejects like `client.connect()`). */
export async function connect(url, options = {}) {
  const client = new LlmgineClient(url, { ...options, autoConnect: false });
  await client.connect({ timeout: options.timeout });
  return client;
}
