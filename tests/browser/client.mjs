// The JavaScript client (clients/js/crier.js, served by Crier at /crier.js) inside a real page:
// for each encoding it subscribes to a topic and a pattern, publishes through the client and
// over HTTP, receives both, and has a publish refused with a typed error. For MessagePack the
// page loads @msgpack/msgpack through an import map, as a browser app would; the test serves
// the package's ESM build from node_modules. Prints what the page saw as JSON.
//
// usage: node client.mjs <http-base-url>
import { readFile } from 'node:fs/promises';
import { launch } from './chromium.mjs';

const [base] = process.argv.slice(2);
const msgpackDir = new URL('./node_modules/@msgpack/msgpack/dist.esm/', import.meta.url);

// The test page. It is written into a document the broker served (GET /healthz), so that it
// has the broker's origin and, for Chromium's local-network checks, its loopback address: a
// document that page.route() made up would count as public and be refused the loopback socket.
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>crier.js in a page</title>
<script type="importmap">{"imports": {"@msgpack/msgpack": "/__test/msgpack/index.mjs"}}</script>
<script type="module">
  import * as client from "/crier.js";
  window.client = client;
</script>`;

const browser = await launch();
try {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (error) => errors.push(error.message));
  const served = [];
  // What arrived on each WebSocket, as text or binary frames (one socket per session).
  const sockets = [];
  page.on('websocket', (ws) => {
    const entry = { url: ws.url(), text: 0, binary: 0 };
    sockets.push(entry);
    ws.on('framereceived', (frame) => (typeof frame.payload === 'string' ? entry.text++ : entry.binary++));
  });
  await page.route(`${base}/__test/**`, async (route) => {
    const path = new URL(route.request().url()).pathname;
    const file = path.slice('/__test/msgpack/'.length);
    if (path.startsWith('/__test/msgpack/') && /^[\w/.-]+\.mjs$/.test(file) && !file.includes('..')) {
      served.push(file);
      return route.fulfill({
        contentType: 'text/javascript; charset=utf-8',
        body: await readFile(new URL(file, msgpackDir)),
      });
    }
    return route.fulfill({ status: 404, body: 'not here' });
  });
  await page.goto(`${base}/healthz`);
  await page.setContent(PAGE);
  await page.waitForFunction(() => window.client !== undefined, null, { timeout: 10000 });

  const sessions = {};
  for (const encoding of ['json', 'msgpack']) {
    sessions[encoding] = await page.evaluate(async (encoding) => {
      const { Crier, CrierError } = window.client;
      const within = (ms, what, promise) => Promise.race([
        promise,
        new Promise((_, reject) => setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms)),
      ]);
      const crier = new Crier('/ws', { encoding });
      const opened = new Promise((resolve) => crier.on('open', (event) => resolve(event.welcome)));
      const topic = `browser.${encoding}`;
      const exact = [];
      const pattern = [];
      let arrived;
      const both = new Promise((resolve) => { arrived = resolve; });
      const check = () => { if (exact.length >= 2 && pattern.length >= 2) arrived(); };
      const sub = crier.subscribe(topic, (m) => { exact.push(m); check(); });
      const patternSub = crier.subscribe('browser.*', (m) => { pattern.push(m); check(); });
      const welcome = await within(10000, 'welcome', opened);
      await within(10000, 'subscribe acks', Promise.all([sub.ready, patternSub.ready]));
      const data = { from: 'the page', encoding, text: 'héllo ✓', n: 1.5, big: 2 ** 40, list: [1, 'two', null, true], nested: { ok: true } };
      const published = await within(10000, 'publish ack', crier.publish(topic, data));
      const response = await fetch(`/api/topics/${topic}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ from: 'http' }),
      });
      const http = await response.json();
      await within(10000, 'both messages on both subscriptions', both);
      let refused = null;
      try {
        await crier.publish('_crier.stats', { forged: true });
      } catch (error) {
        refused = { isCrierError: error instanceof CrierError, name: error.name, code: error.code };
      }
      const position = sub.position;
      await crier.close();
      return {
        welcome: { encoding: welcome.encoding, op: welcome.op },
        clientEncoding: crier.encoding,
        published,
        http,
        exact,
        pattern,
        refused,
        position,
        readyState: crier.readyState,
        sent: data,
      };
    }, encoding);
  }
  console.log(JSON.stringify({
    sessions,
    sockets,
    msgpackFiles: served,
    errors,
    userAgent: await page.evaluate(() => navigator.userAgent),
  }));
} finally {
  await browser.close();
}
