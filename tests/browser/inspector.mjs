// Drives the inspector page in headless Chromium against a worker that ran real jobs:
// `node inspector.mjs <admin url> <screenshot.png> <run that retried> <run that failed>`.
// Exits 0 when every check holds; otherwise prints what failed and exits 1.
import { chromium } from "playwright-core";

const [base, screenshot, retried, failed] = process.argv.slice(2);
const check = (cond, what) => { if (!cond) throw new Error("check failed: " + what); };

// playwright gives the browser a fresh temporary profile of its own.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 900 } });
  const errors = [];
  page.on("pageerror", e => errors.push(e.message));
  await page.goto(base + "/");

  // The list shows the runs, newest first.
  const row = id => page.locator(`tr[data-run-id="${id}"]`);
  await row(retried).waitFor();
  await row(failed).waitFor();
  const ids = await page.locator("[data-testid=run-row]").evaluateAll(rows => rows.map(r => r.dataset.runId));
  check(ids.length >= 2, "at least two runs listed: " + ids);

  // The families panel: web's current version (the one whose prepare retried) with its one
  // live snapshot; the broken family has no current version; storage usage is shown.
  const web = page.locator('[data-testid=family-row][data-family="web"][data-kind="current"]');
  await web.waitFor();
  const webText = await web.textContent();
  check(webText.includes(retried.split("@")[1]) && webText.includes("sealed"), "web's current version: " + webText);
  check((await web.locator("td").nth(3).textContent()) === "1", "web has one live snapshot");
  check((await page.locator('[data-testid=family-row][data-family="broken"][data-kind="current"]').count()) === 0, "broken has no current version");
  check((await page.locator("[data-testid=usage]").textContent()).includes("% used"), "usage is shown");

  // The status filter.
  await page.selectOption("[data-testid=filter-status]", "failed");
  await page.waitForFunction(id => [...document.querySelectorAll("[data-testid=run-row]")].every(r => r.dataset.runId === id), failed);
  await page.selectOption("[data-testid=filter-status]", "");
  await row(retried).waitFor();

  // Each row says how long its run took, and a failed run why it failed.
  const cell = (id, testid) => row(id).locator(`[data-testid=${testid}]`).textContent();
  check(/\d( ms| s| min| h)/.test(await cell(retried, "run-duration")), "the retried run's duration: " + await cell(retried, "run-duration"));
  check((await cell(retried, "run-failure-reason")) === "", "a completed run has no failure reason");
  check((await cell(failed, "run-failure-reason")).includes(":"), "the failed run's reason: " + await cell(failed, "run-failure-reason"));

  // The run that retried: every step done, the retried one shows both attempts. Opening it
  // puts it in the URL, to be shared.
  await row(retried).click();
  await page.waitForFunction(id => document.querySelector("[data-testid=run-title]").textContent.startsWith(id), retried);
  check(new URL(page.url()).searchParams.get("run") === retried, "the URL names the run: " + page.url());
  const nodes = page.locator("[data-testid=step-node]");
  const statuses = await nodes.evaluateAll(ns => ns.map(n => [n.dataset.step, n.dataset.status]));
  check(statuses.length >= 3, "the workflow is drawn: " + JSON.stringify(statuses));
  check(statuses.every(([, s]) => s === "done"), "every step done: " + JSON.stringify(statuses));
  await page.locator('[data-testid=step-node][data-step="stream_into_base"]').click();
  await page.locator("[data-testid=step-name]").waitFor();
  const input = await page.locator("[data-testid=step-input]").textContent();
  const output = await page.locator("[data-testid=step-output]").textContent();
  check(JSON.parse(input) !== null && JSON.parse(output) !== null, "input and output are JSON");
  check(output.includes("sha256:"), "the streaming step's output names the blobs: " + output);
  const attempts = await page.locator("[data-testid=attempt]").evaluateAll(rs => rs.map(r => r.textContent));
  check(attempts.length === 2, "two attempts: " + attempts);
  check(attempts[0].includes("transient") && attempts[0].includes("injected failure"), "the failed attempt and its error: " + attempts[0]);
  check(attempts[1].includes("ok"), "then success: " + attempts[1]);

  // Step through the history: each event lights up in order.
  const events = await page.locator("[data-testid=event]").count();
  check(events >= statuses.length + 3, `history has started, each step, the failed attempt, finished (${events})`);
  await page.click("[data-testid=step-back]");
  const cursor = () => page.locator("[data-testid=position]").getAttribute("data-cursor");
  check(await cursor() === String(events - 1), "one step back from the end");
  for (let i = 0; i < events - 1; i++) await page.click("[data-testid=step-back]");
  check(await cursor() === "0", "back at the start");
  // At the start of the replay the selected step has not run: its output is not shown yet.
  check((await page.locator("[data-testid=step-output]").textContent()) === "(not reached)", "no output before the step ran");
  for (let i = 1; i <= events; i++) {
    await page.click("[data-testid=step-forward]");
    check(await cursor() === String(i), "forward to event " + i);
    const current = await page.locator("#events li.current").getAttribute("data-seq");
    const expected = await page.locator("[data-testid=event]").nth(i - 1).getAttribute("data-seq");
    check(current === expected, `event ${i} is highlighted`);
  }
  check((await page.locator("[data-testid=step-output]").textContent()).includes("sha256:"), "the output once the replay reached it");
  // Play (from the end, it starts over) walks the whole history by itself, in order.
  await page.selectOption("[data-testid=speed]", "16");
  const seen = [];
  await page.exposeFunction("seen", c => seen.push(c));
  await page.evaluate(() => new MutationObserver(() => window.seen(document.querySelector("[data-testid=position]").dataset.cursor))
    .observe(document.querySelector("[data-testid=position]"), { attributes: true, childList: true }));
  await page.click("[data-testid=play]");
  await page.waitForFunction(n => document.querySelector("[data-testid=position]").dataset.cursor === String(n)
    && document.querySelector("[data-testid=play]").textContent.includes("play"), events, { timeout: 30000 });
  const order = [...new Set(seen.map(Number))];
  check(order[0] <= 1 && order.at(-1) === events, "play went from the start to the end: " + order);
  check(order.every((c, i) => i === 0 || c > order[i - 1]), "in order: " + order);
  const end = await page.locator("[data-testid=end-node]").getAttribute("class");
  check(end.includes("done"), "the end node shows completion: " + end);
  // Its label fits inside its box and inside the drawing.
  const fits = await page.evaluate(() => {
    const g = document.querySelector("[data-testid=end-node]");
    const t = g.querySelector("text").getBBox(), r = g.querySelector("rect").getBBox();
    const vb = document.getElementById("machine").viewBox.baseVal;
    const m = g.transform.baseVal.consolidate().matrix;
    return { inBox: t.x >= r.x && t.x + t.width <= r.x + r.width, inDrawing: m.e + r.x + r.width <= vb.x + vb.width };
  });
  check(fits.inBox && fits.inDrawing, "the end node's label is not clipped: " + JSON.stringify(fits));

  // The failed run: its failure and the step it failed at.
  await row(failed).click();
  await page.waitForFunction(id => document.querySelector("[data-testid=run-title]").textContent.startsWith(id), failed);
  const failure = page.locator("[data-testid=run-failure]");
  await failure.waitFor();
  check((await failure.textContent()).includes("failed at"), "the failure is shown");
  const failedNodes = await page.locator('[data-testid=step-node][data-status="failed"]').count();
  check(failedNodes === 1, "exactly one step is marked failed");

  await page.screenshot({ path: screenshot, fullPage: true });
  // A shared link opens its run; an unknown run says so, and the message stays.
  await page.goto(base + "/?run=" + encodeURIComponent(failed));
  await page.waitForFunction(id => document.querySelector("[data-testid=run-title]").textContent.startsWith(id), failed);
  await page.goto(base + "/?run=no-such-run");
  const runError = page.locator("[data-testid=run-error]");
  await runError.waitFor();
  // Past one refresh of the runs list (its rows are replaced), which must not hide it.
  await page.locator("[data-testid=run-row]").first().waitFor();
  await page.evaluate(() => { window.rowBefore = document.querySelector("[data-testid=run-row]"); });
  await page.waitForFunction(() => document.querySelector("[data-testid=run-row]") !== window.rowBefore);
  check(await runError.isVisible(), "the unknown run's error stays");
  check((await runError.textContent()).includes("no-such-run"), "it names the run: " + await runError.textContent());

  check(errors.length === 0, "no script errors on the page: " + errors.join("; "));
  console.log(`inspector ok: ${ids.length} runs, ${events} events played, screenshot ${screenshot}`);
} catch (e) {
  console.error(e.message);
  process.exitCode = 1;
} finally {
  await browser.close();
}
