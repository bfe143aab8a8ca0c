// Reconnection: a TCP proxy cuts connections at random moments while a publisher goes on (every
// message exactly once and in order, or a reported gap), and the broker restarts (its epochs
// change: gaps reported, subscriptions renewed).

import assert from "node:assert/strict";
import { after, afterEach, before, test } from "node:test";

import { Crier } from "../crier.js";
import { Broker, closeClients, isRun, nextEvent, record, sleep, startProxy, track, waitFor } from "./helpers.js";

let broker;
let proxy;

before(async () => {
  broker = await Broker.start(["--history-size", "1000"]);
  proxy = await startProxy(broker.port);
});

afterEach(closeClients);

after(async () => {
  await closeClients();
  await proxy?.close();
  await broker?.stop();
});

/** Checks what one exact-topic handler saw: in order, no duplicates, every seq or a gap for it. */
function checkExact(name, seqs, gaps, total) {
  for (let i = 1; i < seqs.length; i++) {
    assert.ok(seqs[i] > seqs[i - 1], `${name}: ${seqs[i]} after ${seqs[i - 1]}`);
  }
  const missing = total - seqs.length;
  if (missing > 0) assert.ok(gaps.length > 0, `${name}: ${missing} messages missing without a gap event`);
}

test("cuts at random moments: each handler sees every message once, in order, or a gap", async (t) => {
  const TOTAL = 300;
  const topic = "cut.t";
  const clients = ["json", "msgpack"].map((encoding) => {
    const crier = track(new Crier(proxy.url, { encoding, reconnect: { minDelay: 10, maxDelay: 80 } }));
    const state = { crier, encoding, exact: [], pattern: new Map(), events: record(crier), batched: null };
    crier.subscribe(topic, (m) => {
      assert.equal(m.data.i, m.seq, "data matches its seq");
      state.exact.push(m.seq);
    });
    // A pattern cannot be recovered: it must stay in order and report a gap per reconnection.
    crier.subscribe("cut.*", (m) => {
      const seen = state.pattern.get(m.topic) ?? [];
      seen.push(m.seq);
      state.pattern.set(m.topic, seen);
    });
    return state;
  });
  // The same with batched frames.
  {
    const crier = track(new Crier(proxy.url, { batch: true, encoding: "msgpack", reconnect: { minDelay: 10, maxDelay: 80 } }));
    const state = { crier, encoding: "msgpack+batch", exact: [], pattern: new Map(), events: record(crier) };
    crier.subscribe(topic, (m) => state.exact.push(m.seq));
    clients.push(state);
  }
  await Promise.all(clients.map(({ crier }) => (crier.readyState === Crier.OPEN ? null : nextEvent(crier, "open"))));
  await waitFor(() => clients.every(({ crier }) => crier.welcome && proxy.connections === clients.length), "subscribed");
  await Promise.all(clients.map(({ crier }) => crier.refreshServerStats())); // subscriptions acked before

  let publishing = true;
  let cuts = 0;
  const cutter = (async () => {
    while (publishing) {
      await sleep(60 + Math.random() * 240);
      if (!publishing) break;
      proxy.cut();
      cuts += 1;
    }
  })();
  for (let i = 1; i <= TOTAL; i++) {
    await broker.publish(topic, { i });
    if (i % 3 === 0) await broker.publish("cut.other", { i });
    await sleep(2);
  }
  publishing = false;
  await cutter;
  await waitFor(
    () => clients.every(({ exact, events }) => exact.at(-1) === TOTAL || events.gap.some((g) => g.topic === topic)),
    "the last message everywhere",
    20_000,
  );
  assert.ok(cuts >= 3, `only ${cuts} cuts`);
  t.diagnostic(`${cuts} cuts; reconnections: ${clients.map((c) => c.events.reconnecting.length)}`);
  for (const { encoding, exact, pattern, events } of clients) {
    const exactGaps = events.gap.filter((g) => g.topic === topic);
    checkExact(encoding, exact, exactGaps, TOTAL);
    // History (1000 messages) outlasts every outage here: nothing is lost.
    assert.equal(exactGaps.length, 0, `${encoding}: gaps ${JSON.stringify(exactGaps.map((g) => g.reason))}`);
    assert.ok(isRun(exact, 1, TOTAL), `${encoding}: ${exact.length} messages`);
    assert.ok(events.reconnecting.length >= 3, `${encoding}: ${events.reconnecting.length} reconnections`);
    assert.equal(events.close.filter((e) => !e.willReconnect).length, 0);
    assert.ok(events.close.every((e) => e.code === 1006));
    for (const [name, seqs] of pattern) {
      for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `${encoding} pattern ${name}: out of order`);
    }
    if (pattern.size > 0) {
      const patternGaps = events.gap.filter((g) => g.pattern === "cut.*" && g.reason === "reconnected");
      // One per renewal that the server acknowledged (a cut may come before the ack).
      assert.ok(patternGaps.length >= 1 && patternGaps.length <= events.open.length - 1, `${encoding}: pattern gaps`);
    }
  }
});

test("broker restart: the epoch changes, a gap is reported, subscriptions are renewed", async () => {
  const own = await Broker.start(["--shutdown-grace", "1s"]);
  try {
    const crier = track(new Crier(own.url, { encoding: "msgpack", reconnect: { minDelay: 50, maxDelay: 200 } }));
    const events = record(crier);
    const received = [];
    const sub = crier.subscribe("restart.t", (m) => received.push(["exact", m.seq, m.data]));
    const latest = crier.subscribe("restart.l", (m) => received.push(["latest", m.seq, m.data]), { mode: "latest" });
    crier.subscribe("restart.*", (m) => m.topic === "restart.p" && received.push(["pattern", m.seq, m.data]));
    // Gaps are reported in the stream of messages, before what follows them.
    crier.addEventListener("gap", (g) => received.push(["gap", g.topic, g.reason]));
    await Promise.all([sub.ready, latest.ready]);
    for (let i = 1; i <= 3; i++) await own.publish("restart.t", `old ${i}`);
    await own.publish("restart.l", "old");
    await waitFor(() => received.filter(([kind]) => kind === "exact").length === 3, "3 messages");
    const before = sub.position;
    assert.equal(before.seq, 3);

    await own.stop("SIGTERM");
    const closed = events.close.at(-1) ?? (await nextEvent(crier, "close"));
    assert.equal(closed.code, 1001, "going away");
    assert.equal(closed.willReconnect, true);
    await waitFor(() => events.reconnecting.length >= 2, "failed attempts while the broker is down");
    assert.equal(crier.readyState, Crier.CONNECTING);
    received.length = 0;
    await own.start(); // the same port
    const reopened = await nextEvent(crier, "open", () => true, 15_000);
    assert.equal(reopened.reconnected, true);
    await waitFor(() => sub.position?.epoch !== before.epoch, "the new epoch");
    await own.publish("restart.t", "new 1");
    await own.publish("restart.l", "new");
    await own.publish("restart.p", "pattern 1");
    await waitFor(
      () => ["exact", "latest", "pattern"].every((kind) => received.some(([k]) => k === kind)),
      "messages after the restart",
    );
    const exact = received.filter(([kind, topic]) => kind === "exact" || topic === "restart.t");
    assert.deepEqual(exact, [
      ["gap", "restart.t", "epoch"],
      ["exact", 1, "new 1"],
    ]);
    assert.deepEqual(
      received.filter(([kind]) => kind === "latest"),
      [["latest", 1, "new"]],
    );
    assert.ok(received.some(([kind, topic, reason]) => kind === "gap" && topic === "restart.*" && reason === "reconnected"));
    assert.deepEqual(received.filter(([kind]) => kind === "pattern"), [["pattern", 1, "pattern 1"]]);
    assert.deepEqual(sub.position, { epoch: sub.position.epoch, seq: 1 });
    assert.equal(events.gap.filter((g) => g.topic === "restart.l").length, 0, "latest subscriptions reload, no gap");
  } finally {
    await closeClients();
    await own.stop();
  }
});
