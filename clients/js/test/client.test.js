// Every op in both encodings against a real Crier: subscribe (topics, patterns, rewind, latest),
// unsubscribe, publish, ping; errors; batched frames; events and ready states.

import assert from "node:assert/strict";
import { after, afterEach, before, describe, test } from "node:test";
import { WebSocket as WsWebSocket } from "ws";

import { Crier, CrierError } from "../crier.js";
import { BrowserWebSocket, Broker, closeClients, isRun, nextEvent, record, track, waitFor } from "./helpers.js";

let broker;
let limited;

before(async () => {
  [broker, limited] = await Promise.all([
    Broker.start(["--max-message-bytes", "4KiB"]),
    Broker.start(["--publish-rate", "5"]),
  ]);
});

afterEach(closeClients);

after(async () => {
  await closeClients();
  await Promise.all([broker?.stop(), limited?.stop()]);
});

for (const encoding of ["json", "msgpack"]) {
  describe(`${encoding} encoding`, () => {
    const open = async (options = {}) => {
      const crier = track(new Crier(broker.url, { encoding, ...options }));
      if (crier.readyState !== Crier.OPEN) await nextEvent(crier, "open");
      return crier;
    };

    test("connects with its subprotocol and closes", async () => {
      const crier = track(new Crier(broker.url, { encoding }));
      assert.equal(crier.readyState, Crier.CONNECTING);
      assert.equal(crier.readyState, crier.CONNECTING);
      const events = record(crier);
      const opened = await nextEvent(crier, "open");
      assert.equal(opened.reconnected, false);
      assert.equal(opened.welcome.encoding, encoding);
      assert.equal(crier.welcome.connection, opened.welcome.connection);
      assert.equal(crier.readyState, Crier.OPEN);
      assert.equal(typeof crier.bufferedAmount, "number");
      await crier.close();
      assert.equal(crier.readyState, Crier.CLOSED);
      assert.equal(events.close.length, 1);
      assert.equal(events.close[0].code, 1000);
      assert.equal(events.close[0].willReconnect, false);
      assert.equal(events.reconnecting.length, 0);
      assert.equal(crier.welcome, null);
      await assert.rejects(crier.publish("a.b", 1), { name: "CrierError", code: "closed" });
    });

    test("subscribe, publish, receive; publishes before the connection opens wait for it", async () => {
      const topic = `${encoding}.basic`;
      const crier = track(new Crier(broker.url, { encoding }));
      const received = [];
      const sub = crier.subscribe(topic, (message) => received.push(message));
      assert.equal(sub.topic, topic);
      assert.equal(sub.position, null);
      assert.equal(sub.active, false);
      const data = { text: "héllo ✓", n: 42, f: 1.5, list: [1, "two", null, true], nested: { deep: [{}] } };
      const first = crier.publish(topic, data); // queued until the welcome
      const second = crier.publish(topic, null);
      assert.equal(await sub.ready, sub);
      assert.equal(sub.active, true);
      assert.deepEqual(await first, { seq: 1 });
      assert.deepEqual(await second, { seq: 2 });
      // The publisher receives its own message before the ack.
      assert.deepEqual(received, [
        { topic, seq: 1, data },
        { topic, seq: 2, data: null },
      ]);
      assert.equal(sub.position.seq, 2);
      assert.equal(typeof sub.position.epoch, "string");
      await broker.publish(topic, { from: "http" });
      await waitFor(() => received.length === 3, "the HTTP publish");
      assert.deepEqual(received[2], { topic, seq: 3, data: { from: "http" } });
      await crier.close();
    });

    test("with a browser's WebSocket (the standard interface only)", async () => {
      const crier = await open({ WebSocket: BrowserWebSocket, batch: true });
      const got = [];
      await crier.subscribe(`${encoding}.browser`, (m) => got.push(m.data)).ready;
      await broker.publishBatch([1, 2, 3].map((data) => ({ topic: `${encoding}.browser`, data })));
      await waitFor(() => got.length === 3, "3 messages");
      assert.deepEqual(got, [1, 2, 3]);
      assert.deepEqual(await crier.publish(`${encoding}.browser`, 4), { seq: 4 });
      assert.ok(BrowserWebSocket.urls.at(-1).endsWith("?batch=1"));
    });

    if (encoding === "msgpack") {
      test("binary data stays binary", async () => {
        const crier = await open();
        const received = [];
        await crier.subscribe("msgpack.bytes", (m) => received.push(m.data)).ready;
        await crier.publish("msgpack.bytes", new Uint8Array([0, 1, 2, 255]));
        assert.deepEqual(received, [new Uint8Array([0, 1, 2, 255])]);
        await crier.close();
      });
    }

    test("patterns, overlapping subscriptions each see a message once", async () => {
      const root = `${encoding}.pat`;
      const crier = await open();
      const seen = { star: [], tail: [], exact: [], other: [] };
      const star = crier.subscribe(`${root}.*`, (m) => seen.star.push(`${m.topic}#${m.seq}`));
      const tail = crier.subscribe(`${root}.>`, (m) => seen.tail.push(`${m.topic}#${m.seq}`));
      const exact = crier.subscribe(`${root}.a`, (m) => seen.exact.push(`${m.topic}#${m.seq}`));
      await Promise.all([star.ready, tail.ready, exact.ready]);
      assert.equal(star.position, null);
      await crier.publish(`${root}.a`, 1);
      await crier.publish(`${root}.b`, 2);
      await crier.publish(`${root}.b.c`, 3);
      await crier.publish(`${encoding}.other.a`, 4);
      assert.deepEqual(seen.star, [`${root}.a#1`, `${root}.b#1`]);
      assert.deepEqual(seen.tail, [`${root}.a#1`, `${root}.b#1`, `${root}.b.c#1`]);
      assert.deepEqual(seen.exact, [`${root}.a#1`]);
      await crier.close();
    });

    test("rewind replays the last messages, then live ones", async () => {
      const topic = `${encoding}.rewind`;
      for (let i = 1; i <= 5; i++) await broker.publish(topic, i);
      const crier = await open();
      const live = [];
      const replayed = [];
      const first = crier.subscribe(topic, (m) => live.push(m.seq));
      await first.ready;
      assert.equal(first.position.seq, 5);
      // A second subscription to the same topic with rewind: only it sees the replay.
      const second = crier.subscribe(topic, (m) => replayed.push(m.data), { rewind: 2 });
      await second.ready;
      await crier.publish(topic, 6);
      assert.equal(second.position.seq, 6);
      assert.deepEqual(replayed, [4, 5, 6]);
      assert.deepEqual(live, [6]);
      // A pattern with rewind: the current value of each matching topic.
      const values = [];
      await crier.subscribe(`${encoding}.*`, (m) => m.topic === topic && values.push(m.data), { rewind: 1 }).ready;
      await waitFor(() => values.length === 1, "the pattern's rewind");
      assert.deepEqual(values, [6]);
      await crier.close();
    });

    test("unsubscribe stops delivery; a shared topic keeps its other handler", async () => {
      const topic = `${encoding}.unsub`;
      const crier = await open();
      const a = [];
      const b = [];
      const subA = crier.subscribe(topic, (m) => a.push(m.seq));
      const subB = crier.subscribe(topic, (m) => b.push(m.seq));
      await Promise.all([subA.ready, subB.ready]);
      await crier.publish(topic, 1);
      await subA.unsubscribe();
      assert.equal(subA.active, false);
      await crier.publish(topic, 2);
      assert.deepEqual(a, [1]);
      assert.deepEqual(b, [1, 2]);
      await subB.unsubscribe();
      await subB.unsubscribe(); // twice is fine
      // The server unsubscribed: the ack of our own publish comes after the message, if any.
      await crier.publish(topic, 3);
      assert.deepEqual(b, [1, 2]);
      await crier.close();
    });

    test("mode latest with maxRate conflates; no gap events for it", async () => {
      const topic = `${encoding}.latest`;
      const crier = await open();
      const events = record(crier);
      const values = [];
      await crier.subscribe(topic, (m) => values.push(m.data), { mode: "latest", maxRate: 5 }).ready;
      await broker.publishBatch(Array.from({ length: 50 }, (_, i) => ({ topic, data: i })));
      await waitFor(() => values.at(-1) === 49, "the last value");
      assert.ok(values.length < 10, `conflated to a few frames, got ${values.length}`);
      assert.deepEqual([...values].sort((x, y) => x - y), values, "in order");
      assert.equal(events.gap.length, 0);
      await crier.close();
    });

    test("ping: refreshServerStats reports the server's buffered amount and drops", async () => {
      const crier = await open();
      const stats = await crier.refreshServerStats();
      assert.deepEqual(stats, { serverBufferedAmount: 0, dropped: 0 });
      assert.equal(crier.serverBufferedAmount, 0);
      assert.equal(crier.dropped, 0);
      await crier.close();
      await assert.rejects(crier.refreshServerStats(), { code: "disconnected" });
    });

    test("errors carry the server's code", async () => {
      const crier = await open();
      const events = record(crier);
      await assert.rejects(crier.publish(`${encoding}.*`, 1), (error) => {
        assert.ok(error instanceof CrierError);
        assert.equal(error.code, "invalid_topic");
        assert.match(error.message, /wildcard/);
        return true;
      });
      await assert.rejects(crier.publish("bad..topic", 1), { code: "invalid_topic" });
      const bad = crier.subscribe("bad..topic", () => {});
      await assert.rejects(bad.ready, { code: "invalid_topic" });
      assert.equal(bad.active, false);
      await assert.rejects(crier.subscribe(`${encoding}.x`, () => {}, { maxRate: 5 }).ready, { code: "bad_frame" });
      assert.deepEqual(
        events.error.map((e) => e.error.code),
        ["invalid_topic", "bad_frame"],
        "failed subscriptions are reported as error events too",
      );
      // Over --max-message-bytes (4 KiB) but within the frame limit: the server refuses it.
      await assert.rejects(crier.publish(`${encoding}.big`, "x".repeat(5000)), { code: "payload_too_large" });
      // Over the frame limit: refused before sending (the server would close with 1009).
      await assert.rejects(crier.publish(`${encoding}.big`, "x".repeat(20_000)), (error) => {
        assert.equal(error.code, "payload_too_large");
        assert.match(error.message, /max_frame_bytes/);
        return true;
      });
      const circular = {};
      circular.self = circular;
      await assert.rejects(crier.publish(`${encoding}.big`, circular), { code: "bad_data" });
      // Still connected and working.
      assert.deepEqual(await crier.publish(`${encoding}.big`, "small"), { seq: 1 });
      assert.equal(events.close.length, 0);
      await crier.close();
    });

    test("rate_limited past --publish-rate, without consuming seqs", async () => {
      const topic = `${encoding}.rate`;
      const crier = track(new Crier(limited.url, { encoding }));
      const results = await Promise.allSettled(Array.from({ length: 20 }, (_, i) => crier.publish(topic, i)));
      const accepted = results.filter((r) => r.status === "fulfilled").map((r) => r.value.seq);
      const refused = results.filter((r) => r.status === "rejected").map((r) => r.reason.code);
      assert.ok(accepted.length >= 5 && refused.length >= 10, `${accepted.length} accepted, ${refused.length} refused`);
      assert.ok(refused.every((code) => code === "rate_limited"), String(refused));
      assert.ok(isRun(accepted, 1, accepted.length), `seqs ${accepted}`);
      await crier.close();
    });

    test("batched frames (?batch=1): several frames per WebSocket message", async () => {
      const topic = `${encoding}.batch`;
      let messages = 0;
      class Counting extends WsWebSocket {
        constructor(...args) {
          super(...args);
          this.addEventListener("message", () => messages++);
        }
      }
      const crier = await open({ batch: true, WebSocket: Counting });
      assert.equal(crier.welcome.batch, true);
      const seqs = [];
      await crier.subscribe(topic, (m) => {
        assert.equal(m.data.i, m.seq);
        seqs.push(m.seq);
      }).ready;
      const before = messages;
      await broker.publishBatch(Array.from({ length: 300 }, (_, i) => ({ topic, data: { i: i + 1, pad: "p".repeat(40) } })));
      await waitFor(() => seqs.length === 300, "300 messages");
      assert.ok(isRun(seqs, 1, 300));
      assert.ok(messages - before < 300, `${messages - before} WebSocket messages for 300 frames`);
      await crier.close();
    });
  });
}

test("options are checked", () => {
  assert.throws(() => new Crier("ftp://x/ws"), SyntaxError);
  assert.throws(() => new Crier("ws://x/ws", { encoding: "xml" }), TypeError);
  assert.throws(() => new Crier("ws://x/ws", { getToken: "token" }), TypeError);
  assert.throws(() => new Crier("ws://x/ws", { reconnect: { minDelay: 10, maxDelay: 5 } }), RangeError);
});

test("http:// URLs are turned into ws:// ones", async () => {
  const crier = track(new Crier(broker.http + "/ws"));
  assert.equal(crier.url, broker.url);
  await nextEvent(crier, "open");
  await crier.close();
});

test("a handler that throws is reported, and the others go on", async () => {
  const crier = track(new Crier(broker.url));
  const got = [];
  crier.subscribe("throws.t", () => {
    throw new Error("boom");
  });
  await crier.subscribe("throws.t", (m) => got.push(m.seq)).ready;
  const reported = nextEvent(crier, "error");
  await crier.publish("throws.t", 1);
  assert.equal((await reported).error.message, "boom");
  assert.deepEqual(got, [1]);
  await crier.close();
});
