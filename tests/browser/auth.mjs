// The dashboard on a broker that requires a credential: the page asks for it, refuses a wrong
// one, connects with the right one (the WebSocket and the HTTP API both), keeps it in the tab's
// sessionStorage, and a reload reuses it. Prints what it saw as JSON.
//
// usage: node auth.mjs <http-base-url> <api-key>
import { launch, until } from './chromium.mjs';

const [base, key] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage();
  const pageErrors = [];
  page.on('pageerror', (error) => pageErrors.push(error.message));
  const out = {};
  const text = (selector) => page.textContent(selector);
  const formShown = () => page.evaluate(() => !document.getElementById('auth').hidden);

  await page.goto(`${base}/`);
  out.askedAtFirst = await until('the credential form', formShown);
  out.statusBeforeKey = await text('#status');

  await page.fill('#auth-token', 'not-the-key');
  await page.click('#auth-submit');
  out.wrongKeyMessage = await until('the wrong key to be refused', async () => {
    const message = await text('#auth-message');
    return message.includes('Refused') && (await formShown()) && message;
  });

  await page.fill('#auth-token', key);
  await page.click('#auth-submit');
  await until('the form to close', async () => !(await formShown()));
  await page.waitForFunction(() => document.getElementById('status').textContent === 'connected', null, { timeout: 15000 });
  out.statusWithKey = await text('#status');
  out.stored = await page.evaluate(() => sessionStorage.getItem('crier.dashboard.token'));
  out.connectionsWithKey = await until('the connections table', () =>
    page.evaluate(() => document.querySelectorAll('#connections tbody tr').length));
  out.statsWithKey = await until('stats', () =>
    page.evaluate(() => Number(document.getElementById('chart-rates').dataset.points)));

  await page.reload();
  await page.waitForFunction(() => document.getElementById('status').textContent === 'connected', null, { timeout: 15000 });
  out.askedAfterReload = await formShown();
  out.statusAfterReload = await text('#status');
  out.pageErrors = pageErrors;
  console.log(JSON.stringify(out));
} finally {
  await browser.close();
}
