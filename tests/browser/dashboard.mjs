// The dashboard at / in headless Chromium, driven step by step with tests/browser.rs, which owns
// the broker process, the background traffic and the stalled consumer.
//
// Lines on stdout are the protocol (one JSON object each): {"step": "stall"} asks the test to
// connect a consumer that never reads and to publish large messages to it; the test answers on
// stdin with {"stalled": "<connection id>"}. {"step": "restart"} asks it to kill the broker and
// start it again on the same port; it answers {"restarted": true}. The last line is
// {"step": "done", ...} with what was observed. Diagnostics go to stderr.
//
// usage: node dashboard.mjs <http-base-url> <screenshot.png> [<another copy.png> ...]
import { copyFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { launch, until } from './chromium.mjs';

const [base, screenshot, ...copies] = process.argv.slice(2);
const input = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function step(name) {
  process.stdout.write(`${JSON.stringify({ step: name })}\n`);
  const { value, done } = await input.next();
  if (done) throw new Error(`the test went away during ${name}`);
  return JSON.parse(value);
}

async function publish(topic, data) {
  const response = await fetch(`${base}/api/topics/${topic}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(data),
  });
  if (!response.ok) throw new Error(`publish to ${topic}: HTTP ${response.status}`);
  return response.json();
}

const number = (text) => Number(String(text).replace(/[^\d.-]/g, ''));

const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
// Exceptions in the page, and console errors and warnings (a refused script or style, a CSP
// violation) by phase: while the broker is down, failed connections are expected.
const problems = { pageErrors: [], console: [], consoleWhileRestarting: [] };
let phase = 'console';
page.on('pageerror', (error) => problems.pageErrors.push(error.message));
page.on('console', (message) => {
  if (message.type() === 'error' || message.type() === 'warning') {
    const list = phase === 'restart' ? problems.consoleWhileRestarting : problems.console;
    list.push(`${message.type()}: ${message.text()}`);
  }
});
const observed = {};
try {
  await page.goto(`${base}/`);
  // Every change of the badge, in order.
  await page.evaluate(() => {
    const badge = document.getElementById('status');
    window.statusLog = [badge.textContent];
    new MutationObserver(() => {
      if (window.statusLog.at(-1) !== badge.textContent) window.statusLog.push(badge.textContent);
    }).observe(badge, { childList: true, characterData: true, subtree: true });
  });
  await page.waitForFunction(() => document.getElementById('status').textContent === 'connected', null, { timeout: 15000 });
  const badgeClass = await page.getAttribute('#status', 'class');
  const selfBefore = await page.evaluate(() => document.getElementById('status').title);

  // The console: subscribe to a pattern, get a message published over HTTP.
  await page.fill('#console-topic', 'demo.>');
  await page.click('#console-subscribe');
  await page.waitForSelector('#console-subscriptions .chip[data-topic="demo.>"]:not(.pending)', { timeout: 10000 });
  const http = await publish('demo.greeting', { hello: 'from HTTP', n: 42 });
  const greeting = await page.waitForSelector(
    '#console-log li.console-message[data-topic="demo.greeting"]',
    { timeout: 10000 },
  );
  observed.httpMessage = {
    published: http,
    seq: await greeting.getAttribute('data-seq'),
    text: await greeting.textContent(),
  };

  // The console's publish form goes through the client; a broker topic is refused.
  await page.fill('#publish-topic', '_crier.stats');
  await page.fill('#publish-data', '{"forged": true}');
  await page.click('#publish-submit');
  await until('the forged stats to be refused', async () =>
    (await page.getAttribute('#publish-result', 'class')) === 'error' &&
    (await page.textContent('#publish-result')));
  observed.forbiddenPublish = await page.textContent('#publish-result');
  await page.fill('#publish-topic', 'demo.console');
  await page.fill('#publish-data', '{"from": "the console", "ok": true}');
  await page.click('#publish-submit');
  await page.waitForSelector('#publish-result[data-seq]', { timeout: 10000 });
  observed.consolePublish = {
    result: await page.textContent('#publish-result'),
    received: await (await page.waitForSelector(
      '#console-log li.console-message[data-topic="demo.console"]',
      { timeout: 10000 },
    )).textContent(),
  };
  // Out of the way of the screenshot.
  await page.evaluate(() => document.activeElement?.blur());

  // The figures, the tables and the charts move with the test's traffic.
  const figures = () => page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    const rates = document.getElementById('chart-rates');
    return {
      connections: text('conn-total'),
      published: text('total-published'),
      delivered: text('total-delivered'),
      publishRate: text('rate-published'),
      statsTime: Number(document.getElementById('updated').dataset.time || 0),
      points: Number(rates.dataset.points),
      lastTime: Number(rates.dataset.lastTime || 0),
      canvas: rates.querySelector('canvas')?.toDataURL() ?? '',
    };
  });
  const before = await until('the first stats', async () => {
    const f = await figures();
    return f.points >= 2 && f;
  });
  const after = await until('the figures and the charts to move', async () => {
    const f = await figures();
    return f.points > before.points + 2 && number(f.published) > number(before.published) && f;
  });
  const topicRow = await until('demo.orders with subscribers and a rate in the topics table', () =>
    page.evaluate(() => {
      const row = document.querySelector('#topics tr[data-topic="demo.orders"]');
      return row && Number(row.dataset.rate) > 0 && Number(row.dataset.subscribers) >= 1 &&
        { subscribers: Number(row.dataset.subscribers), rate: Number(row.dataset.rate) };
    }));
  observed.moving = {
    connections: number(after.connections),
    published: [number(before.published), number(after.published)],
    delivered: [number(before.delivered), number(after.delivered)],
    points: [before.points, after.points],
    lastTime: [before.lastTime, after.lastTime],
    chartRedrawn: before.canvas !== after.canvas && after.canvas.length > 1000,
    topic: topicRow,
  };

  // A stalled consumer: its row comes first, grows, and is highlighted past half the limit.
  const { stalled } = await step('stall');
  const samples = [];
  const selector = `#connections tr[data-id="${stalled}"]`;
  const slow = await until(`the stalled consumer ${stalled} to be highlighted`, async () => {
    const row = await page.evaluate((selector) => {
      const row = document.querySelector(selector);
      return row && {
        buffered: Number(row.dataset.buffered),
        slow: row.classList.contains('slow'),
        first: row === row.parentElement.firstElementChild,
        amount: row.querySelector('.amount').textContent,
      };
    }, selector);
    if (row && samples.at(-1)?.buffered !== row.buffered) samples.push(row);
    return row?.slow && row;
  }, { timeout: 30000, every: 200 });
  const maxBuffered = await page.evaluate(() => document.getElementById('max-buffered').textContent);
  // Past the limit the broker drops the oldest: the drops table and the row show it.
  const drops = await until('buffer_full_oldest drops', () => page.evaluate((selector) => {
    const reason = document.querySelector('#drops tr[data-reason="buffer_full_oldest"]');
    const row = document.querySelector(selector);
    const dropped = row ? Number(row.children[7].textContent.replace(/\D/g, '')) : 0;
    return reason && Number(reason.dataset.count) > 0 && dropped > 0 &&
      { reason: Number(reason.dataset.count), row: dropped };
  }, selector), { timeout: 30000, every: 250 });
  const slowRows = await page.$$eval('#connections tr.slow', (rows) => rows.map((r) => r.dataset.id));
  observed.stalled = { id: stalled, samples, slow, maxBuffered, drops, slowRows };

  // The picture for the README: traffic, a slow consumer, drops.
  await page.waitForTimeout(2500);
  await page.screenshot({ path: screenshot, fullPage: true });
  for (const copy of copies) await copyFile(screenshot, copy);

  // The broker dies and comes back on the same port under the page.
  const connectionBefore = await page.$eval('#connections tr.self', (row) => row.dataset.id);
  const statsBefore = (await figures()).statsTime;
  phase = 'restart';
  const killed = await step('kill');
  if (!killed.killed) throw new Error(`unexpected answer ${JSON.stringify(killed)}`);
  // The broker stays down until the page says so.
  await page.waitForFunction(() => document.getElementById('status').textContent === 'offline', null, { timeout: 30000 });
  const restarted = await step('start');
  if (!restarted.restarted) throw new Error(`unexpected answer ${JSON.stringify(restarted)}`);
  await page.waitForFunction(() => document.getElementById('status').textContent === 'connected', null, { timeout: 30000 });
  const statusLog = await page.evaluate(() => window.statusLog);
  const selfAfter = await page.evaluate(() => document.getElementById('status').title);
  // The console's subscription was renewed on the new broker.
  const again = await publish('demo.after', { after: 'the restart' });
  const afterRestart = await (await page.waitForSelector(
    '#console-log li.console-message[data-topic="demo.after"]',
    { timeout: 10000 },
  )).textContent();
  // So was the stats subscription, and the tables were fetched from the new broker.
  const statsAfter = await until('stats from the new broker', async () => {
    const f = await figures();
    return f.statsTime > statsBefore + 1000 && f.statsTime;
  });
  const connectionAfter = await until('the tables to show the page\'s new connection', () =>
    page.evaluate((old) => {
      const row = document.querySelector('#connections tr.self');
      return row && row.dataset.id !== old && row.dataset.id;
    }, connectionBefore));
  const stalledGone = await until('the stalled consumer to be gone from the table', () =>
    page.evaluate((selector) => !document.querySelector(selector), selector));
  observed.restart = {
    statusLog,
    badgeBefore: selfBefore,
    badgeAfter: selfAfter,
    published: again,
    received: afterRestart,
    statsBefore,
    statsAfter,
    connectionBefore,
    connectionAfter,
    stalledGone,
  };
  observed.badgeClass = badgeClass;
  observed.problems = problems;
  process.stdout.write(`${JSON.stringify({ step: 'done', ...observed })}\n`);
} catch (error) {
  console.error(`dashboard.mjs: ${error.stack ?? error}`);
  console.error(`observed so far: ${JSON.stringify(observed)}`);
  console.error(`page problems: ${JSON.stringify(problems)}`);
  try {
    const failure = screenshot.replace(/\.png$/, '-failure.png');
    await page.screenshot({ path: failure, fullPage: true });
    console.error(`the page as it was: ${failure}`);
  } catch {
    // the browser is gone too
  }
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
