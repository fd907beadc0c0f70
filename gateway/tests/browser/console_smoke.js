// Manual smoke check of the dispatch console in a real browser (not part of `cargo test`: it
// needs Chromium and Node). With `hexfleet demo` running:
//
//   apt-get install chromium            # Debian's Chromium
//   npm i playwright-core@1             # in a scratch directory
//   node gateway/tests/browser/console_smoke.js "http://127.0.0.1:8080/?token=…" console.png
//
// It opens the page, waits 6 s, prints the KPI header and any page errors, and saves a
// screenshot. Expect a non-zero "fixes / s" and couriers on the map. (A plain
// `chromium --headless --screenshot` does not run the page's animation frames, so its picture
// shows an empty map; use this instead.)
const { chromium } = require('playwright-core');

(async () => {
  const [url, out = 'console.png'] = process.argv.slice(2);
  if (!url) throw new Error('usage: console_smoke.js URL [screenshot.png]');
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on('pageerror', e => errors.push(String(e)));
  page.on('response', r => { if (r.status() >= 400 && !r.url().endsWith('/favicon.ico')) errors.push(`${r.status()} ${r.url()}`); });
  await page.goto(url);
  await page.waitForTimeout(6000);
  const header = await page.evaluate(() => (document.querySelector('header') || document.body).innerText);
  console.log('header:', JSON.stringify(header));
  console.log('errors:', JSON.stringify(errors));
  await page.screenshot({ path: out });
  await browser.close();
  const fixes = /(\d+)\s*\n\s*fixes \/ s/.exec(header);
  if (errors.length || !fixes || Number(fixes[1]) === 0) process.exit(1);
})();
