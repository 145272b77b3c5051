"""
The APIs coding agents speak (issue 18): OpenAI's Responses API and
Anthropic's Messages API, driven with the official SDKs (openai,
openai-agents, anthropic) against the fake Ollama, plus the requests Codex
CLI and Claude Code send, as raw JSON.
"""

import json

import anthropic
import httpx
import httpx2
import openai
from pydantic import BaseModel
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from testing.fake_ollama import FakeOllama
from tests.helpers import bearer, get_json, token
from tests.test_chat import ALL, Backed
from tests.test_hardening_api import png

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
WEATHER_ANTHROPIC = {"name": "get_weather", "description": "The weather in a city", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = [{"function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}}]


def sse(raw):
    """An SSE body as (event, data) pairs."""
    out = []
    for block in raw.decode("utf-8").split("\n\n"):
        event = data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if data is not None:
            out.append((event, data))
    return out


async def post_raw(url, body, headers):
    """POST C{body} as JSON; the status, headers and raw body."""
    import treq

    response = await treq.post(url, json.dumps(body).encode(), headers={b"content-type": [b"application/json"], **headers}, persistent=False)
    return response.code, response.headers, await response.content()


class AgentsBacked(Backed):
    def http(self, kind=httpx):
        """An HTTP client that opens a fresh connection per call (the anthropic SDK's is httpx2's)."""
        client = kind.Client(limits=kind.Limits(max_keepalive_connections=0))
        self.addCleanup(client.close)
        return client

    def claude(self, scope=ALL, use_x_api_key=True, **kw):
        """An Anthropic client pointed at the gateway (base URL without /v1, as Claude Code's ANTHROPIC_BASE_URL)."""
        credential = {"api_key": token(scope=scope)} if use_x_api_key else {"auth_token": token(scope=scope), "api_key": None}
        return anthropic.Anthropic(base_url=self.gw.url, max_retries=0, http_client=self.http(httpx2), **credential, **kw)


class ResponsesTests(AgentsBacked):
    async def test_create_and_stream(self):
        """responses.create answers a response object with usage; responses.stream gives the event sequence and the same text."""
        self.start()
        client = self.sdk()
        r = await deferToThread(lambda: client.responses.create(model="qwen3:32b", instructions="Be brief.", input="hi"))
        self.assertEqual((r.object, r.status, r.model), ("response", "completed", "qwen3:32b"))
        self.assertEqual(r.output_text, self.fake.reply_text)
        self.assertGreater(r.usage.input_tokens, 0)
        self.assertEqual(r.usage.total_tokens, r.usage.input_tokens + r.usage.output_tokens)
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual([m["role"] for m in sent["messages"]], ["system", "user"])
        self.assertEqual(sent["messages"][0]["content"], "Be brief.")

        def run():
            with client.responses.stream(model="qwen3:32b", input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]) as stream:
                kinds = [event.type for event in stream]
                return kinds, stream.get_final_response()

        kinds, final = await deferToThread(run)
        self.assertEqual(kinds[:4], ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"])
        self.assertEqual(kinds[-4:], ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"])
        self.assertIn("response.output_text.delta", kinds)
        self.assertEqual(final.output_text, self.fake.reply_text)
        self.assertGreater(final.usage.output_tokens, 0)

    async def test_raw_stream_numbers_its_events(self):
        """Every event names itself in an event: line and carries a sequence number counting from 0; one response id throughout."""
        self.start(fake=FakeOllama(think_by_default=True))
        status, headers, raw = await post_raw(self.gw.url + "/v1/responses", {"model": "qwen3:32b", "input": "hi", "stream": True, "reasoning": {"effort": "high"}}, {b"authorization": [self.auth["Authorization"].encode()]})
        self.assertEqual(status, 200)
        events = sse(raw)
        self.assertEqual([d["sequence_number"] for _, d in events], list(range(len(events))))
        self.assertTrue(all(e == d["type"] for e, d in events))
        ids = {d["response"]["id"] for _, d in events if "response" in d}
        self.assertEqual(len(ids), 1)
        kinds = [d["type"] for _, d in events]
        self.assertIn("response.reasoning_text.delta", kinds)
        done = [d["item"] for _, d in events if d["type"] == "response.output_item.done"]
        self.assertEqual([item["type"] for item in done], ["reasoning", "message"])
        self.assertEqual(done[0]["content"][0]["text"], self.fake.thinking_text)
        self.assertIs(self.fake.requests_to("/api/chat")[-1].body["think"], True)

    async def test_function_tools_with_a_tool_output_turn(self):
        """A function tool is called (a function_call item with a call_id); the next turn's function_call_output reaches the model as the tool's answer."""
        self.start(fake=FakeOllama(tool_calls=CALL))
        client = self.sdk()
        first = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="weather in Hangzhou?", tools=[WEATHER], store=False))
        calls = [item for item in first.output if item.type == "function_call"]
        self.assertEqual(len(calls), 1)
        self.assertEqual((calls[0].name, json.loads(calls[0].arguments)), ("get_weather", {"city": "Hangzhou"}))
        self.assertTrue(calls[0].call_id and calls[0].id.startswith("fc_"))
        history = [{"role": "user", "content": "weather in Hangzhou?"}] + [item.model_dump(exclude_none=True) for item in first.output]
        history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"})
        second = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input=history, tools=[WEATHER], store=False))
        self.assertEqual(second.output_text, self.fake.reply_text)
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "tool"])
        self.assertEqual(sent[1]["tool_calls"][0]["function"], {"name": "get_weather", "arguments": {"city": "Hangzhou"}})
        self.assertEqual((sent[2]["content"], sent[2]["tool_name"]), ("sunny, 21 C", "get_weather"))

        def run():
            with client.responses.stream(model="qwen3:32b", input="weather?", tools=[WEATHER], store=False) as stream:
                kinds = [event.type for event in stream]
                return kinds, stream.get_final_response()

        kinds, final = await deferToThread(run)
        self.assertIn("response.function_call_arguments.delta", kinds)
        self.assertIn("response.function_call_arguments.done", kinds)
        self.assertEqual(json.loads(final.output[0].arguments), {"city": "Hangzhou"})

    async def test_forced_tool_choice(self):
        """tool_choice naming a function (Ollama has none) comes back as that call, streamed and not."""
        self.start(fake=FakeOllama(json_reply={"city": "Beijing"}))
        client = self.sdk()
        r = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, store=False))
        self.assertEqual([(i.type, i.name, json.loads(i.arguments)) for i in r.output], [("function_call", "get_weather", {"city": "Beijing"})])
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["format"], WEATHER["parameters"])

        def run():
            with client.responses.stream(model="qwen3:32b", input="x", tools=[WEATHER], tool_choice="required", store=False) as stream:
                for _ in stream:
                    pass
                return stream.get_final_response()

        final = await deferToThread(run)
        self.assertEqual(json.loads(final.output[0].arguments), {"city": "Beijing"})

    async def test_previous_response_id_chains_and_belongs_to_its_owner(self):
        """A stored response continues with previous_response_id; GET and DELETE work for its owner; another user's id is a 404 everywhere."""
        self.start()
        client = self.sdk()
        first = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="My name is Lin.", instructions="Be kind."))
        second = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="What is my name?", previous_response_id=first.id))
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        # Instructions are not carried over (as OpenAI's); the conversation is.
        self.assertEqual([(m["role"], m["content"]) for m in sent], [("user", "My name is Lin."), ("assistant", self.fake.reply_text), ("user", "What is my name?")])
        third = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="And again?", previous_response_id=second.id, store=False))
        self.assertEqual(len(self.fake.requests_to("/api/chat")[-1].body["messages"]), 5)
        got = await deferToThread(lambda: client.responses.retrieve(first.id))
        self.assertEqual((got.id, got.output_text), (first.id, first.output_text))
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(lambda: client.responses.retrieve(third.id))
        bob = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=token(sub="bob", scope=ALL), max_retries=0, http_client=self.http())
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(lambda: bob.responses.retrieve(first.id))
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(lambda: bob.responses.create(model="qwen3:32b", input="hi", previous_response_id=first.id))
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(lambda: bob.responses.delete(first.id))
        await deferToThread(lambda: client.responses.delete(first.id))
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(lambda: client.responses.retrieve(first.id))
        status, _, body = await get_json(self.gw.url + "/v1/responses/not-an-id", headers=self.auth)
        self.assertEqual((status, body["error"]["code"]), (404, "NOT_FOUND"))

    async def test_stored_stream_chains(self):
        """A streamed response is stored before response.completed is sent, so the next call can chain from it at once."""
        self.start()
        client = self.sdk()

        def run():
            with client.responses.stream(model="qwen3:32b", input="one") as stream:
                for _ in stream:
                    pass
                first = stream.get_final_response()
            return client.responses.create(model="qwen3:32b", input="two", previous_response_id=first.id)

        await deferToThread(run)
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual([m["content"] for m in sent], ["one", self.fake.reply_text, "two"])

    async def test_structured_output(self):
        """text.format json_schema (responses.parse with a pydantic model) holds the model to the schema through Ollama's format."""

        class Weather(BaseModel):
            city: str
            degrees: int

        self.start(fake=FakeOllama(json_reply={"city": "Hangzhou", "degrees": 21}))
        client = self.sdk()
        r = await deferToThread(lambda: client.responses.parse(model="qwen3:32b", input="weather?", text_format=Weather, store=False))
        self.assertEqual(r.output_parsed, Weather(city="Hangzhou", degrees=21))
        fmt = self.fake.requests_to("/api/chat")[-1].body["format"]
        self.assertEqual(fmt["properties"]["city"], {"title": "City", "type": "string"})
        r = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="json please", text={"format": {"type": "json_object"}}, store=False))
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["format"], "json")

    async def test_agents_sdk_runs_an_agent_with_a_tool(self):
        """The OpenAI Agents SDK runs an agent with one function tool to completion through the gateway."""
        from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

        set_tracing_disabled(True)
        self.start(fake=FakeOllama(tool_calls=CALL))
        seen = []

        @function_tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            seen.append(city)
            return "sunny"

        def run():
            import asyncio

            async def main():
                client = openai.AsyncOpenAI(base_url=self.gw.url + "/v1", api_key=token(scope=ALL), max_retries=0, http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_keepalive_connections=0)))
                agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather], model=OpenAIResponsesModel(model="qwen3:32b", openai_client=client))
                result = await Runner.run(agent, "What is the weather in Hangzhou?")
                await client.close()
                return result

            return asyncio.run(main())

        result = await deferToThread(run)
        self.assertEqual(seen, ["Hangzhou"])
        self.assertEqual(result.final_output, self.fake.reply_text)
        last = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual(last[-1]["role"], "tool")

    async def test_what_codex_sends(self):
        """A Codex CLI request (store false, developer message, echoed items with ids, hosted and namespace tools, extra fields) is served; hosted tools are dropped and named in a header."""
        self.start(fake=FakeOllama(tool_calls=[]))
        body = {
            "model": "qwen3:32b",
            "instructions": None,
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": None, "encrypted_content": None},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command", "arguments": '{"cmd": "ls"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "README.md"},
                {"type": "message", "role": "assistant", "id": "msg_1", "content": [{"type": "output_text", "text": "There is a README."}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "thanks"}]},
            ],
            "tools": [
                {"type": "function", "name": "exec_command", "description": "Run a command", "strict": False, "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
                {"type": "web_search"},
                {"type": "namespace", "name": "mcp__files", "description": "files", "tools": [{"type": "function", "name": "read", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]},
            ],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "reasoning": {"summary": "auto"},
            "store": False,
            "stream": True,
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "abc",
            "client_metadata": {"x": "y"},
            "text": {"verbosity": "low"},
        }
        status, headers, raw = await post_raw(self.gw.url + "/v1/responses", body, {b"authorization": [self.auth["Authorization"].encode()]})
        self.assertEqual(status, 200, raw[:300])
        self.assertEqual(headers.getRawHeaders(b"x-clawdbot-dropped-tools"), [b"web_search"])
        events = sse(raw)
        self.assertEqual(events[-1][1]["type"], "response.completed")
        self.assertGreater(events[-1][1]["response"]["usage"]["total_tokens"], 0)
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual([m["role"] for m in sent["messages"]], ["system", "user", "assistant", "tool", "assistant", "user"])
        self.assertEqual(sent["messages"][3]["tool_name"], "exec_command")
        self.assertEqual([t["function"]["name"] for t in sent["tools"]], ["exec_command", "read"])

    async def test_namespace_calls_carry_their_namespace(self):
        """A call to a function inside a namespace tool comes back with the namespace and the function's own name."""
        self.start(fake=FakeOllama(tool_calls=[{"function": {"name": "read", "arguments": {"path": "a"}}}]))
        tools = [{"type": "namespace", "name": "files", "description": "files", "tools": [{"type": "function", "name": "read", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}]}]
        status, _, body = await get_json(self.gw.url + "/v1/responses", method="POST", headers=self.auth, body={"model": "qwen3:32b", "input": "x", "tools": tools, "store": False})
        self.assertEqual(status, 200, body)
        self.assertEqual((body["output"][0]["name"], body["output"][0]["namespace"]), ("read", "files"))

    async def test_refusals_raise_the_sdk_exceptions(self):
        """Authentication, scope, bad input, an unknown model and a spent quota reach the openai SDK as its usual exception classes, with the reason in the message."""
        self.start('quotas: {requests_per_day: 1}\nbackend: {models: ["qwen3:32b"]}')
        with self.assertRaises(openai.AuthenticationError):
            await deferToThread(lambda: openai.OpenAI(base_url=self.gw.url + "/v1", api_key="nope", max_retries=0, http_client=self.http()).responses.create(model="qwen3:32b", input="hi"))
        with self.assertRaises(openai.PermissionDeniedError):
            await deferToThread(lambda: self.sdk(scope="chat:read").responses.create(model="qwen3:32b", input="hi"))
        with self.assertRaises(openai.BadRequestError) as caught:
            await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input=[{"type": "input_file", "file_id": "f"}]))
        self.assertIn("not supported", caught.exception.message)
        with self.assertRaises(openai.BadRequestError) as caught:
            await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", max_output_tokens=0))
        self.assertIn("max_output_tokens", caught.exception.message)
        with self.assertRaises(openai.NotFoundError):
            await deferToThread(lambda: self.sdk().responses.create(model="gpt-5-codex", input="hi"))
        await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", store=False))
        with self.assertRaises(openai.RateLimitError) as caught:
            await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", stream=True))
        self.assertEqual(caught.exception.body["code"], "QUOTA_EXCEEDED")

    async def test_alias_for_an_agents_model_name(self):
        """backend.aliases maps an agent's own model name to a local model."""
        self.start('backend: {aliases: {gpt-5-codex: "qwen3:32b"}}')
        r = await deferToThread(lambda: self.sdk().responses.create(model="gpt-5-codex", input="hi", store=False))
        self.assertEqual(r.model, "gpt-5-codex")
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["model"], "qwen3:32b")

    async def test_mid_stream_error_is_an_error_event(self):
        """The backend failing mid-stream ends the stream with an error event (its sequence number next), which the SDK's stream reports."""

        self.start()
        self.fake.behave(fail_mid_stream=2)
        status, _, raw = await post_raw(self.gw.url + "/v1/responses", {"model": "qwen3:32b", "input": "hi", "stream": True, "store": False}, {b"authorization": [self.auth["Authorization"].encode()]})
        self.assertEqual(status, 200)
        events = sse(raw)
        last = events[-1][1]
        self.assertEqual((events[-1][0], last["type"], last["code"]), ("error", "error", "UPSTREAM_UNAVAILABLE"))
        self.assertEqual(last["sequence_number"], events[-2][1]["sequence_number"] + 1)


class MessagesTests(AgentsBacked):
    async def test_create_and_stream_with_system_blocks(self):
        """messages.create and messages.stream answer Anthropic messages; system text blocks with cache_control become the system prompt."""
        self.start()
        client = self.claude()
        system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
        m = await deferToThread(lambda: client.messages.create(model="qwen3:32b", max_tokens=100, system=system, messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual((m.type, m.role, m.stop_reason), ("message", "assistant", "end_turn"))
        self.assertEqual(m.content[0].text, self.fake.reply_text)
        self.assertGreater(m.usage.input_tokens, 0)
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual(sent["messages"][0], {"role": "system", "content": "You are terse."})
        self.assertEqual(sent["options"]["num_predict"], 100)

        def run():
            with client.messages.stream(model="qwen3:32b", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

        text, final = await deferToThread(run)
        self.assertEqual(text, self.fake.reply_text)
        self.assertEqual((final.stop_reason, final.content[0].text), ("end_turn", self.fake.reply_text))
        self.assertGreater(final.usage.output_tokens, 0)

    async def test_bearer_token_too(self):
        """Authorization: Bearer works as well as x-api-key (ANTHROPIC_AUTH_TOKEN)."""
        self.start()
        m = await deferToThread(lambda: self.claude(use_x_api_key=False).messages.create(model="qwen3:32b", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(m.content[0].text, self.fake.reply_text)

    async def test_tool_use_with_a_tool_result_turn(self):
        """A tool is called (tool_use, stop_reason tool_use), streamed and not; the tool_result turn reaches the model as the tool's answer."""
        self.start(fake=FakeOllama(tool_calls=CALL))
        client = self.claude()
        ask = [{"role": "user", "content": "weather in Hangzhou?"}]
        m = await deferToThread(lambda: client.messages.create(model="qwen3:32b", max_tokens=100, tools=[WEATHER_ANTHROPIC], messages=ask))
        self.assertEqual(m.stop_reason, "tool_use")
        use = m.content[0]
        self.assertEqual((use.type, use.name, use.input), ("tool_use", "get_weather", {"city": "Hangzhou"}))

        def run():
            with client.messages.stream(model="qwen3:32b", max_tokens=100, tools=[WEATHER_ANTHROPIC], messages=ask) as stream:
                return stream.get_final_message()

        streamed = await deferToThread(run)
        self.assertEqual((streamed.stop_reason, streamed.content[0].input), ("tool_use", {"city": "Hangzhou"}))
        turn = ask + [
            {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in m.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ]
        answer = await deferToThread(lambda: client.messages.create(model="qwen3:32b", max_tokens=100, tools=[WEATHER_ANTHROPIC], messages=turn))
        self.assertEqual(answer.content[0].text, self.fake.reply_text)
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual([m["role"] for m in sent], ["user", "assistant", "tool"])
        self.assertEqual((sent[2]["content"], sent[2]["tool_name"]), ("sunny", "get_weather"))

    async def test_forced_tool_choice(self):
        """tool_choice {type: tool} comes back as that tool's use, held by its schema."""
        self.start(fake=FakeOllama(json_reply={"city": "Beijing"}))
        m = await deferToThread(lambda: self.claude().messages.create(model="qwen3:32b", max_tokens=100, tools=[WEATHER_ANTHROPIC], tool_choice={"type": "tool", "name": "get_weather"}, messages=[{"role": "user", "content": "x"}]))
        self.assertEqual((m.stop_reason, m.content[-1].name, m.content[-1].input), ("tool_use", "get_weather", {"city": "Beijing"}))

    async def test_images_and_thinking(self):
        """A base64 image reaches Ollama as an image; thinking enabled is Ollama's think, answered as a thinking block with a signature, streamed and not."""
        self.start()
        client = self.claude()
        image = png()
        content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}}, {"type": "text", "text": "what is this?"}]
        m = await deferToThread(lambda: client.messages.create(model="qwen3:32b", max_tokens=200, thinking={"type": "enabled", "budget_tokens": 100}, messages=[{"role": "user", "content": content}]))
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual(len(sent["messages"][0]["images"]), 1)
        self.assertIs(sent["think"], True)
        self.assertEqual([b.type for b in m.content], ["thinking", "text"])
        self.assertEqual(m.content[0].thinking, self.fake.thinking_text)
        self.assertTrue(m.content[0].signature)

        def run():
            with client.messages.stream(model="qwen3:32b", max_tokens=200, thinking={"type": "enabled", "budget_tokens": 100}, messages=[{"role": "user", "content": "hi"}]) as stream:
                kinds = [event.type for event in stream]
                return kinds, stream.get_final_message()

        kinds, final = await deferToThread(run)
        self.assertIn("thinking", kinds)
        self.assertIn("signature", kinds)
        self.assertEqual([b.type for b in final.content], ["thinking", "text"])
        # The thinking block echoed back in the next turn is left out.
        echoed = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [b.model_dump() for b in final.content]}, {"role": "user", "content": "more"}]
        await deferToThread(lambda: client.messages.create(model="qwen3:32b", max_tokens=200, messages=echoed))
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual(sent[1], {"role": "assistant", "content": self.fake.reply_text})

    async def test_what_claude_code_sends(self):
        """A Claude Code request (?beta=true, x-api-key, beta headers, a system message inside messages, adaptive thinking, context_management, output_config, metadata, a huge max_tokens, 2020-12 schemas, deferred and server tools, echoed thinking and tool blocks) streams an answer."""
        self.start()
        body = {
            "model": "qwen3:32b",
            "max_tokens": 128000,
            "stream": True,
            "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "fix the bug", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "let me look", "signature": "clawdbot"},
                    {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
                ]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "main.py"}]},
                {"role": "system", "content": "Reminder: be careful."},
                {"role": "user", "content": "go on", "output_config": {"effort": "high"}},
            ],
            "tools": [
                {"name": "Bash", "description": "run", "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "number", "exclusiveMinimum": 0}}, "required": ["command"], "additionalProperties": False}},
                {"name": "Later", "description": "deferred", "defer_loading": True, "input_schema": {"type": "object", "properties": {}}},
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
            ],
            "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "medium"},
            "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
            "temperature": 1,
        }
        headers = {
            b"x-api-key": [token(scope=ALL).encode()],
            b"anthropic-version": [b"2023-06-01"],
            b"anthropic-beta": [b"claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27"],
            b"x-stainless-lang": [b"js"],
        }
        self.fake.tool_calls = []
        status, got, raw = await post_raw(self.gw.url + "/v1/messages?beta=true", body, headers)
        self.assertEqual(status, 200, raw[:400])
        self.assertEqual(got.getRawHeaders(b"x-clawdbot-dropped-tools"), [b"web_search"])
        events = [d["type"] for e, d in sse(raw)]
        self.assertEqual(events[0], "message_start")
        self.assertEqual(events[-2:], ["message_delta", "message_stop"])
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual([m["role"] for m in sent["messages"]], ["system", "user", "assistant", "tool", "system", "user"])
        self.assertEqual(sent["messages"][2]["tool_calls"][0]["function"], {"name": "Bash", "arguments": {"command": "ls"}})
        self.assertNotIn("think", sent)
        self.assertLessEqual(sent["options"]["num_predict"], 131072)
        self.assertEqual([t["function"]["name"] for t in sent["tools"]], ["Bash", "Later"])

    async def test_refusals_in_anthropics_shape(self):
        """Authentication, scope, bad input, an unknown model and a spent quota answer Anthropic's error shape, which the SDK raises as its usual classes."""
        self.start('quotas: {requests_per_day: 1}\nbackend: {models: ["qwen3:32b"]}')
        ask = {"model": "qwen3:32b", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        with self.assertRaises(anthropic.AuthenticationError) as caught:
            await deferToThread(lambda: anthropic.Anthropic(base_url=self.gw.url, api_key="nope", max_retries=0, http_client=self.http(httpx2)).messages.create(**ask))
        self.assertEqual(caught.exception.body["error"]["type"], "authentication_error")
        with self.assertRaises(anthropic.PermissionDeniedError):
            await deferToThread(lambda: self.claude(scope="chat:read").messages.create(**ask))
        with self.assertRaises(anthropic.BadRequestError) as caught:
            await deferToThread(lambda: self.claude().messages.create(model="qwen3:32b", max_tokens=0, messages=ask["messages"]))
        self.assertIn("max_tokens", caught.exception.message)
        self.assertEqual(caught.exception.body, {"type": "error", "error": {"type": "invalid_request_error", "message": caught.exception.body["error"]["message"]}})
        with self.assertRaises(anthropic.NotFoundError) as caught:
            await deferToThread(lambda: self.claude().messages.create(**dict(ask, model="claude-sonnet-5-5")))
        self.assertIn("claude-sonnet-5-5", caught.exception.message)
        await deferToThread(lambda: self.claude().messages.create(**ask))
        with self.assertRaises(anthropic.RateLimitError):
            await deferToThread(lambda: self.claude().messages.create(**dict(ask, stream=True)))
        # Before routing too: a wrong content type, and a path that is not there.
        status, _, body = await get_json(self.gw.url + "/v1/messages/nope", method="POST", headers=bearer(token(scope=ALL)), body=ask)
        self.assertEqual((status, body["type"]), (404, "error"))

    async def test_count_tokens(self):
        """count_tokens answers an estimate of the prompt; nothing reaches the model."""
        self.start()
        before = len(self.fake.requests_to("/api/chat"))
        counted = await deferToThread(lambda: self.claude().messages.count_tokens(model="qwen3:32b", system="be brief", messages=[{"role": "user", "content": "hello there " * 40}]))
        self.assertGreater(counted.input_tokens, 100)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), before)

    async def test_alias_for_claude_model_names(self):
        """backend.aliases maps Claude Code's model names to a local model; the answer names the model asked for."""
        self.start('backend: {aliases: {claude-sonnet-5-5: "qwen3:32b", claude-haiku-5-5: "qwen3:32b"}}')
        m = await deferToThread(lambda: self.claude().messages.create(model="claude-sonnet-5-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(m.model, "claude-sonnet-5-5")
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["model"], "qwen3:32b")

    async def test_mid_stream_error_is_an_error_event(self):
        """The backend failing mid-stream ends the stream with Anthropic's error event."""

        self.start()
        self.fake.behave(fail_mid_stream=2)
        status, _, raw = await post_raw(self.gw.url + "/v1/messages", {"model": "qwen3:32b", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}, {b"x-api-key": [token(scope=ALL).encode()]})
        self.assertEqual(status, 200)
        event, data = sse(raw)[-1]
        self.assertEqual((event, data["type"], data["error"]["type"]), ("error", "error", "api_error"))


class ReviewTests(AgentsBacked):
    """What an outside review of the two routes found, with variants."""

    async def test_a_large_body_with_x_api_key(self):
        """A Messages body over 64 KiB with its credential in x-api-key (Claude Code's usual request) is read, not refused as anonymous; without one it is a 401 in Anthropic's shape."""
        self.start()
        system = "You are Claude Code. " * 5000
        m = await deferToThread(lambda: self.claude().messages.create(model="qwen3:32b", max_tokens=10, system=system, messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(m.content[0].text, self.fake.reply_text)
        body = {"model": "qwen3:32b", "max_tokens": 10, "system": system, "messages": [{"role": "user", "content": "hi"}]}
        status, _, raw = await post_raw(self.gw.url + "/v1/messages/count_tokens", body, {b"x-api-key": [token(scope=ALL).encode()]})
        self.assertEqual(status, 200, raw[:200])
        status, _, raw = await post_raw(self.gw.url + "/v1/messages", body, {})
        self.assertEqual((status, json.loads(raw)["error"]["type"]), (401, "authentication_error"))

    async def test_forced_tool_on_a_thinking_model_streams_whole(self):
        """A forced tool on a model that thinks first streams its thinking, then the call with all its arguments, on both APIs."""
        self.start(fake=FakeOllama(think_by_default=True, json_reply={"city": "Beijing"}))
        tools = [WEATHER, dict(WEATHER, name="get_time")]

        def responses_run():
            with self.sdk().responses.stream(model="qwen3:32b", input="x", tools=tools, tool_choice={"type": "function", "name": "get_time"}, reasoning={"effort": "high"}, store=False) as stream:
                for _ in stream:
                    pass
                return stream.get_final_response()

        final = await deferToThread(responses_run)
        self.assertEqual([item.type for item in final.output], ["reasoning", "function_call"])
        self.assertEqual((final.output[1].name, json.loads(final.output[1].arguments)), ("get_time", {"city": "Beijing"}))

        def messages_run():
            tool = dict(WEATHER_ANTHROPIC, name="get_time")
            with self.claude().messages.stream(model="qwen3:32b", max_tokens=100, tools=[WEATHER_ANTHROPIC, tool], tool_choice={"type": "tool", "name": "get_time"}, thinking={"type": "enabled", "budget_tokens": 50}, messages=[{"role": "user", "content": "x"}]) as stream:
                return stream.get_final_message()

        message = await deferToThread(messages_run)
        self.assertEqual([block.type for block in message.content], ["thinking", "tool_use"])
        self.assertEqual((message.content[1].name, message.content[1].input), ("get_time", {"city": "Beijing"}))

    async def test_a_spent_quota_is_not_retried(self):
        """A spent quota says x-should-retry: false, so the SDKs' default retries raise at once instead of sleeping until the quota resets."""
        self.start("quotas: {requests_per_day: 1}")
        await deferToThread(lambda: self.claude().messages.create(model="qwen3:32b", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
        patient = anthropic.Anthropic(base_url=self.gw.url, api_key=token(scope=ALL), http_client=self.http(httpx2))
        with self.assertRaises(anthropic.RateLimitError) as caught:
            await deferToThread(lambda: patient.messages.create(model="qwen3:32b", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual(caught.exception.response.headers["x-should-retry"], "false")
        openai_patient = openai.OpenAI(base_url=self.gw.url + "/v1", api_key=token(scope=ALL), http_client=self.http())
        with self.assertRaises(openai.RateLimitError):
            await deferToThread(lambda: openai_patient.responses.create(model="qwen3:32b", input="hi"))
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)

    async def test_refusals_outside_the_routes_have_anthropics_shape(self):
        """A 431 head and paths under count_tokens answer in Anthropic's shape on the Messages API."""
        self.start()
        auth = bearer(token(scope=ALL))
        for path in ("/v1/messages/count_tokens/x", "/v1/messages/count_tokens/", "/v1/messages/x/y"):
            status, _, body = await get_json(self.gw.url + path, method="POST", headers=auth, body={})
            self.assertEqual((status, body["type"], body["error"]["type"]), (404, "error", "not_found_error"), path)
        status, _, body = await get_json(self.gw.url + "/v1/messages", method="POST", headers=dict(auth, **{"x-big": "a" * 17000}), body={})
        self.assertEqual((status, body["error"]["type"]), (431, "invalid_request_error"))

    async def test_each_turn_is_stored_once(self):
        """A chain stores each turn once (its conversation is read back through the parents); a chain past responses.max_stored_bytes, or echoed fields past it, is a 400; past responses.max_bytes_per_user a 429; deleting a response in the middle ends its chain with a clear 404."""
        self.start("responses: {max_stored_bytes: 6000, max_bytes_per_user: 20000}")
        client = self.sdk()
        last = None
        for n in range(5):
            last = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input=f"turn {n} " + "x" * 200, previous_response_id=last.id if last else None))
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual([m["content"][:6] for m in sent if m["role"] == "user"], [f"turn {n}" for n in range(5)])
        rows = await self.gw.parts.responses.engine.run(lambda cur: (cur.execute("SELECT depth, LENGTH(turn), chain_bytes FROM responses ORDER BY depth"), cur.fetchall())[1])
        self.assertEqual([r[0] for r in rows], [0, 1, 2, 3, 4])
        self.assertTrue(all(r[1] < 600 for r in rows), rows)
        with self.assertRaises(openai.BadRequestError) as caught:
            await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="y" * 5000, previous_response_id=last.id))
        self.assertIn("max_stored_bytes", caught.exception.message)
        with self.assertRaises(openai.RateLimitError) as caught:
            await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="z", instructions="i" * 19000))
        self.assertIn("max_bytes_per_user", caught.exception.message)
        items = await deferToThread(lambda: client.responses.input_items.list(last.id, order="asc"))
        self.assertEqual([(i.type, i.role, i.content[0].text[:6]) for i in items.data], [("message", "user", "turn 4")])
        chain = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="middle", previous_response_id=last.id))
        await deferToThread(lambda: client.responses.delete(last.id))
        with self.assertRaises(openai.NotFoundError) as caught:
            await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="on", previous_response_id=chain.id))
        self.assertIn("deleted or has expired", caught.exception.message)

    async def test_malformed_tools_and_empty_conversations(self):
        """An empty input or messages list, two tools of one name, and an Anthropic tool without input_schema are 400s naming the field; count_tokens counts the tools."""
        self.start()
        cases = [
            ("/v1/responses", {"model": "qwen3:32b", "input": []}, "input"),
            ("/v1/responses", {"model": "qwen3:32b", "input": "x", "tools": [WEATHER, WEATHER]}, "tools"),
            ("/v1/messages", {"model": "qwen3:32b", "max_tokens": 5, "messages": []}, "messages"),
            ("/v1/messages", {"model": "qwen3:32b", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_ANTHROPIC, WEATHER_ANTHROPIC]}, "tools"),
            ("/v1/messages", {"model": "qwen3:32b", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}, "input_schema"),
        ]
        for path, body, field in cases:
            status, _, reply = await get_json(self.gw.url + path, method="POST", headers=self.auth, body=body)
            self.assertEqual(status, 400, (path, body))
            message = reply["error"]["message"]
            self.assertIn(field, message)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        ask = {"model": "qwen3:32b", "messages": [{"role": "user", "content": "x"}]}
        _, _, bare = await get_json(self.gw.url + "/v1/messages/count_tokens", method="POST", headers=self.auth, body=ask)
        tools = [dict(WEATHER_ANTHROPIC, name=f"tool_{i}", description="d" * 400) for i in range(20)]
        _, _, with_tools = await get_json(self.gw.url + "/v1/messages/count_tokens", method="POST", headers=self.auth, body=dict(ask, tools=tools))
        self.assertGreater(with_tools["input_tokens"], bare["input_tokens"] + 2000)


class StoredOnPostgresTests(AgentsBacked):
    """Stored responses on PostgreSQL: the same chains, owners and limits."""

    def start(self, extra="", fake=None):
        from tests.helpers import merge_yaml
        from tests.test_sessions import pg_database

        return super().start(merge_yaml(f'storage: {{backend: postgresql, dsn: "{pg_database(self)}"}}', extra), fake=fake)

    test_each_turn_is_stored_once = ReviewTests.test_each_turn_is_stored_once
    test_previous_response_id_chains_and_belongs_to_its_owner = ResponsesTests.test_previous_response_id_chains_and_belongs_to_its_owner
    test_stored_stream_chains = ResponsesTests.test_stored_stream_chains


class SecondReviewTests(AgentsBacked):
    """The re-check of the review's fixes, with variants."""

    async def test_a_cut_short_call(self):
        """A forced call cut short mid-arguments is an incomplete item the conversation can go on from; cut short before any arguments, there is no call at all, on both APIs, streamed and not."""
        self.start(fake=FakeOllama(json_reply={"city": "Beijing", "long": "a " * 40}))
        client = self.sdk()
        cut = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="x", tools=[WEATHER], tool_choice="required", max_output_tokens=4))
        self.assertEqual((cut.status, cut.output[0].type, cut.output[0].status), ("incomplete", "function_call", "incomplete"))
        follow = [{"type": "function_call_output", "call_id": cut.output[0].call_id, "output": "sunny"}]
        answer = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input=follow, previous_response_id=cut.id, tools=[WEATHER]))
        self.assertEqual(answer.status, "completed")
        self.fake.think_by_default = True
        for stream in (False, True):
            body = {"model": "qwen3:32b", "input": "x", "tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 3, "reasoning": {"effort": "high"}, "store": False, "stream": stream}
            status, _, raw = await post_raw(self.gw.url + "/v1/responses", body, {b"authorization": [self.auth["Authorization"].encode()]})
            final = sse(raw)[-1][1]["response"] if stream else json.loads(raw)
            self.assertEqual((status, final["status"]), (200, "incomplete"))
            self.assertEqual([item["type"] for item in final["output"]], ["reasoning"], stream)
            ask = {"model": "qwen3:32b", "max_tokens": 3, "stream": stream, "tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "any"}, "thinking": {"type": "enabled", "budget_tokens": 10}, "messages": [{"role": "user", "content": "x"}]}
            status, _, raw = await post_raw(self.gw.url + "/v1/messages", ask, {b"x-api-key": [token(scope=ALL).encode()]})
            self.assertEqual(status, 200)
            if stream:
                events = [d for _, d in sse(raw)]
                self.assertNotIn("tool_use", [d["content_block"]["type"] for d in events if d["type"] == "content_block_start"])
                self.assertEqual(events[-2]["delta"]["stop_reason"], "max_tokens")
            else:
                message = json.loads(raw)
                self.assertEqual(([b["type"] for b in message["content"]], message["stop_reason"]), (["thinking"], "max_tokens"))

    async def test_concurrent_calls_share_the_stored_bytes_limit(self):
        """Calls under way hold their share of responses.max_bytes_per_user, so a burst cannot all pass on one remainder."""
        self.start("responses: {max_bytes_per_user: 30000}")
        self.fake.hold()
        body = {"model": "qwen3:32b", "input": "x", "instructions": "i" * 12000}
        done = gatherResults([Deferred.fromCoroutine(get_json(self.gw.url + "/v1/responses", method="POST", headers=self.auth, body=body)) for _ in range(6)])
        await self.fake.when_requests(2, "/api/chat")
        self.fake.release()
        results = await done
        self.assertEqual(sorted(status for status, _, _ in results), [200, 200, 429, 429, 429, 429])
        used = await self.gw.parts.responses.used(token_owner(self))
        self.assertTrue(24000 < used <= 30000 + 2 * 1000, used)

    async def test_nothing_to_read_is_a_400(self):
        """Input that translates to no message at all (only reasoning or hosted tools' items; empty or thinking-only content) is a 400, and Ollama is not called."""
        self.start()
        cases = [
            ("/v1/responses", {"model": "qwen3:32b", "input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}),
            ("/v1/responses", {"model": "qwen3:32b", "instructions": "be", "input": [{"type": "web_search_call", "id": "ws_1"}]}),
            ("/v1/messages", {"model": "qwen3:32b", "max_tokens": 5, "messages": [{"role": "user", "content": []}]}),
            ("/v1/messages", {"model": "qwen3:32b", "max_tokens": 5, "stream": True, "system": "s", "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "t"}]}]}),
        ]
        for path, body in cases:
            status, _, reply = await get_json(self.gw.url + path, method="POST", headers=self.auth, body=body)
            self.assertEqual(status, 400, (path, body, reply))
        self.assertEqual(self.fake.requests_to("/api/chat"), [])

    async def test_namespace_names_do_not_depend_on_order(self):
        """A namespaced function sharing a top-level function's name is renamed whatever their order; a real duplicate, or a rename that would clash, is a 400."""
        self.start(fake=FakeOllama(tool_calls=[]))
        f = {"type": "function", "name": "f", "parameters": {"type": "object"}}
        ns = {"type": "namespace", "name": "ns", "description": "d", "tools": [f]}
        for tools in ([f, ns], [ns, f]):
            status, _, reply = await get_json(self.gw.url + "/v1/responses", method="POST", headers=self.auth, body={"model": "qwen3:32b", "input": "x", "tools": tools, "store": False})
            self.assertEqual(status, 200, reply)
            self.assertEqual(sorted(t["function"]["name"] for t in self.fake.requests_to("/api/chat")[-1].body["tools"]), ["f", "ns__f"])
        for tools in ([ns, ns], [f, ns, dict(f, name="ns__f")]):
            status, _, reply = await get_json(self.gw.url + "/v1/responses", method="POST", headers=self.auth, body={"model": "qwen3:32b", "input": "x", "tools": tools, "store": False})
            self.assertEqual(status, 400, tools)

    async def test_percent_escaped_path(self):
        """/v1/%6Dessages is the Messages API for its credential and its error shape too."""
        self.start()
        body = {"model": "qwen3:32b", "max_tokens": 10, "system": "s " * 40000, "messages": [{"role": "user", "content": "hi"}]}
        status, _, raw = await post_raw(self.gw.url + "/v1/%6Dessages", body, {b"x-api-key": [token(scope=ALL).encode()]})
        self.assertEqual(status, 200, raw[:200])
        status, _, raw = await post_raw(self.gw.url + "/v1/%6Dessages", body, {})
        self.assertEqual((status, json.loads(raw)["error"]["type"]), (401, "authentication_error"))

    async def test_a_conversation_lives_as_long_as_its_newest_response(self):
        """Each new response of a chain moves the expiry of every earlier one to its own."""
        self.start()
        client = self.sdk()
        first = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="one"))
        second = await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="two", previous_response_id=first.id))
        await deferToThread(lambda: client.responses.create(model="qwen3:32b", input="three", previous_response_id=second.id))
        rows = await self.gw.parts.responses.engine.run(lambda cur: (cur.execute("SELECT expires_at FROM responses ORDER BY depth"), cur.fetchall())[1])
        self.assertEqual(len({row[0] for row in rows}), 1)


def token_owner(testcase):
    """The owner key of the default test token's user."""
    from tests.helpers import ISSUER

    from clawdbot.auth.identity import owner_key

    return owner_key(ISSUER, "alice")


class LimitsTests(AgentsBacked):
    """The gateway's limits answer in each route's shape and raise the SDKs' usual classes."""

    async def test_request_and_token_budgets(self):
        """The per-minute request budget and the token budget: 429 in each shape (RateLimitError in both SDKs), with Retry-After."""
        self.start("rate_limit: {requests_per_minute: 2}")
        ask = {"model": "qwen3:32b", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", store=False))
        await deferToThread(lambda: self.claude().messages.create(**ask))
        with self.assertRaises(openai.RateLimitError) as caught:
            await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", store=False))
        self.assertEqual(caught.exception.body["code"], "RATE_LIMITED")
        with self.assertRaises(anthropic.RateLimitError) as caught:
            await deferToThread(lambda: self.claude().messages.create(**ask))
        self.assertEqual(caught.exception.body["error"]["type"], "rate_limit_error")
        self.assertTrue(caught.exception.response.headers["retry-after"])

    async def test_token_budget(self):
        """Once a call has spent the token budget (its reservation takes it into debt), the next is a 429 before the model is called."""
        self.start("rate_limit: {requests_per_minute: 0, tokens_per_minute: 50}", fake=FakeOllama(tokens=200))
        await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", max_output_tokens=1000, store=False))
        with self.assertRaises(anthropic.RateLimitError):
            await deferToThread(lambda: self.claude().messages.create(model="qwen3:32b", max_tokens=1000, messages=[{"role": "user", "content": "hi"}]))
        with self.assertRaises(openai.RateLimitError):
            await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", max_output_tokens=1000, store=False))
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)

    async def test_a_full_queue(self):
        """With the backend's one slot taken and no queue, a call is a 503 GATEWAY_BUSY in each shape (the SDKs' InternalServerError; Anthropic's overloaded_error)."""
        self.start("max_connections: 1\nlimits: {max_queue: 0}")
        self.fake.hold()
        first = Deferred.fromCoroutine(get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"model": "qwen3:32b", "messages": [{"role": "user", "content": "hi"}]}))
        await self.fake.when_requests(1, "/api/chat")
        with self.assertRaises(openai.InternalServerError) as caught:
            await deferToThread(lambda: self.sdk().responses.create(model="qwen3:32b", input="hi", store=False))
        self.assertEqual(caught.exception.body["code"], "GATEWAY_BUSY")
        with self.assertRaises(anthropic.InternalServerError) as caught:
            await deferToThread(lambda: self.claude().messages.create(model="qwen3:32b", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
        self.assertEqual((caught.exception.status_code, caught.exception.body["error"]["type"]), (503, "overloaded_error"))
        self.fake.release()
        await first
