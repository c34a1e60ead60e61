// Screenshots of the MLflow UI for the README (docs/images/): the demo pipeline's run tree and the parent run's
// ROC-by-stage plot, taken in a real headless Chromium as a user sees them.
//
//   apt-get install chromium && npm install puppeteer-core@24
//   .venv/bin/mlflow server --backend-store-uri sqlite:///mlruns.db --port 5055 &
//   node docs/screenshots.js http://127.0.0.1:5055 <experiment id> <parent run id> plots/roc_by_stage.png docs/images
const puppeteer = require('puppeteer-core');
const [base, exp, parent, plot, out] = process.argv.slice(2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  const browser = await puppeteer.launch({executablePath: '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--window-size=1600,1000']});
  const page = await browser.newPage();
  await page.setViewport({width: 1600, height: 900, deviceScaleFactor: 1});
  await page.goto(`${base}/#/experiments/${exp}/runs?workflowType=machine_learning`, {waitUntil: 'networkidle0', timeout: 120000});
  await sleep(4000);
  const closed = await page.evaluate(() => {  // hide the MLflow Assistant side panel
    const labels = [...document.querySelectorAll('button')].map(b => (b.getAttribute('aria-label') || '') + '|' + (b.getAttribute('data-component-id') || ''));
    const b = [...document.querySelectorAll('button')].find(b => /assistant/i.test(b.getAttribute('data-component-id') || '') && /close/i.test((b.getAttribute('data-component-id') || '') + (b.getAttribute('aria-label') || '')));
    if (b) { b.click(); return 'closed'; }
    return labels.filter(l => /assist|close/i.test(l)).join('\n');
  });
  console.log('assistant:', closed);
  await sleep(1000);
  // expand the parent run's children (the chevron/expander button next to the parent run name)
  const expanders = await page.$$('button[data-component-id$="runnamecellrenderer.tsx_46"]');
  console.log('expanders', expanders.length);
  for (const e of expanders) { try { await e.click(); await sleep(800); } catch (err) { console.log(String(err)); } }
  await sleep(2000);
  await page.screenshot({path: `${out}/mlflow_run_tree.png`});
  const text = await page.evaluate(() => document.body.innerText.slice(0, 3000));
  console.log(text);
  await page.goto(`${base}/#/experiments/${exp}/runs/${parent}/artifacts/${plot}?workflowType=machine_learning`, {waitUntil: 'networkidle0', timeout: 120000});
  await sleep(5000);
  await page.evaluate(() => {
    const b = [...document.querySelectorAll('button')].find(b => /assistant/i.test(b.getAttribute('data-component-id') || '') && /close/i.test((b.getAttribute('data-component-id') || '') + (b.getAttribute('aria-label') || '')));
    if (b) b.click();
  });
  await sleep(1500);
  await page.screenshot({path: `${out}/mlflow_roc_by_stage.png`});
  console.log(await page.evaluate(() => document.body.innerText.slice(0, 1500)));
  await browser.close();
})();
