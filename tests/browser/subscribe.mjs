// Opens a page in headless Chromium and, from the page, subscribes with a plain
// `new WebSocket(url)` (and once more asking for the crier.json subprotocol), publishes over
// HTTP with fetch(), and prints what the page received as JSON.
//
// usage: node subscribe.mjs <ws-url-with-?subscribe=news> <http-base-url>
import { chromium } from 'playwright-core';

const [wsUrl, httpBase] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
try {
  const page = await browser.newPage();
  await page.goto(`${httpBase}/healthz`);
  const result = await page.evaluate(async ({ wsUrl, httpBase }) => {
    const session = (protocols, headline) => new Promise((resolve, reject) => {
      const ws = protocols ? new WebSocket(wsUrl, protocols) : new WebSocket(wsUrl);
      const frames = [];
      const timer = setTimeout(() => reject(new Error('no message within 10 s')), 10000);
      ws.onerror = () => reject(new Error('WebSocket error'));
      ws.onmessage = (event) => {
        const frame = JSON.parse(event.data);
        frames.push(frame);
        if (frame.op === 'welcome') {
          fetch(`${httpBase}/api/topics/news`, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json' },
            body: JSON.stringify({ headline }),
          }).catch(reject);
        } else if (frame.op === 'message') {
          clearTimeout(timer);
          ws.onclose = (close) => resolve({ protocol: ws.protocol, frames, closeCode: close.code });
          ws.close(1000);
        }
      };
    });
    return [await session(null, 'plain'), await session('crier.json', 'negotiated')];
  }, { wsUrl, httpBase });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
