// Streams a prediction with the official npm client (replicate 1.4.0) and prints its output events.
import Replicate from "replicate";

const replicate = new Replicate({ auth: process.env.GATEWAY_TOKEN, baseUrl: process.env.GATEWAY_BASE });
const [model, text] = process.argv.slice(2);
const outputs = [];
const events = [];
for await (const event of replicate.stream(model, { input: { text } })) {
  events.push(event.event);
  if (event.event === "output") outputs.push(String(event));
}
console.log(JSON.stringify({ outputs, events }));
