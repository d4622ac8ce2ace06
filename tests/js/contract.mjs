// One scenario with the official npm client (replicate 1.4.0) against the gateway; prints what it saw as JSON.
// Usage: node contract.mjs <scenario> [args...]; GATEWAY_TOKEN and GATEWAY_BASE (ending in /v1) set.
import { readFile } from "node:fs/promises";
import Replicate, { validateWebhook } from "replicate";

const MODEL = "black-forest-labs/flux-schnell";
const replicate = new Replicate({ auth: process.env.GATEWAY_TOKEN, baseUrl: process.env.GATEWAY_BASE, useFileOutput: false });
const [scenario, ...args] = process.argv.slice(2);

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (error) {
    return error.response ? error.response.status : String(error);
  }
}

const scenarios = {
  // predictions.create without and with Prefer: wait, then wait() (polling) and get().
  async create() {
    const created = await replicate.predictions.create({ model: MODEL, input: { prompt: "a fox" } });
    const waited = await replicate.wait(created, { interval: 100 });
    const fetched = await replicate.predictions.get(created.id);
    const synced = await replicate.predictions.create({ model: MODEL, input: { prompt: "now" }, wait: 10 });
    return {
      created: { id: created.id, status: created.status, get: created.urls.get },
      waited: { status: waited.status, output: waited.output },
      fetched: { status: fetched.status, output: fetched.output },
      synced: { status: synced.status, output: synced.output },
      missing: await failure(replicate.predictions.get("doesnotexist")),
    };
  },
  async cancel() {
    const created = await replicate.predictions.create({ model: MODEL, input: { prompt: "never mind" } });
    const canceled = await replicate.predictions.cancel(created.id);
    const fetched = await replicate.predictions.get(created.id);
    return { canceled: canceled.status, fetched: fetched.status };
  },
  async paginate() {
    const first = await replicate.predictions.list();
    const pages = [];
    for await (const page of replicate.paginate(() => replicate.predictions.list())) {
      pages.push(page.map((prediction) => prediction.id));
    }
    return { next: first.next, pages };
  },
  async versions() {
    const pages = [];
    for await (const page of replicate.paginate(() => replicate.models.versions.list("black-forest-labs", "flux-schnell"))) {
      pages.push(page.map((version) => version.id));
    }
    return { pages };
  },
  async filesPaginate() {
    const pages = [];
    for await (const page of replicate.paginate(() => replicate.files.list())) {
      pages.push(page.map((file) => file.id));
    }
    return { pages };
  },
  // files.create sends metadata as a JSON file part; get, list and delete follow.
  async files() {
    const created = await replicate.files.create(Buffer.from("hello from node"), { who: "node" });
    const fetched = await replicate.files.get(created.id);
    const listed = await replicate.files.list();
    await replicate.files.delete(created.id);
    return {
      created: { id: created.id, size: created.size, metadata: created.metadata, get: created.urls.get },
      fetched: { id: fetched.id, etag: fetched.etag === created.etag },
      listed: listed.results.map((file) => file.id),
      afterDelete: await failure(replicate.files.get(created.id)),
    };
  },
  // A Buffer input: the client uploads it first and sends the file's URL as the input.
  async fileInput() {
    const output = await replicate.run(MODEL, { input: { prompt: "p", image: Buffer.from(args[0], "base64") } });
    const files = await replicate.files.list();
    return { output, files: files.results.map((file) => ({ id: file.id, get: file.urls.get })) };
  },
  // A delivery captured by the test (headers and body) checked with the team's secret.
  async webhook() {
    const delivery = JSON.parse(await readFile(args[0], "utf8"));
    const secret = await replicate.webhooks.default.secret.get();
    const tampered = { ...delivery, body: delivery.body.replace("succeeded", "failed") };
    return {
      valid: await validateWebhook({ headers: delivery.headers, body: delivery.body }, secret.key),
      tampered: await validateWebhook({ headers: tampered.headers, body: tampered.body }, secret.key),
    };
  },
};

console.log(JSON.stringify(await scenarios[scenario]()));
