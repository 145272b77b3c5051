// The official openai package, with its defaults, against the gateway.
// Usage: CLAWDBOT_URL=http://host:port/v1 CLAWDBOT_TOKEN=... node openai_sdk.mjs CASE
// Prints one JSON object: what the case saw (or the error the client raised).
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.CLAWDBOT_URL, apiKey: process.env.CLAWDBOT_TOKEN });
const model = "qwen3:32b";
const messages = [{ role: "user", content: "What is the weather in Hangzhou?" }];
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

function calls(message) {
  return (message.tool_calls || []).map((c) => ({ id: c.id, name: c.function.name, arguments: JSON.parse(c.function.arguments) }));
}

async function collect(stream) {
  let text = "";
  let finish = null;
  let usage = null;
  let role = null;
  const toolCalls = [];
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      role = role || choice.delta.role || null;
      text += choice.delta.content || "";
      finish = choice.finish_reason || finish;
      for (const delta of choice.delta.tool_calls || []) {
        const call = (toolCalls[delta.index] ||= { id: null, name: "", arguments: "" });
        call.id = delta.id || call.id;
        call.name += delta.function?.name || "";
        call.arguments += delta.function?.arguments || "";
      }
    }
  }
  return { role, text, finish, usage, calls: toolCalls.map((c) => ({ ...c, arguments: JSON.parse(c.arguments) })) };
}

const cases = {
  async chat() {
    const reply = await client.chat.completions.create({ model, messages });
    return { text: reply.choices[0].message.content, finish: reply.choices[0].finish_reason, usage: reply.usage };
  },
  async stream() {
    return collect(await client.chat.completions.create({ model, messages, stream: true, stream_options: { include_usage: true } }));
  },
  async tools() {
    const reply = await client.chat.completions.create({ model, messages, tools: [weather] });
    return { calls: calls(reply.choices[0].message), finish: reply.choices[0].finish_reason };
  },
  async forced() {
    const tool_choice = { type: "function", function: { name: "get_weather" } };
    const reply = await client.chat.completions.create({ model, messages, tools: [weather], tool_choice });
    const streamed = await collect(await client.chat.completions.create({ model, messages, tools: [weather], tool_choice, stream: true }));
    return { calls: calls(reply.choices[0].message), finish: reply.choices[0].finish_reason, streamed };
  },
  async error() {
    try {
      await client.chat.completions.create({ model, messages, temperature: 5 });
      return { error: null };
    } catch (e) {
      return { error: e.constructor.name, status: e.status, message: e.message, code: e.code, param: e.param };
    }
  },
};

console.log(JSON.stringify(await cases[process.argv[2]]()));
