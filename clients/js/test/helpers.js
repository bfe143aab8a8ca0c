// Test helpers: a real Crier process on a free port, a TCP proxy that can cut or stall
// connections, HS256 tokens, and waiting for conditions (never for fixed times).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";

import { WebSocket as NodeWebSocket } from "ws";

export const CRIER_BIN =
  process.env.CRIER_BIN ?? fileURLToPath(new URL("../../../target/debug/crier", import.meta.url));

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `predicate` until it holds; fails after `timeout` ms with `what` and its last value. */
export async function waitFor(predicate, what, timeout = 10_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(10);
  }
}

/** The next event of `type` on `target` (that `filter` accepts). */
export function nextEvent(target, type, filter = () => true, timeout = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      target.removeEventListener(type, listener);
      reject(new Error(`timed out after ${timeout} ms waiting for a ${type} event`));
    }, timeout);
    const listener = (event) => {
      if (!filter(event)) return;
      clearTimeout(timer);
      target.removeEventListener(type, listener);
      resolve(event);
    };
    target.addEventListener(type, listener);
  });
}

const clients = new Set();

/** Remembers a client for `closeClients()`, so that a failed test leaves nothing reconnecting. */
export function track(crier) {
  clients.add(crier);
  return crier;
}

export async function closeClients() {
  const open = [...clients];
  clients.clear();
  await Promise.all(open.map((crier) => crier.close()));
}

/** Records a client's events, to assert on them afterwards. */
export function record(crier) {
  const events = { open: [], close: [], error: [], reconnecting: [], gap: [] };
  for (const type of Object.keys(events)) crier.addEventListener(type, (event) => events[type].push(event));
  return events;
}

/** A port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A Crier process, started with `args` on a port of its own (kept across restarts). */
export class Broker {
  constructor(args = [], env = {}) {
    this.args = args;
    this.env = env;
    this.port = null;
    this.process = null;
    this.log = "";
  }

  static async start(args = [], env = {}) {
    const broker = new Broker(args, env);
    await broker.start();
    return broker;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    if (!existsSync(CRIER_BIN)) {
      throw new Error(`no Crier binary at ${CRIER_BIN}: run \`cargo build -p crier\` (or set CRIER_BIN)`);
    }
    const fixedPort = this.port !== null;
    for (let attempt = 0; ; attempt++) {
      if (!fixedPort) this.port = await freePort();
      try {
        await this.#spawn();
        return;
      } catch (error) {
        // Another process took the port between freePort() and the bind: try another.
        if (fixedPort || attempt >= 4 || !/address|in use/i.test(String(error.message))) throw error;
      }
    }
  }

  async #spawn() {
    this.log = "";
    const child = spawn(CRIER_BIN, ["--listen", `127.0.0.1:${this.port}`, "--log", "warn", ...this.args], {
      env: { ...process.env, ...this.env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.process = child;
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      this.log = (this.log + chunk).slice(-20_000);
    });
    const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
    child.exited = exited;
    const deadline = Date.now() + 20_000;
    for (;;) {
      const status = await Promise.race([exited, sleep(25).then(() => null)]);
      if (status) throw new Error(`crier exited (${status.code ?? status.signal}) on start: ${this.log}`);
      try {
        const response = await fetch(`${this.http}/healthz`);
        if (response.ok) return;
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) {
        child.kill("SIGKILL");
        throw new Error(`crier did not answer /healthz: ${this.log}`);
      }
    }
  }

  /** Stops the process (SIGTERM: connections are closed with 1001; SIGKILL: they just drop). */
  async stop(signal = "SIGTERM") {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await child.exited;
    clearTimeout(timer);
  }

  /** Publishes over HTTP (JSON body); resolves with the answer's body. */
  async publish(topic, data, headers = {}) {
    const response = await fetch(`${this.http}/api/topics/${topic}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(data),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`publish to ${topic}: ${response.status} ${JSON.stringify(body)}`);
    return body;
  }

  /** Publishes several messages in one HTTP request: [{topic, data}, ...]. */
  async publishBatch(items, headers = {}) {
    const response = await fetch(`${this.http}/api/publish`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(items),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`batch publish: ${response.status} ${JSON.stringify(body)}`);
    return body;
  }
}

/**
 * A TCP proxy in front of a port: `cut()` drops every connection at once (the client sees 1006),
 * `stall(direction)` stops forwarding one way ("down": server to client, "up": client to server)
 * until `resume()`.
 */
export async function startProxy(targetPort) {
  const pairs = new Set();
  const stalled = { up: false, down: false };
  const forward = (pair) => {
    if (!stalled.up && !pair.up) {
      pair.client.pipe(pair.upstream);
      pair.up = true;
    }
    if (!stalled.down && !pair.down) {
      pair.upstream.pipe(pair.client);
      pair.down = true;
    }
  };
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, "127.0.0.1");
    const pair = { client, upstream, up: false, down: false };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    client.pause();
    upstream.pause();
    forward(pair);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    get connections() {
      return pairs.size;
    },
    cut() {
      for (const pair of [...pairs]) {
        pair.client.resetAndDestroy?.() ?? pair.client.destroy();
        pair.upstream.destroy();
        pairs.delete(pair);
      }
    },
    stall(direction) {
      stalled[direction] = true;
      for (const pair of pairs) {
        if (direction === "up" && pair.up) {
          pair.client.unpipe(pair.upstream);
          pair.client.pause();
          pair.up = false;
        }
        if (direction === "down" && pair.down) {
          pair.upstream.unpipe(pair.client);
          pair.upstream.pause();
          pair.down = false;
        }
      }
    },
    resume() {
      stalled.up = false;
      stalled.down = false;
      for (const pair of pairs) forward(pair);
    },
    close() {
      this.cut();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** An HS256 JWT signed with `secret` (what the server's --jwt-secret verifies). */
export function mintToken(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  const signature = createHmac("sha256", secret).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

export function nowSeconds() {
  return Math.floor(Date.now() / 1000);
}

/** Asserts that `seqs` count up by one from `from` to `to`. */
export function isRun(seqs, from, to) {
  if (seqs.length !== to - from + 1) return false;
  return seqs.every((seq, i) => seq === from + i);
}

/**
 * A WebSocket with only what a browser's offers (no headers, no `terminate`, refusals unseen),
 * around the `ws` package: the client takes its browser paths with it. Records the URLs opened.
 */
export class BrowserWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  static urls = [];
  #socket;

  constructor(url, protocols) {
    BrowserWebSocket.urls.push(url);
    this.#socket = new NodeWebSocket(url, protocols);
    // A browser reports a refused upgrade as an error and a close with 1006, nothing more.
    this.#socket.on("unexpected-response", () => this.#socket.terminate());
  }

  get readyState() {
    return this.#socket.readyState;
  }
  get bufferedAmount() {
    return this.#socket.bufferedAmount;
  }
  get protocol() {
    return this.#socket.protocol;
  }
  get binaryType() {
    return this.#socket.binaryType;
  }
  set binaryType(value) {
    this.#socket.binaryType = value;
  }
  set onopen(listener) {
    this.#socket.onopen = listener;
  }
  set onmessage(listener) {
    this.#socket.onmessage = listener;
  }
  set onerror(listener) {
    this.#socket.onerror = () => listener(new Event("error"));
  }
  set onclose(listener) {
    this.#socket.onclose = listener;
  }
  send(data) {
    this.#socket.send(data);
  }
  close(code, reason) {
    this.#socket.close(code, reason);
  }
}
