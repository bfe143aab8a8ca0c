// Tokens against a Crier started with --jwt-secret: grants (forbidden), refused upgrades,
// authentication required (4003), refreshing with `auth` before expiry, and 4002 followed by
// getToken() and a reconnection that renews and recovers subscriptions.

import assert from "node:assert/strict";
import { after, afterEach, before, describe, test } from "node:test";

import { Crier } from "../crier.js";
import { BrowserWebSocket, Broker, closeClients, isRun, mintToken, nextEvent, nowSeconds, record, track, waitFor } from "./helpers.js";

const SECRET = "a-test-secret-of-some-length-0123456789";
const API_KEY = "test-api-key";
const apiKey = { authorization: `Bearer ${API_KEY}` };

let broker;

function token(claims = {}, lifetime = 60, secret = SECRET) {
  return mintToken(secret, {
    sub: "user42",
    exp: nowSeconds() + lifetime,
    crier: { subscribe: ["chat.*", "t.>"], publish: ["chat.*", "t.>"] },
    ...claims,
  });
}

before(async () => {
  broker = await Broker.start(["--jwt-leeway", "0s", "--auth-timeout", "1s"], {
    CRIER_JWT_SECRET: SECRET,
    CRIER_API_KEY: API_KEY,
  });
});

afterEach(closeClients);

after(async () => {
  await closeClients();
  await broker?.stop();
});

for (const encoding of ["json", "msgpack"]) {
  describe(`${encoding}: grants`, () => {
    test("a publish or subscribe outside the token's grants is forbidden", async () => {
      const t = token();
      const crier = track(new Crier(broker.url, { encoding, token: t }));
      const opened = await nextEvent(crier, "open");
      assert.equal(opened.welcome.authenticated, true);
      assert.equal(opened.welcome.user, "user42");
      assert.equal(opened.welcome.expires_at, JSON.parse(atob(t.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).exp);
      await assert.rejects(crier.publish("news.x", 1), { name: "CrierError", code: "forbidden" });
      await assert.rejects(crier.subscribe("news.x", () => {}).ready, { code: "forbidden" });
      // `chat.>` reaches beyond `chat.*`: not granted.
      await assert.rejects(crier.subscribe("chat.>", () => {}).ready, { code: "forbidden" });
      const got = [];
      await crier.subscribe("chat.*", (m) => got.push(m.data)).ready;
      assert.deepEqual(await crier.publish(`chat.${encoding}`, "hi"), { seq: 1 });
      assert.deepEqual(got, ["hi"]);
    });
  });
}

test("a refused token (401 invalid_token) without getToken stops, reporting the server's code", async () => {
  const crier = track(new Crier(broker.url, { token: token({}, 60, "another-secret") }));
  const events = record(crier);
  const closed = await nextEvent(crier, "close");
  assert.equal(closed.willReconnect, false);
  assert.equal(crier.readyState, Crier.CLOSED);
  assert.equal(events.error.length, 1);
  assert.equal(events.error[0].error.code, "invalid_token");
  assert.equal(events.error[0].error.status, 401);
  assert.equal(events.reconnecting.length, 0);
});

test("with getToken, a refused token is replaced by a fresh one", async () => {
  let calls = 0;
  const crier = track(
    new Crier(broker.url, {
      getToken: async () => (++calls === 1 ? "not-a-token" : token()),
      reconnect: { minDelay: 20, maxDelay: 100 },
    }),
  );
  const events = record(crier);
  await nextEvent(crier, "open");
  assert.equal(calls, 2);
  assert.deepEqual(events.error.map((e) => e.error.code), ["invalid_token"]);
  assert.equal(events.reconnecting.length, 1);
});

test("a browser's WebSocket carries the token in ?token=; a refusal there is retried with a fresh token", async () => {
  let calls = 0;
  const crier = track(
    new Crier(broker.url, {
      WebSocket: BrowserWebSocket,
      token: "not-a-token",
      getToken: () => {
        calls += 1;
        return token({ sub: "browser" });
      },
      reconnect: { minDelay: 20, maxDelay: 100 },
    }),
  );
  const events = record(crier);
  const opened = await nextEvent(crier, "open");
  assert.equal(opened.welcome.user, "browser");
  assert.equal(calls, 1);
  const [refused, accepted] = BrowserWebSocket.urls.slice(-2).map((url) => new URL(url).searchParams.get("token"));
  assert.equal(refused, "not-a-token");
  assert.equal(accepted.split(".").length, 3);
  // The browser does not see the 401: a failed connection, retried.
  assert.deepEqual(events.error.map((e) => e.error.code), ["connect_failed"]);
  assert.equal(events.reconnecting.length, 1);
  await crier.subscribe("chat.browser", () => {}).ready;
});

test("without a token: unauthorized, then closed with 4003 and not reconnected", async () => {
  const crier = track(new Crier(broker.url, { reconnect: { minDelay: 20, maxDelay: 100 } }));
  const events = record(crier);
  const opened = await nextEvent(crier, "open");
  assert.equal(opened.welcome.authenticated, false);
  await assert.rejects(crier.publish("chat.a", 1), { code: "unauthorized" });
  const closed = await nextEvent(crier, "close");
  assert.equal(closed.code, 4003);
  assert.equal(closed.willReconnect, false);
  assert.equal(events.error.at(-1).error.code, "connection_closed");
  assert.equal(events.error.at(-1).error.closeCode, 4003);
  assert.equal(events.reconnecting.length, 0);
});

test("the token is refreshed with auth before it expires: the connection stays up", async () => {
  let calls = 0;
  let firstExp = 0;
  const crier = track(
    new Crier(broker.url, {
      getToken: () => {
        calls += 1;
        const t = token({}, 3);
        if (calls === 1) firstExp = nowSeconds() + 3;
        return t;
      },
    }),
  );
  const events = record(crier);
  const got = [];
  await crier.subscribe("t.refresh", (m) => got.push(m.seq)).ready;
  // Two refreshes, and past the first token's expiry.
  await waitFor(() => calls >= 3 && Date.now() > firstExp * 1000 + 300, "two refreshes past the first expiry");
  assert.equal(events.close.length, 0, "never disconnected");
  assert.equal(events.error.length, 0, `no errors: ${events.error.map((e) => e.message)}`);
  assert.ok(crier.welcome.expires_at <= firstExp, "the welcome was for the first token");
  await crier.publish("t.refresh", 1);
  assert.deepEqual(got, [1]);
});

test("4002: getToken() is called, the client reconnects, renews and recovers its subscriptions", async () => {
  let expired = false;
  let calls = 0;
  const crier = track(
    new Crier(broker.url, {
      getToken: () => {
        calls += 1;
        if (calls === 1) return token({}, 2);
        // Refreshes are refused (wrongly signed) until the token has expired.
        return expired ? token() : token({}, 60, "another-secret");
      },
      reconnect: { minDelay: 200, maxDelay: 400 },
    }),
  );
  const events = record(crier);
  const seqs = [];
  const sub = crier.subscribe("t.expiry", (m) => {
    assert.equal(m.data, m.seq);
    seqs.push(m.seq);
  });
  await sub.ready;
  for (let i = 1; i <= 3; i++) await broker.publish("t.expiry", i, apiKey);
  const published = [];
  crier.addEventListener("close", (event) => {
    if (event.code !== 4002) return;
    expired = true;
    // Published while the client is away: recovered with `since` after the reconnection.
    published.push((async () => {
      for (let i = 4; i <= 6; i++) await broker.publish("t.expiry", i, apiKey);
    })());
  });
  const closed = await nextEvent(crier, "close");
  assert.equal(closed.code, 4002);
  assert.equal(closed.willReconnect, true);
  assert.ok(events.error.some((e) => e.error.code === "invalid_token"), "the refused refresh was reported");
  const reopened = await nextEvent(crier, "open");
  assert.equal(reopened.reconnected, true);
  await Promise.all(published);
  await broker.publish("t.expiry", 7, apiKey);
  await waitFor(() => seqs.length === 7, "7 messages");
  assert.ok(isRun(seqs, 1, 7), `seqs ${seqs}`);
  assert.equal(events.gap.length, 0);
  assert.equal(sub.position.seq, 7);
  assert.ok(reopened.welcome.expires_at > nowSeconds() + 30, "reconnected with the fresh token");
});
