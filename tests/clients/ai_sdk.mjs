// The AI SDK (ai + @ai-sdk/openai-compatible + zod) against the gateway.
// Usage: CLAWDBOT_URL=http://host:port/v1 CLAWDBOT_TOKEN=... node ai_sdk.mjs CASE
// Prints one JSON object: what the case saw (or the error the SDK raised).
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, streamText, tool } from "ai";
import { z } from "zod";

const gateway = createOpenAICompatible({
  name: "clawdbot",
  baseURL: process.env.CLAWDBOT_URL,
  apiKey: process.env.CLAWDBOT_TOKEN,
  includeUsage: true,
  supportsStructuredOutputs: true,
});
const model = gateway("qwen3:32b");
const prompt = "What is the weather in Hangzhou?";

const cases = {
  async object() {
    const schema = z.object({ city: z.string(), temperature: z.number(), sunny: z.boolean() });
    const result = await generateObject({ model, schema, prompt });
    return { object: result.object, finish: result.finishReason, usage: result.usage };
  },
  async text() {
    const result = streamText({ model, prompt });
    let text = "";
    for await (const part of result.textStream) text += part;
    return { text, finish: await result.finishReason, usage: await result.usage };
  },
  async tools() {
    const getWeather = tool({
      description: "The weather in a city",
      inputSchema: z.object({ city: z.string() }),
      execute: async ({ city }) => `sunny in ${city}`,
    });
    const result = streamText({ model, prompt, tools: { get_weather: getWeather }, toolChoice: "required" });
    const deltas = [];
    for await (const part of result.fullStream) {
      if (part.type === "tool-input-delta") deltas.push(part.delta);
      if (part.type === "error") throw part.error;
    }
    const calls = (await result.toolCalls).map((c) => ({ name: c.toolName, input: c.input }));
    const results = (await result.toolResults).map((r) => r.output);
    return { calls, results, deltas, finish: await result.finishReason };
  },
};

try {
  console.log(JSON.stringify(await cases[process.argv[2]]()));
} catch (e) {
  console.log(JSON.stringify({ raised: e.constructor.name, message: e.message, status: e.statusCode ?? null }));
}
