// Backpressure both ways, through a proxy that stops forwarding: the server's buffered amount
// and drops as pongs report them, and publishes that wait in a bounded queue (buffer_full past it).

import assert from "node:assert/strict";
import { after, afterEach, before, test } from "node:test";

import { Crier } from "../crier.js";
import { Broker, closeClients, nextEvent, record, sleep, startProxy, track, waitFor } from "./helpers.js";

let broker;
let proxy;

before(async () => {
  broker = await Broker.start(["--max-buffered-bytes", "64KiB", "--history-size", "1000"]);
  proxy = await startProxy(broker.port);
});

afterEach(() => {
  proxy.resume();
  return closeClients();
});

after(async () => {
  await closeClients();
  await proxy?.close();
  await broker?.stop();
});

async function connections() {
  return (await (await fetch(`${broker.http}/api/connections`)).json()).connections;
}

async function historySeq(topic) {
  const response = await fetch(`${broker.http}/api/topics/${topic}/history?limit=1`);
  return response.ok ? (await response.json()).seq : 0;
}

for (const encoding of ["json", "msgpack"]) {
  test(`${encoding}: serverBufferedAmount and dropped, from pongs; drops reported as gaps`, async () => {
    const topic = `${encoding}.slow`;
    const crier = track(new Crier(proxy.url, { encoding, pingInterval: 100 }));
    const events = record(crier);
    const seqs = [];
    await crier.subscribe(topic, (m) => seqs.push(m.seq)).ready;
    assert.equal((await crier.refreshServerStats()).serverBufferedAmount, 0);

    // The client stops reading: the kernel's buffers fill, then the server's queue (64 KiB),
    // then the slow-consumer policy (drop-oldest) drops messages.
    proxy.stall("down");
    const data = "d".repeat(2000);
    let total = 0;
    // Until the kernel's buffers are full and the server's queue stays full.
    const row = async () => (await connections()).find((c) => c.id === crier.welcome.connection);
    await waitFor(async () => {
      await broker.publishBatch(Array.from({ length: 100 }, () => ({ topic, data })));
      total += 100;
      const now = await row();
      if (!(now.buffered_bytes > 32 * 1024 && now.dropped > 0)) return false;
      // A burst overflows the queue even while the kernel still takes bytes, and the queue then
      // drains: the backlog counts once nothing leaves the queue for a while (keep-alive pongs
      // may still join it).
      await sleep(100);
      return (await row()).buffered_bytes >= now.buffered_bytes;
    }, "a backlog on the server");
    const stats = crier.refreshServerStats();
    // Frames are served in order: once the server has this publish, it has queued the pong.
    const marker = crier.publish(`${encoding}.marker`, 1);
    await waitFor(async () => (await historySeq(`${encoding}.marker`)) > 0, "the marker publish");
    proxy.resume();

    const { serverBufferedAmount, dropped } = await stats;
    assert.ok(serverBufferedAmount > 32 * 1024, `the server held ${serverBufferedAmount} bytes`);
    assert.ok(serverBufferedAmount <= 64 * 1024 + 4096, `at most about --max-buffered-bytes: ${serverBufferedAmount}`);
    assert.ok(dropped > 0, "messages were dropped");
    await marker;
    await waitFor(() => seqs.at(-1) === total, "the last message");
    // Keep-alive pings refresh the figures: the backlog is gone, the drops stay counted.
    await waitFor(() => crier.serverBufferedAmount === 0, "serverBufferedAmount back to 0");
    assert.ok(crier.dropped >= dropped);
    assert.equal(crier.dropped, total - seqs.length, "every message is delivered or counted as dropped");
    for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1]);
    const gaps = events.gap.filter((g) => g.topic === topic);
    assert.ok(gaps.length > 0 && gaps.every((g) => g.reason === "dropped"));
    assert.equal(gaps.reduce((sum, g) => sum + g.missed, 0), total - seqs.length, "gaps count what was missed");
    assert.equal(events.close.length, 0, "still connected");
  });

  test(`${encoding}: publishes wait above highWaterMark, resolve in order, buffer_full past the queue`, async () => {
    const topic = `${encoding}.flood`;
    const highWaterMark = 64 * 1024;
    const crier = track(new Crier(proxy.url, { encoding, highWaterMark }));
    await nextEvent(crier, "open");
    // The broker stops reading from this client: its socket's buffers fill.
    proxy.stall("up");
    const data = "p".repeat(16 * 1024);
    const settled = [];
    const publishes = [];
    let overHighWaterMark = false;
    for (let i = 0; i < 600; i++) {
      publishes.push(
        crier.publish(topic, data).then(
          ({ seq }) => settled.push({ i, seq }),
          (error) => settled.push({ i, code: error.code }),
        ),
      );
      overHighWaterMark ||= crier.bufferedAmount > highWaterMark;
    }
    assert.ok(overHighWaterMark, `bufferedAmount reached ${crier.bufferedAmount}`);
    assert.ok(crier.bufferedAmount > highWaterMark);
    // Past the queue's bound: refused at once, while the others wait.
    await waitFor(() => settled.length > 0, "the first refusals");
    const refusedFirst = settled.filter((s) => s.code === "buffer_full").length;
    assert.equal(refusedFirst, settled.length, "only refusals before the socket drains");
    proxy.resume();
    await Promise.all(publishes);
    const accepted = settled.filter((s) => s.seq !== undefined);
    const refused = settled.filter((s) => s.code !== undefined);
    assert.ok(refused.length > 0 && refused.every((s) => s.code === "buffer_full"), JSON.stringify(refused.slice(0, 3)));
    assert.ok(accepted.length > 0);
    // The accepted ones are the first publishes, resolved in the order they were made, seqs
    // counting up; the refused ones the rest.
    accepted.forEach(({ i, seq }, n) => {
      assert.equal(i, n);
      assert.equal(seq, n + 1);
    });
    assert.equal(refused[0].i, accepted.length);
    assert.equal(crier.readyState, Crier.OPEN);
    // The queue is empty again: publishes go straight out.
    assert.deepEqual(await crier.publish(topic, "after"), { seq: accepted.length + 1 });
  });
}

test("a slow consumer closed with 4008 reconnects, recovers, and does not loop on a replay too big", async () => {
  const strict = await Broker.start(["--max-buffered-bytes", "64KiB", "--slow-consumer", "disconnect", "--history-size", "1000"]);
  const slowProxy = await startProxy(strict.port);
  try {
    const topic = "slow.disconnect";
    const crier = track(new Crier(slowProxy.url, { reconnect: { minDelay: 20, maxDelay: 100 } }));
    const events = record(crier);
    const seqs = [];
    await crier.subscribe(topic, (m) => seqs.push(m.seq)).ready;
    slowProxy.stall("down");
    const data = "d".repeat(4000);
    let total = 0;
    // Until the server gives up on the connection: it no longer receives the topic.
    await waitFor(async () => {
      const { results } = await strict.publishBatch(Array.from({ length: 50 }, () => ({ topic, data })));
      total += 50;
      return results.at(-1).receivers === 0;
    }, "the server to disconnect the slow consumer");
    slowProxy.resume();
    const closed = await nextEvent(crier, "close");
    // The close frame (4008) arrives if it made it into the socket before the teardown.
    assert.ok(closed.code === 4008 || closed.code === 1006, `closed with ${closed.code}`);
    assert.equal(closed.willReconnect, true);
    // The replay of what was missed (200 KB or more) does not fit the server's 64 KiB buffer
    // either: closed again with 4008, then renewed without `since`, with a gap.
    const gap = await nextEvent(crier, "gap");
    assert.equal(gap.reason, "dropped");
    await waitFor(() => crier.readyState === Crier.OPEN, "connected");
    await strict.publish(topic, "live");
    total += 1;
    await waitFor(() => seqs.at(-1) === total, "the live message");
    for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1]);
    const missed = events.gap.reduce((sum, g) => sum + g.missed, 0);
    assert.equal(seqs.length + missed, total, "every message delivered or counted in a gap");
    assert.ok(events.close.length <= 2, `${events.close.length} disconnections`);
    assert.ok(events.close.every((e) => e.willReconnect));
  } finally {
    await closeClients();
    await slowProxy.close();
    await strict.stop();
  }
});
