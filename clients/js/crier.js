// crier-client: a client for Crier, a publish/subscribe broker over WebSocket.
//
// One ES module without a build step, for browsers (`<script type="module">`) and Node 20+.
// It uses the global `WebSocket` where there is one and the `ws` package otherwise, and loads
// `@msgpack/msgpack` only for `encoding: "msgpack"` (see README.md for import maps).
//
// What it adds to a raw WebSocket: reconnection with backoff by close code, subscriptions renewed
// and exact topics recovered from history after a reconnect (or a `gap` event when they cannot
// be), acknowledged publishes with typed errors, publish backpressure, token refresh, and the
// server's side of the buffered amount.

const SUBPROTOCOLS = { json: "crier.json", msgpack: "crier.msgpack" };

const CONNECTING = 0;
const OPEN = 1;
const CLOSING = 2;
const CLOSED = 3;

const DEFAULTS = {
  minDelay: 500,
  maxDelay: 30_000,
  highWaterMark: 1024 * 1024,
  pingInterval: 5_000,
};

/** A connection open this long resets the reconnection backoff. */
const STABLE_AFTER = 5_000;
/** How long a socket gets to deliver the server's welcome once open. */
const WELCOME_TIMEOUT = 10_000;
/** A connection from which nothing arrives this long while a ping is unanswered is dead. */
const MIN_DEAD_AFTER = 10_000;
/** How long before a token expires to fetch a fresh one (at most half the time left). */
const REFRESH_AHEAD = 30_000;
/** A token with less than this left is left to expire (4002) rather than refreshed. */
const MIN_REFRESH_LEFT = 1_000;
/** How often a publish queue waiting for the socket to drain looks at `bufferedAmount`. */
const DRAIN_POLL = 10;
/** How long `close()` waits for the close handshake before dropping the socket. */
const CLOSE_TIMEOUT = 2_000;
/** setTimeout's largest delay. */
const MAX_TIMER = 2 ** 31 - 1;

/** An error from the server (its `code`) or from the client (`buffer_full`, `disconnected`, ...). */
export class CrierError extends Error {
  constructor(code, message, details = undefined) {
    super(message || code, details?.cause !== undefined ? { cause: details.cause } : undefined);
    this.name = "CrierError";
    this.code = code;
    if (details?.status !== undefined) this.status = details.status;
    if (details?.topic !== undefined) this.topic = details.topic;
    if (details?.closeCode !== undefined) this.closeCode = details.closeCode;
  }
}

/** The events a Crier dispatches: a plain Event with the fields of its kind. */
class CrierEvent extends Event {
  constructor(type, fields) {
    super(type);
    Object.assign(this, fields);
  }
}

/**
 * A subscription made with `Crier.subscribe`. Several subscriptions to one topic or pattern on
 * the same client share one subscription on the server; each has its own handler and position.
 */
export class Subscription {
  #record;

  /** @internal Made by `Crier.subscribe`. */
  constructor(record) {
    this.#record = record;
  }

  /** The topic or pattern subscribed to. */
  get topic() {
    return this.#record.key.name;
  }

  /**
   * For an exact topic: the topic stream's epoch and the seq of the last message handed to this
   * subscription's handler (the ack's latest seq before the first one). Null for a pattern, and
   * before the server's first ack.
   */
  get position() {
    const p = this.#record.position;
    return p ? { epoch: p.epoch, seq: p.seq } : null;
  }

  /** Whether the server has acknowledged it and it has not ended. */
  get active() {
    return this.#record.active;
  }

  /** Resolves once the server acknowledges the subscription; rejects if it refuses it. */
  get ready() {
    return this.#record.ready;
  }

  /** Ends this subscription (the server's, once no other subscription of the client shares it). */
  unsubscribe() {
    return this.#record.crier[UNSUBSCRIBE](this.#record);
  }
}

/** The method `Subscription.unsubscribe` calls, out of the public API. */
const UNSUBSCRIBE = Symbol("unsubscribe");

let wsModule = null;
let msgpackModule = null;

function loadWebSocket(given) {
  if (given) return given;
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  // Node without a global WebSocket (Node 20, 21).
  wsModule ??= import("ws").then((m) => m.WebSocket ?? m.default);
  return wsModule;
}

function loadMsgpack(given) {
  if (given) return given;
  // In a browser, a bare specifier needs an import map (or pass `msgpack` in the options).
  msgpackModule ??= import("@msgpack/msgpack");
  return msgpackModule;
}

function isPattern(topic) {
  return topic.split(".").some((s) => s === "*" || s === ">");
}

/** Whether a topic (split in segments) matches a pattern (split in segments), as in NATS. */
function matches(pattern, parts) {
  for (let i = 0; i < pattern.length; i++) {
    const segment = pattern[i];
    if (segment === ">") return parts.length > i;
    if (i >= parts.length) return false;
    if (segment !== "*" && segment !== parts[i]) return false;
  }
  return parts.length === pattern.length;
}

/** The `exp` claim of a JWT, unverified (the server verifies): only to know when to refresh. */
function jwtExp(token) {
  try {
    const payload = token.split(".")[1];
    if (!payload) return null;
    const b64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    return typeof json.exp === "number" ? json.exp : null;
  } catch {
    return null;
  }
}

/** The reconnect policy for a close code: proto/README.md, "Close codes". */
function afterClose(code, canRefreshToken) {
  switch (code) {
    case 1000: // the answer to a close: the server does not close with it on its own
    case 1002: // protocol error
    case 1003: // unsupported data
    case 1007: // invalid UTF-8
    case 1008: // too many bad frames
    case 1009: // message too big
    case 4003: // authentication required: no token worked
      return "stop";
    case 4002: // token expired
      return canRefreshToken ? "reconnect" : "stop";
    default: // 1001 going away, 1006 lost, 4001 idle timeout, 4008 slow consumer, 1011, ...
      return "reconnect";
  }
}

/** The reconnect policy for a refused upgrade (seen only with the `ws` package). */
function afterRefusal(status, canRefreshToken) {
  if (status === 401) return canRefreshToken ? "reconnect" : "stop";
  if (status === 408 || status === 429 || status >= 500) return "reconnect";
  return "stop";
}

function encodeError(error) {
  return new CrierError("bad_data", `data cannot be encoded: ${error?.message ?? error}`, { cause: error });
}

let textEncoder = null;

/** A message's size before it can be encoded: its JSON text's, or nothing if it has none. */
function estimatedSize(message) {
  try {
    return utf8Length(JSON.stringify(message) ?? "");
  } catch {
    return 0;
  }
}

function utf8Length(text) {
  textEncoder ??= new TextEncoder();
  return textEncoder.encode(text).length;
}

export class Crier extends EventTarget {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSING = CLOSING;
  static CLOSED = CLOSED;

  #url;
  #encoding;
  #getToken;
  #reconnect;
  #highWaterMark;
  #pingInterval;
  #batch;
  #WebSocketOption;
  #msgpackOption;

  /** The msgpack module, once loaded. */
  #msgpack = null;
  #ws = null;
  #readyState = CONNECTING;
  #welcome = null;
  #welcomed = false;
  #everOpened = false;
  #firstAttempt = true;
  #stopped = false;
  #closePromise = null;
  #closeResolve = null;
  #attempt = 0;
  /** What the server answered a refused upgrade with (`ws` package only). */
  #refusal = null;
  #socketError = null;

  #reconnectTimer = null;
  #welcomeTimer = null;
  #pingTimer = null;
  #refreshTimer = null;
  #drainTimer = null;
  #closeTimer = null;
  #stableTimer = null;

  #nextId = 0;
  /** Requests sent and not yet answered, by id. */
  #pending = new Map();
  /** Server subscriptions, by topic or pattern. */
  #keys = new Map();
  #patterns = 0;
  /** Publishes waiting for the socket to drain below the high-water mark, or to connect. */
  #queue = [];
  #queueHead = 0;
  #queuedBytes = 0;

  #token;
  #socketToken = null;
  /** What the server adds to a token's `exp`, as the last welcome showed. */
  #leeway = 0;
  #expiresAt = null;

  #lastReceived = 0;
  /** Keep-alive or on-demand pings not answered yet on this connection. */
  #pingsPending = 0;
  #serverBufferedAmount = 0;
  /** Drops of previous connections, and of this one as its last pong said. */
  #droppedBefore = 0;
  #droppedNow = 0;

  constructor(url, options = {}) {
    super();
    this.#url = Crier.#resolveUrl(url);
    const encoding = options.encoding ?? "json";
    if (!Object.hasOwn(SUBPROTOCOLS, encoding)) {
      throw new TypeError(`encoding must be "json" or "msgpack", not ${JSON.stringify(encoding)}`);
    }
    if (options.getToken !== undefined && typeof options.getToken !== "function") {
      throw new TypeError("getToken must be a function");
    }
    if (options.token !== undefined && typeof options.token !== "string") {
      throw new TypeError("token must be a string");
    }
    this.#encoding = encoding;
    this.#token = options.token;
    this.#getToken = options.getToken;
    if (options.reconnect === false) {
      this.#reconnect = null;
    } else {
      const minDelay = options.reconnect?.minDelay ?? DEFAULTS.minDelay;
      const maxDelay = options.reconnect?.maxDelay ?? Math.max(DEFAULTS.maxDelay, minDelay);
      if (!(minDelay >= 0) || !(maxDelay >= minDelay)) {
        throw new RangeError("reconnect needs 0 <= minDelay <= maxDelay");
      }
      this.#reconnect = { minDelay, maxDelay };
    }
    this.#highWaterMark = options.highWaterMark ?? DEFAULTS.highWaterMark;
    if (!(this.#highWaterMark >= 0)) throw new RangeError("highWaterMark must be >= 0");
    this.#pingInterval = options.pingInterval ?? DEFAULTS.pingInterval;
    if (!(this.#pingInterval >= 0)) throw new RangeError("pingInterval must be >= 0");
    this.#batch = Boolean(options.batch);
    this.#WebSocketOption = options.WebSocket;
    this.#msgpackOption = options.msgpack;
    this.#connect();
  }

  /** ws:// or wss://; http(s):// and, in a page, relative URLs are turned into them. */
  static #resolveUrl(url) {
    const base = globalThis.location?.href;
    const resolved = base === undefined ? new URL(String(url)) : new URL(String(url), base);
    if (resolved.protocol === "http:") resolved.protocol = "ws:";
    if (resolved.protocol === "https:") resolved.protocol = "wss:";
    if (resolved.protocol !== "ws:" && resolved.protocol !== "wss:") {
      throw new SyntaxError(`not a WebSocket URL: ${url}`);
    }
    resolved.hash = "";
    return resolved.href;
  }

  get CONNECTING() {
    return CONNECTING;
  }
  get OPEN() {
    return OPEN;
  }
  get CLOSING() {
    return CLOSING;
  }
  get CLOSED() {
    return CLOSED;
  }

  get url() {
    return this.#url;
  }

  get encoding() {
    return this.#encoding;
  }

  /** CONNECTING (also while waiting to reconnect), OPEN once welcomed, CLOSING, CLOSED for good. */
  get readyState() {
    return this.#readyState;
  }

  /** The socket's `bufferedAmount`: bytes sent and not yet handed to the network (0 if none). */
  get bufferedAmount() {
    return this.#ws?.bufferedAmount ?? 0;
  }

  /**
   * Bytes the server holds for this client that its socket has not taken yet, as the last `pong`
   * said (refreshed by the keep-alive pings and `refreshServerStats()`). 0 while disconnected.
   */
  get serverBufferedAmount() {
    return this.#serverBufferedAmount;
  }

  /** Messages the server dropped for this client (slow-consumer policy), as pongs reported. */
  get dropped() {
    return this.#droppedBefore + this.#droppedNow;
  }

  /** The current connection's welcome frame (`connection`, `limits`, `user`, ...), or null. */
  get welcome() {
    return this.#welcomed ? this.#welcome : null;
  }

  /** addEventListener, returning a function that removes the listener. */
  on(type, listener) {
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  off(type, listener) {
    this.removeEventListener(type, listener);
  }

  subscribe(topic, onMessage, options = {}) {
    if (typeof topic !== "string") throw new TypeError("topic must be a string");
    if (typeof onMessage !== "function") throw new TypeError("onMessage must be a function");
    const request = {
      mode: options.mode,
      maxRate: options.maxRate,
      rewind: options.rewind,
      since: options.since ? { epoch: options.since.epoch, seq: options.since.seq } : undefined,
    };
    let key = this.#keys.get(topic);
    if (!key) {
      const pattern = isPattern(topic);
      key = {
        name: topic,
        pattern,
        segments: pattern ? topic.split(".") : null,
        // The options of the last acknowledged subscribe: what the server applies.
        options: null,
        // Acknowledged at least once (on any connection).
        acked: false,
        // Exact topics: the stream's epoch and the highest seq received on this connection.
        epoch: null,
        seq: 0,
        // Accept the next message without a gap check (a gap was just reported).
        resync: false,
        // After a `since` renewal: the latest seq its ack named, until the replay reaches it.
        target: null,
        // A recovery was cut short by a 4008: renew without `since` next time.
        abandonSince: false,
        // Patterns: the last seq seen per topic on this connection, to notice drops.
        seen: pattern ? new Map() : null,
        subs: new Set(),
      };
      this.#keys.set(topic, key);
      if (pattern) this.#patterns += 1;
    }
    let resolve;
    let reject;
    const ready = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Failures are also dispatched as `error` events: awaiting `ready` is optional.
    ready.catch(() => {});
    const record = {
      crier: this,
      key,
      handler: onMessage,
      request,
      active: false,
      closed: false,
      position: null,
      seen: key.pattern ? new Map() : null,
      ready,
      resolve,
      reject,
      subscription: null,
    };
    record.subscription = new Subscription(record);
    key.subs.add(record);
    if (this.#stopped) {
      this.#endRecord(record, new CrierError("closed", "the client is closed"));
    } else if (this.#welcomed) {
      this.#sendSubscribe(key, request, [record], false);
    }
    // Otherwise it is sent with the others once the connection is welcomed.
    return record.subscription;
  }

  publish(topic, data) {
    if (this.#stopped) {
      return Promise.reject(new CrierError("closed", "the client is closed"));
    }
    const id = ++this.#nextId;
    const message = { op: "publish", topic, data: data === undefined ? null : data, id };
    let frame = null;
    let size = 0;
    if (this.#encoding === "json" || this.#msgpack) {
      try {
        frame = this.#encode(message);
      } catch (error) {
        return Promise.reject(encodeError(error));
      }
      size = typeof frame === "string" ? frame.length : frame.byteLength;
    }
    return new Promise((resolve, reject) => {
      // Until the MessagePack codec has loaded, the message waits unencoded in the queue.
      const entry = { kind: "publish", id, frame, size, resolve, reject, topic, message: frame ? null : message };
      if (this.#queued() === 0 && this.#canSend()) {
        this.#transmit(entry);
        return;
      }
      // Counted in bytes: a JSON frame's UTF-8 length; a message still waiting for the
      // MessagePack codec, by its JSON size (close to its MessagePack one) until it is encoded.
      entry.size = frame
        ? typeof frame === "string" ? utf8Length(frame) : frame.byteLength
        : estimatedSize(message);
      if (this.#queued() > 0 && this.#queuedBytes + entry.size > this.#highWaterMark) {
        reject(
          new CrierError(
            "buffer_full",
            `${this.#queuedBytes} bytes of publishes already wait for the socket to drain (highWaterMark ${this.#highWaterMark})`,
          ),
        );
        return;
      }
      this.#queue.push(entry);
      this.#queuedBytes += entry.size;
      this.#scheduleDrain();
    });
  }

  /** Sends a `ping` now; resolves with the server's buffered amount and drop count. */
  refreshServerStats() {
    if (!this.#welcomed || this.#stopped) {
      return Promise.reject(new CrierError("disconnected", "not connected"));
    }
    return this.#ping();
  }

  /** Closes the connection and stops reconnecting; resolves once closed. */
  close(code = 1000, reason = "") {
    if (this.#closePromise) return this.#closePromise;
    this.#closePromise = new Promise((resolve) => {
      this.#closeResolve = resolve;
    });
    this.#stopped = true;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#clearConnectionTimers();
    this.#failQueue(new CrierError("closed", "the client was closed"));
    this.#endPendingSubscriptions(new CrierError("closed", "the client was closed"));
    const socket = this.#ws;
    if (socket && socket.readyState < CLOSED) {
      this.#readyState = CLOSING;
      try {
        socket.close(code, reason);
      } catch {
        socket.close();
      }
      this.#closeTimer = setTimeout(() => {
        this.#lost(socket, 1006, "the close handshake did not finish", false);
        socket.terminate?.();
      }, CLOSE_TIMEOUT);
    } else {
      this.#ws = null;
      this.#finish(code, reason, true);
    }
    return this.#closePromise;
  }

  // --- connecting ---

  async #connect() {
    this.#reconnectTimer = null;
    const first = this.#firstAttempt;
    this.#firstAttempt = false;
    let token;
    let WebSocketClass;
    try {
      if (first && this.#token !== undefined) {
        token = this.#token;
      } else if (this.#getToken) {
        try {
          token = await this.#getToken();
        } catch (error) {
          throw new CrierError("token_failed", `getToken failed: ${error?.message ?? error}`, {
            cause: error,
          });
        }
        if (typeof token !== "string") {
          throw new CrierError("token_failed", "getToken did not give a string");
        }
      } else {
        token = this.#token;
      }
      WebSocketClass = await loadWebSocket(this.#WebSocketOption);
      if (this.#encoding === "msgpack" && !this.#msgpack) {
        this.#msgpack = await loadMsgpack(this.#msgpackOption);
        this.#encodeQueued();
      }
    } catch (error) {
      if (this.#stopped) return;
      const crierError =
        error instanceof CrierError
          ? error
          : new CrierError("connect_failed", `cannot connect: ${error?.message ?? error}`, {
              cause: error,
            });
      this.#dispatch("error", { error: crierError, message: crierError.message });
      // A missing module will not appear by retrying; a token provider may recover.
      if (crierError.code === "token_failed" && this.#reconnect) this.#scheduleReconnect();
      else this.#stop(1006, crierError.message, false);
      return;
    }
    if (this.#stopped) return;

    const url = new URL(this.#url);
    if (this.#batch) url.searchParams.set("batch", "1");
    // The `ws` package can set headers; browsers cannot, so they put the token in the URL.
    const headers = typeof WebSocketClass.prototype?.terminate === "function";
    if (token !== undefined && !headers) url.searchParams.set("token", token);
    let socket;
    try {
      const protocols = [SUBPROTOCOLS[this.#encoding]];
      socket = headers
        ? new WebSocketClass(url.href, protocols, {
            headers: token !== undefined ? { Authorization: `Bearer ${token}` } : {},
            perMessageDeflate: false,
          })
        : new WebSocketClass(url.href, protocols);
    } catch (error) {
      const crierError = new CrierError("connect_failed", `cannot open a WebSocket: ${error?.message ?? error}`, {
        cause: error,
      });
      this.#dispatch("error", { error: crierError, message: crierError.message });
      this.#stop(1006, crierError.message, false);
      return;
    }
    socket.binaryType = "arraybuffer";
    this.#ws = socket;
    this.#socketToken = token ?? null;
    this.#refusal = null;
    this.#socketError = null;
    this.#readyState = CONNECTING;
    socket.onopen = () => {
      if (socket !== this.#ws) return;
      this.#lastReceived = Date.now();
      this.#welcomeTimer = setTimeout(() => {
        this.#abandon(socket, "no welcome from the server");
      }, WELCOME_TIMEOUT);
    };
    socket.onmessage = (event) => {
      if (socket === this.#ws) this.#receive(event.data);
    };
    socket.onerror = (event) => {
      if (socket === this.#ws) this.#socketError = event?.message || event?.error?.message || null;
    };
    socket.onclose = (event) => {
      this.#lost(socket, event.code, event.reason, event.wasClean);
    };
    if (typeof socket.on === "function") {
      // `ws` only: read the JSON body of a refused upgrade ({"error":{"code","message"}}).
      socket.on("unexpected-response", (request, response) => {
        const chunks = [];
        let size = 0;
        const done = () => {
          let code = "refused";
          let message = `the server refused the upgrade with HTTP ${response.statusCode}`;
          try {
            const body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
            if (typeof body?.error?.code === "string") code = body.error.code;
            if (typeof body?.error?.message === "string") message = body.error.message;
          } catch {
            // Not Crier's error body: keep the status.
          }
          if (socket === this.#ws) this.#refusal = { status: response.statusCode, code, message };
          socket.terminate();
        };
        response.on("data", (chunk) => {
          size += chunk.length;
          if (size <= 64 * 1024) chunks.push(chunk);
        });
        response.on("end", done);
        response.on("error", done);
      });
    }
  }

  /** A socket closed (or was given up on): reconnect or stop, by what closed it. */
  #lost(socket, code, reason, wasClean) {
    if (socket !== this.#ws) return;
    this.#ws = null;
    const wasOpen = this.#welcomed;
    this.#welcomed = false;
    this.#clearConnectionTimers();
    clearTimeout(this.#closeTimer);
    this.#closeTimer = null;
    this.#droppedBefore += this.#droppedNow;
    this.#droppedNow = 0;
    this.#serverBufferedAmount = 0;
    this.#pingsPending = 0;
    if (code === 4008) {
      // Closed as a slow consumer while a recovery replay was under way: the replay itself may
      // not fit the server's buffer, and asking for it again would end the same way.
      for (const entry of this.#pending.values()) {
        if (entry.kind === "subscribe" && entry.request.since !== undefined) entry.key.abandonSince = true;
      }
      for (const key of this.#keys.values()) {
        if (key.target !== null && key.seq < key.target) key.abandonSince = true;
      }
    }
    for (const entry of this.#pending.values()) {
      switch (entry.kind) {
        case "publish":
          entry.reject(
            new CrierError(
              "disconnected",
              "the connection was lost before the server answered: the message may or may not have been published",
            ),
          );
          break;
        case "ping":
          entry.reject(new CrierError("disconnected", "the connection was lost"));
          break;
        case "unsubscribe":
          // Not renewed on the next connection: unsubscribed all the same.
          entry.resolve();
          break;
        default:
          // Subscriptions are renewed on the next connection; a refresh starts again.
          break;
      }
    }
    this.#pending.clear();
    for (const key of this.#keys.values()) {
      key.resync = false;
      key.target = null;
      if (key.pattern) {
        key.seen.clear();
        for (const record of key.subs) record.seen.clear();
      }
    }

    if (this.#stopped) {
      this.#finish(code, reason, wasClean);
      return;
    }
    const refusal = this.#refusal;
    this.#refusal = null;
    const canRefresh = this.#getToken !== undefined;
    let action = refusal ? afterRefusal(refusal.status, canRefresh) : afterClose(code, canRefresh);
    if (!this.#reconnect) action = "stop";
    if (!wasOpen) {
      const error = refusal
        ? new CrierError(refusal.code, refusal.message, { status: refusal.status })
        : new CrierError(
            "connect_failed",
            `could not connect to ${this.#url}${this.#socketError ? `: ${this.#socketError}` : ""}` +
              (code !== 1006 ? ` (closed with ${code}${reason ? ` ${reason}` : ""})` : ""),
            { closeCode: code },
          );
      this.#dispatch("error", { error, message: error.message });
    } else if (action === "stop") {
      const error = new CrierError(
        "connection_closed",
        `the server closed the connection with ${code}${reason ? ` (${reason})` : ""}: not reconnecting`,
        { closeCode: code },
      );
      this.#dispatch("error", { error, message: error.message });
    }
    if (action === "stop") {
      this.#stop(code, reason, wasClean);
      return;
    }
    if (wasOpen) this.#dispatch("close", { code, reason, wasClean, willReconnect: true });
    if (!this.#stopped) this.#scheduleReconnect();
  }

  /** Gives up on a socket that says nothing (no welcome, no pong) as if it had been lost. */
  #abandon(socket, reason) {
    if (socket !== this.#ws) return;
    this.#lost(socket, 1006, reason, false);
    if (typeof socket.terminate === "function") socket.terminate();
    else socket.close();
  }

  #scheduleReconnect() {
    this.#attempt += 1;
    const { minDelay, maxDelay } = this.#reconnect;
    // Full jitter over [minDelay, cap], the cap doubling with each attempt up to maxDelay.
    const base = Math.max(minDelay, 50);
    const cap = Math.max(minDelay, Math.min(maxDelay, base * 2 ** Math.min(this.#attempt, 30)));
    const delay = Math.round(minDelay + Math.random() * (cap - minDelay));
    this.#readyState = CONNECTING;
    this.#dispatch("reconnecting", { attempt: this.#attempt, delay });
    if (this.#stopped) return;
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  /** Stops for good (not asked by `close()`). */
  #stop(code, reason, wasClean) {
    this.#stopped = true;
    this.#failQueue(new CrierError("closed", `the connection closed with ${code} and will not reconnect`));
    this.#endPendingSubscriptions(new CrierError("closed", "the connection closed for good"));
    this.#finish(code, reason, wasClean);
  }

  #finish(code, reason, wasClean) {
    this.#readyState = CLOSED;
    this.#clearConnectionTimers();
    clearTimeout(this.#closeTimer);
    clearTimeout(this.#reconnectTimer);
    this.#closeTimer = null;
    this.#reconnectTimer = null;
    const ended = new CrierError("closed", "the client is closed");
    for (const key of [...this.#keys.values()]) {
      for (const record of [...key.subs]) this.#endRecord(record, ended);
    }
    this.#dispatch("close", { code, reason, wasClean, willReconnect: false });
    this.#closeResolve?.();
    this.#closePromise ??= Promise.resolve();
  }

  #clearConnectionTimers() {
    clearTimeout(this.#welcomeTimer);
    clearInterval(this.#pingTimer);
    clearTimeout(this.#refreshTimer);
    clearTimeout(this.#drainTimer);
    clearTimeout(this.#stableTimer);
    this.#stableTimer = null;
    this.#welcomeTimer = null;
    this.#pingTimer = null;
    this.#refreshTimer = null;
    this.#drainTimer = null;
  }

  // --- frames in ---

  #receive(data) {
    this.#lastReceived = Date.now();
    const socket = this.#ws;
    try {
      if (typeof data === "string") {
        // One JSON frame per line when batching; a frame never holds a raw line break.
        let start = 0;
        while (start < data.length) {
          let end = data.indexOf("\n", start);
          if (end === -1) end = data.length;
          if (end > start) this.#frame(JSON.parse(data.slice(start, end)));
          start = end + 1;
          if (socket !== this.#ws) return;
        }
      } else {
        if (!this.#msgpack) throw new Error("a binary frame on a JSON connection");
        const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
        // MessagePack maps back to back when batching.
        for (const frame of this.#msgpack.decodeMulti(bytes)) {
          this.#frame(frame);
          if (socket !== this.#ws) return;
        }
      }
    } catch (error) {
      const crierError = new CrierError("bad_server_frame", `cannot read a frame from the server: ${error?.message ?? error}`, {
        cause: error,
      });
      this.#dispatch("error", { error: crierError, message: crierError.message });
    }
  }

  #frame(frame) {
    if (frame === null || typeof frame !== "object") return;
    switch (frame.op) {
      case "message":
        if (!this.#stopped) this.#onMessage(frame);
        break;
      case "ack":
        this.#onAck(frame);
        break;
      case "pong":
        this.#onPong(frame);
        break;
      case "error":
        this.#onError(frame);
        break;
      case "welcome":
        this.#onWelcome(frame);
        break;
      default:
        break;
    }
  }

  #onWelcome(welcome) {
    if (this.#welcomed) return;
    clearTimeout(this.#welcomeTimer);
    this.#welcomeTimer = null;
    this.#welcome = welcome;
    this.#welcomed = true;
    // The backoff starts over once the connection has proved itself, not at once: a server that
    // closes every connection soon after its welcome is not hammered.
    this.#stableTimer = setTimeout(() => {
      this.#attempt = 0;
    }, STABLE_AFTER);
    const reconnected = this.#everOpened;
    this.#everOpened = true;
    if (this.#socketToken !== null) this.#token = this.#socketToken;
    this.#expiresAt = typeof welcome.expires_at === "number" ? welcome.expires_at : null;
    const exp = this.#token !== undefined ? jwtExp(this.#token) : null;
    if (this.#expiresAt !== null && exp !== null) this.#leeway = Math.max(0, this.#expiresAt - exp);
    this.#scheduleRefresh();
    if (this.#stopped) return;
    this.#readyState = OPEN;
    for (const key of this.#keys.values()) {
      this.#sendSubscribe(key, this.#renewal(key), [...key.subs], key.acked);
    }
    if (this.#pingInterval > 0) {
      const socket = this.#ws;
      this.#pingTimer = setInterval(() => this.#keepAlive(socket), this.#pingInterval);
    }
    this.#dispatch("open", { reconnected, welcome });
    this.#pump();
  }

  #onMessage(frame) {
    const { topic, seq } = frame;
    const message = { topic, seq, data: frame.data };
    const exact = this.#keys.get(topic);
    if (exact !== undefined && !exact.pattern && exact.acked) {
      if (seq > exact.seq) {
        if (exact.resync) {
          exact.resync = false;
        } else if (seq > exact.seq + 1 && exact.options?.mode !== "latest") {
          // Dropped by the server's slow-consumer policy while this client fell behind.
          this.#dispatch("gap", {
            topic,
            reason: "dropped",
            epoch: exact.epoch,
            seq,
            missed: seq - exact.seq - 1,
          });
        }
        exact.seq = seq;
      }
      for (const record of exact.subs) {
        if (record.active && seq > record.position.seq) {
          record.position.seq = seq;
          this.#deliver(record, message);
        }
      }
    }
    if (this.#patterns === 0) return;
    const parts = topic.split(".");
    for (const key of this.#keys.values()) {
      if (!key.pattern || !key.acked || !matches(key.segments, parts)) continue;
      const last = key.seen.get(topic);
      if (last === undefined || seq > last) {
        if (
          last !== undefined &&
          seq > last + 1 &&
          exact === undefined &&
          key.options?.mode !== "latest"
        ) {
          this.#dispatch("gap", { topic, pattern: key.name, reason: "dropped", seq, missed: seq - last - 1 });
        }
        key.seen.set(topic, seq);
      }
      for (const record of key.subs) {
        if (!record.active) continue;
        const seen = record.seen.get(topic);
        if (seen === undefined || seq > seen) {
          record.seen.set(topic, seq);
          this.#deliver(record, message);
        }
      }
    }
  }

  #deliver(record, message) {
    try {
      record.handler(message);
    } catch (error) {
      this.#dispatch("error", { error, message: `a message handler for ${record.key.name} threw` });
    }
  }

  #onAck(frame) {
    const entry = this.#pending.get(frame.id);
    if (entry === undefined) return;
    this.#pending.delete(frame.id);
    switch (entry.kind) {
      case "publish":
        entry.resolve({ seq: frame.seq });
        break;
      case "subscribe":
        this.#subscribed(entry, frame);
        break;
      case "unsubscribe":
        entry.resolve();
        break;
      case "auth":
        this.#authenticated(entry, frame);
        break;
      default:
        break;
    }
  }

  #onPong(frame) {
    if (typeof frame.buffered_bytes === "number") this.#serverBufferedAmount = frame.buffered_bytes;
    if (typeof frame.dropped === "number") this.#droppedNow = frame.dropped;
    const entry = frame.id !== undefined ? this.#pending.get(frame.id) : undefined;
    if (entry?.kind === "ping") {
      this.#pending.delete(frame.id);
      this.#pingsPending -= 1;
      entry.resolve({ serverBufferedAmount: this.#serverBufferedAmount, dropped: this.dropped });
    }
  }

  #onError(frame) {
    const error = new CrierError(String(frame.code), frame.message, { topic: frame.topic });
    const entry = frame.id !== undefined ? this.#pending.get(frame.id) : undefined;
    if (entry !== undefined) {
      this.#pending.delete(frame.id);
      switch (entry.kind) {
        case "subscribe":
          this.#subscribeFailed(entry, error);
          return;
        case "auth":
          // The connection keeps its token; try again while there is time.
          this.#dispatch("error", { error, message: `token refresh refused: ${error.message}` });
          this.#scheduleRefresh();
          return;
        case "unsubscribe":
          entry.resolve();
          return;
        default:
          if (entry.kind === "ping") this.#pingsPending -= 1;
          entry.reject(error);
          return;
      }
    }
    if (typeof frame.topic === "string") {
      // The server ended a subscription: a fresh token no longer grants it.
      const key = this.#keys.get(frame.topic);
      if (key !== undefined) {
        for (const record of [...key.subs]) this.#endRecord(record, error);
      }
    }
    this.#dispatch("error", { error, message: error.message });
  }

  // --- subscriptions ---

  /** What to ask for when (re)subscribing a key on a new connection. */
  #renewal(key) {
    if (!key.acked) {
      // Never acknowledged: as its first subscription asked.
      const [first] = key.subs;
      return { ...first.request };
    }
    const { mode, maxRate } = key.options;
    if (mode === "latest") {
      // A dashboard wants the current value, not the backlog.
      return { mode, maxRate, rewind: 1, renewal: true };
    }
    if (key.pattern) return { mode, maxRate, renewal: true };
    if (key.abandonSince) return { mode, maxRate, renewal: true, abandoned: true };
    // Resume after the last message every handler of the topic has seen.
    let seq = key.seq;
    for (const record of key.subs) {
      if (record.active && record.position.epoch === key.epoch) seq = Math.min(seq, record.position.seq);
    }
    return { mode, maxRate, since: { epoch: key.epoch, seq }, renewal: true };
  }

  #sendSubscribe(key, request, records, renewal) {
    const id = ++this.#nextId;
    const frame = { op: "subscribe", topic: key.name, id };
    if (request.mode !== undefined) frame.mode = request.mode;
    if (request.maxRate !== undefined) frame.max_rate = request.maxRate;
    if (request.rewind !== undefined) frame.rewind = request.rewind;
    if (request.since !== undefined) frame.since = request.since;
    this.#pending.set(id, { kind: "subscribe", key, request, records, renewal });
    this.#send(frame);
  }

  #subscribed(entry, ack) {
    const { key, request, records, renewal } = entry;
    if (this.#keys.get(key.name) !== key) return; // unsubscribed meanwhile
    const wasAcked = key.acked;
    key.acked = true;
    key.options = { mode: request.mode, maxRate: request.maxRate };
    if (key.pattern) {
      for (const record of records) this.#activate(record, null);
      if (renewal && request.mode !== "latest") {
        // A pattern cannot resume: what was published meanwhile is lost.
        this.#dispatch("gap", { topic: key.name, pattern: key.name, reason: "reconnected" });
      }
      return;
    }
    const epoch = ack.epoch;
    const latest = ack.seq ?? 0;
    const since = request.since;
    if (since !== undefined) {
      key.target = latest;
      if (ack.recovered === true) {
        key.seq = since.seq;
      } else if (epoch !== since.epoch) {
        // A new stream (the server restarted, or the topic started afresh): nothing replayed.
        key.seq = latest;
        for (const record of key.subs) if (record.active) record.position = { epoch, seq: latest };
        this.#dispatch("gap", { topic: key.name, reason: "epoch", epoch, seq: latest });
      } else {
        // History no longer reaches back: what it holds is replayed.
        key.seq = since.seq;
        key.resync = true;
        this.#dispatch("gap", { topic: key.name, reason: "history", epoch, seq: latest });
      }
    } else if (request.abandoned) {
      // Live from here, without what the client missed.
      key.abandonSince = false;
      let from = key.seq;
      for (const record of key.subs) if (record.active) from = Math.min(from, record.position.seq);
      const missed = key.epoch === epoch ? Math.max(0, latest - from) : undefined;
      key.seq = latest;
      for (const record of key.subs) if (record.active) record.position = { epoch, seq: latest };
      this.#dispatch("gap", { topic: key.name, reason: "dropped", epoch, seq: latest, missed });
    } else if (!wasAcked || renewal) {
      // Live from here; a rewind's replay comes as seqs up to `latest`.
      if (key.epoch !== null && key.epoch !== epoch) {
        const start = Math.max(0, latest - (request.rewind ?? 0));
        for (const record of key.subs) if (record.active) record.position = { epoch, seq: start };
      }
      key.seq = latest;
    }
    key.epoch = epoch;
    for (const record of records) {
      if (record.active || record.closed) continue;
      let start;
      if (since !== undefined && (ack.recovered === true || epoch === since.epoch)) start = since.seq;
      else if (since !== undefined) start = latest;
      else start = Math.max(0, latest - (request.rewind ?? 0));
      this.#activate(record, { epoch, seq: start });
    }
  }

  #activate(record, position) {
    if (record.closed || record.active) return;
    record.position = position;
    record.active = true;
    record.resolve(record.subscription);
  }

  #subscribeFailed(entry, error) {
    const { key, records, renewal } = entry;
    if (this.#keys.get(key.name) !== key) return;
    // A refused renewal leaves nothing subscribed on the server: every handler of the key ends.
    const ending = renewal ? [...key.subs] : records.filter((r) => !r.active);
    for (const record of ending) this.#endRecord(record, error);
    this.#dispatch("error", { error, message: `subscribing to ${key.name} failed: ${error.message}` });
  }

  /** Ends a subscription on the client's side (the server's is gone or never was). */
  #endRecord(record, error) {
    if (record.closed) return;
    record.closed = true;
    record.active = false;
    record.reject(error);
    const key = record.key;
    key.subs.delete(record);
    if (key.subs.size === 0 && this.#keys.get(key.name) === key) {
      this.#keys.delete(key.name);
      if (key.pattern) this.#patterns -= 1;
    }
  }

  #endPendingSubscriptions(error) {
    for (const key of [...this.#keys.values()]) {
      for (const record of [...key.subs]) if (!record.active) this.#endRecord(record, error);
    }
  }

  [UNSUBSCRIBE](record) {
    if (record.closed) return Promise.resolve();
    const key = record.key;
    this.#endRecord(record, new CrierError("unsubscribed", "unsubscribed before the server answered"));
    if (this.#keys.get(key.name) === key || !this.#welcomed || this.#stopped) {
      // Still shared with another subscription, or not connected (not renewed then).
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const id = ++this.#nextId;
      this.#pending.set(id, { kind: "unsubscribe", resolve, reject });
      this.#send({ op: "unsubscribe", topic: key.name, id });
    });
  }

  // --- frames out ---

  #encode(frame) {
    return this.#encoding === "json" ? JSON.stringify(frame) : this.#msgpackEncode(frame);
  }

  #msgpackEncode(frame) {
    if (!this.#msgpack) throw new Error("@msgpack/msgpack is still loading");
    return this.#msgpack.encode(frame);
  }

  /** Sends a control frame (subscribe, unsubscribe, ping, auth) on the welcomed connection. */
  #send(frame) {
    if (!this.#welcomed) return;
    try {
      this.#ws.send(this.#encode(frame));
    } catch (error) {
      const crierError = new CrierError("bad_data", `cannot send ${frame.op}: ${error?.message ?? error}`, { cause: error });
      this.#dispatch("error", { error: crierError, message: crierError.message });
    }
  }

  #canSend() {
    return this.#welcomed && this.#ws.readyState === OPEN && this.#ws.bufferedAmount <= this.#highWaterMark;
  }

  #transmit(entry) {
    const limit = this.#welcome?.limits?.max_frame_bytes;
    if (typeof limit === "number" && entry.size * (typeof entry.frame === "string" ? 3 : 1) > limit) {
      const bytes = typeof entry.frame === "string" ? utf8Length(entry.frame) : entry.size;
      if (bytes > limit) {
        // The server would close the connection (1009) for a frame this large.
        entry.reject(
          new CrierError("payload_too_large", `the publish frame is ${bytes} bytes, over the server's max_frame_bytes (${limit})`),
        );
        return;
      }
    }
    this.#pending.set(entry.id, entry);
    const frame = entry.frame;
    entry.frame = null; // only the promise waits for the ack
    this.#ws.send(frame);
  }

  #queued() {
    return this.#queue.length - this.#queueHead;
  }

  #scheduleDrain() {
    if (this.#drainTimer === null && this.#welcomed && this.#queued() > 0) {
      this.#drainTimer = setTimeout(() => {
        this.#drainTimer = null;
        this.#pump();
      }, DRAIN_POLL);
    }
  }

  /** Sends queued publishes, in order, while the socket is below the high-water mark. */
  #pump() {
    while (this.#queued() > 0 && this.#canSend()) {
      const entry = this.#queue[this.#queueHead];
      this.#queue[this.#queueHead] = undefined;
      this.#queueHead += 1;
      this.#queuedBytes -= entry.size;
      this.#transmit(entry);
    }
    if (this.#queued() === 0) {
      this.#queue = [];
      this.#queueHead = 0;
    } else if (this.#queueHead > 1024 && this.#queueHead * 2 > this.#queue.length) {
      this.#queue = this.#queue.slice(this.#queueHead);
      this.#queueHead = 0;
    }
    this.#scheduleDrain();
  }

  /** Encodes the publishes queued before the MessagePack codec loaded. */
  #encodeQueued() {
    const queue = this.#queue.slice(this.#queueHead);
    this.#queue = [];
    this.#queueHead = 0;
    for (const entry of queue) {
      if (entry.frame === null) {
        try {
          entry.frame = this.#encode(entry.message);
        } catch (error) {
          entry.reject(encodeError(error));
          continue;
        }
        entry.message = null;
        this.#queuedBytes += entry.frame.byteLength - entry.size;
        entry.size = entry.frame.byteLength;
      }
      this.#queue.push(entry);
    }
  }

  #failQueue(error) {
    const queue = this.#queue.slice(this.#queueHead);
    this.#queue = [];
    this.#queueHead = 0;
    this.#queuedBytes = 0;
    for (const entry of queue) entry.reject(error);
  }

  #ping() {
    return new Promise((resolve, reject) => {
      const id = ++this.#nextId;
      this.#pending.set(id, { kind: "ping", resolve, reject });
      this.#pingsPending += 1;
      this.#send({ op: "ping", id });
    });
  }

  #keepAlive(socket) {
    // An unauthenticated connection is answered `unauthorized` (a bad frame) to all but `auth`.
    if (socket !== this.#ws || !this.#welcomed || this.#welcome.authenticated === false) return;
    const deadAfter = Math.max(2 * this.#pingInterval, MIN_DEAD_AFTER);
    if (this.#pingsPending > 0 && Date.now() - this.#lastReceived > deadAfter) {
      this.#abandon(socket, "no answer to keep-alive pings");
      return;
    }
    this.#ping().catch(() => {});
  }

  // --- tokens ---

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (!this.#getToken || this.#expiresAt === null || !this.#welcomed) return;
    const left = this.#expiresAt * 1000 - Date.now();
    if (left <= MIN_REFRESH_LEFT) return;
    const wait = left - Math.min(REFRESH_AHEAD, left / 2);
    const socket = this.#ws;
    this.#refreshTimer = setTimeout(() => this.#refresh(socket), Math.min(wait, MAX_TIMER));
  }

  async #refresh(socket) {
    this.#refreshTimer = null;
    let token;
    try {
      token = await this.#getToken();
      if (typeof token !== "string") throw new Error("getToken did not give a string");
    } catch (error) {
      if (socket !== this.#ws || !this.#welcomed) return;
      const crierError = new CrierError("token_failed", `getToken failed: ${error?.message ?? error}`, { cause: error });
      this.#dispatch("error", { error: crierError, message: crierError.message });
      this.#scheduleRefresh();
      return;
    }
    if (socket !== this.#ws || !this.#welcomed) return;
    const id = ++this.#nextId;
    this.#pending.set(id, { kind: "auth", token });
    this.#send({ op: "auth", token, id });
  }

  #authenticated(entry, ack) {
    this.#token = entry.token;
    if (typeof ack.expires_at === "number") {
      this.#expiresAt = ack.expires_at;
    } else {
      const exp = jwtExp(entry.token);
      this.#expiresAt = exp === null ? null : exp + this.#leeway;
    }
    this.#scheduleRefresh();
  }

  #dispatch(type, fields) {
    this.dispatchEvent(new CrierEvent(type, fields));
  }
}

export { CONNECTING, OPEN, CLOSING, CLOSED };
export default Crier;
