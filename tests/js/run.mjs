// Runs a model with the official npm client (replicate 1.4.0), default Prefer: wait, and prints the output.
import Replicate from "replicate";

const replicate = new Replicate({ auth: process.env.GATEWAY_TOKEN, baseUrl: process.env.GATEWAY_BASE, useFileOutput: false });
const [model] = process.argv.slice(2);
const output = await replicate.run(model, { input: { prompt: "from node" } });
console.log(JSON.stringify(output));
