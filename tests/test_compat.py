"""
Client compatibility (issue 14, the first items): what real clients send by
default is accepted and honoured, driven with the official openai SDK.
"""

import json

from twisted.internet.threads import deferToThread

from testing.fake_ollama import FakeOllama, Reply
from tests.helpers import bearer, get_json, token
from tests.test_chat import HI, Backed, sse_events

TWO_CALLS = [
    {"function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}},
    {"function": {"name": "get_weather", "arguments": {"city": "Beijing"}}},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


class CompatTests(Backed):
    async def test_parallel_tool_calls_false_keeps_the_first_call(self):
        """parallel_tool_calls: false (LlamaIndex's default) is accepted and only the first tool call comes back, streamed and not."""
        self.start(fake=FakeOllama(tool_calls=TWO_CALLS))
        messages = [{"role": "user", "content": "weather?"}]
        both = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=messages, tools=TOOLS))
        self.assertEqual(len(both.choices[0].message.tool_calls), 2)
        one = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=messages, tools=TOOLS, parallel_tool_calls=False))
        calls = one.choices[0].message.tool_calls
        self.assertEqual([json.loads(c.function.arguments) for c in calls], [{"city": "Hangzhou"}])
        self.assertEqual(one.choices[0].finish_reason, "tool_calls")

        def run():
            stream = self.sdk().chat.completions.create(model="qwen3:32b", messages=messages, tools=TOOLS, parallel_tool_calls=False, stream=True)
            return [c for c in stream if c.choices]

        chunks = await deferToThread(run)
        streamed = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        self.assertEqual([json.loads(tc.function.arguments) for tc in streamed], [{"city": "Hangzhou"}])
        self.assertEqual(chunks[-1].choices[0].finish_reason, "tool_calls")

    async def test_models_retrieve(self):
        """client.models.retrieve works for a listed model (one with slashes in its name too) and an alias; an unknown one is 404 MODEL_NOT_FOUND."""
        import openai

        self.start('backend: {aliases: {gpt-4o: "qwen3:32b"}}', fake=FakeOllama(["qwen3:32b", "hf.co/org/tiny-gguf:q4_k_m"]))
        model = await deferToThread(lambda: self.sdk().models.retrieve("hf.co/org/tiny-gguf:q4_k_m"))
        self.assertEqual(model.id, "hf.co/org/tiny-gguf:q4_k_m")
        model = await deferToThread(lambda: self.sdk().models.retrieve("qwen3:32b"))
        self.assertEqual((model.id, model.object), ("qwen3:32b", "model"))
        alias = await deferToThread(lambda: self.sdk().models.retrieve("gpt-4o"))
        self.assertEqual(alias.id, "gpt-4o")
        with self.assertRaises(openai.NotFoundError) as caught:
            await deferToThread(lambda: self.sdk().models.retrieve("nope:1b"))
        self.assertEqual(caught.exception.body["code"], "MODEL_NOT_FOUND")

    async def test_newer_metadata_fields_and_think(self):
        """prompt_cache_key, safety_identifier and verbosity are accepted and ignored; think is Ollama's switch, refused beside reasoning_effort."""
        self.start()
        for extra in ({"prompt_cache_key": "k", "safety_identifier": "u1", "verbosity": "low"}, {"think": True}, {"think": "high"}, {"think": False}):
            status, _, reply = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body=dict({"messages": HI}, **extra))
            self.assertEqual(status, 200, (extra, reply))
            sent = self.fake.requests_to("/api/chat")[-1].body
            for key in ("prompt_cache_key", "safety_identifier", "verbosity"):
                self.assertNotIn(key, sent)
            if "think" in extra:
                self.assertEqual(sent["think"], extra["think"])
        for extra in ({"think": "max"}, {"think": [1]}, {"think": True, "reasoning_effort": "low"}):
            status, _, reply = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body=dict({"messages": HI}, **extra))
            self.assertEqual(status, 400, extra)

    async def test_token_id_embeddings_say_what_to_do(self):
        """Token-id input (LangChain OpenAIEmbeddings' default) is refused with a reason naming the setting to change."""
        self.start()
        for data in ([[15339, 1917]], [15339, 1917]):
            status, _, reply = await get_json(self.gw.url + "/v1/embeddings", method="POST", headers=bearer(token(scope="chat:write")), body={"model": "nomic-embed-text", "input": data})
            self.assertEqual(status, 400)
            self.assertIn("check_embedding_ctx_length=False", reply["error"]["details"])
        self.assertEqual(self.fake.requests_to("/api/embed"), [])

    async def test_sdk_errors_carry_the_reason_and_param(self):
        """OpenAI SDKs show only `message`: it carries the curated reason, and `param` names the field (null when none)."""
        import openai

        self.start()
        with self.assertRaises(openai.BadRequestError) as caught:
            await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=HI, temperature=5))
        self.assertIn("'temperature' must be between 0 and 2", str(caught.exception))
        self.assertEqual(caught.exception.body["param"], "temperature")
        status, _, reply = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": [{"role": "user", "content": 5}]})
        self.assertEqual((status, reply["error"]["param"]), (400, "messages[0].content"))
        status, _, reply = await get_json(self.gw.url + "/v1/me")
        self.assertEqual(reply["error"]["param"], None)
        self.assertEqual(reply["error"]["message"], "Authentication required: a Bearer token is required")

    async def test_openai_rate_limit_header_names(self):
        """Answers carry OpenAI's x-ratelimit-*-requests and, with a token budget, *-tokens headers beside the generic ones."""
        self.start("rate_limit: {requests_per_minute: 30, tokens_per_minute: 5000}")
        status, headers, _ = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI})
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("x-ratelimit-limit-requests"), ["30"])
        self.assertEqual(headers.getRawHeaders("x-ratelimit-remaining-requests"), ["29"])
        self.assertRegex(headers.getRawHeaders("x-ratelimit-reset-requests")[0], r"^\d+s$")
        self.assertEqual(headers.getRawHeaders("x-ratelimit-limit-tokens"), ["5000"])
        self.assertEqual(headers.getRawHeaders("x-ratelimit-limit"), ["30"])


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["Asia/Shanghai", "UTC"]}}, "required": ["zone"]}
TWO_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]


class ForcedToolTests(Backed):
    """tool_choice that forces a call, emulated with Ollama's format (Ollama has no tool_choice)."""

    def create(self, **kw):
        kw.setdefault("model", "qwen3:32b")
        kw.setdefault("messages", [{"role": "user", "content": "weather in Hangzhou?"}])
        return deferToThread(lambda: self.sdk().chat.completions.create(**kw))

    async def streamed(self, **kw):
        def run():
            return list(self.sdk().chat.completions.create(stream=True, model="qwen3:32b", messages=[{"role": "user", "content": "weather in Hangzhou?"}], **kw))

        return await deferToThread(run)

    async def test_named_function_becomes_the_call(self):
        """tool_choice naming a function: Ollama gets format = its parameters (no tools, an instruction), the answer is that call."""
        self.start(fake=FakeOllama(json_reply={"city": "Hangzhou", "days": 3}))
        reply = await self.create(tools=TWO_TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = reply.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertIsNone(choice.message.content)
        [call] = choice.message.tool_calls
        self.assertEqual((call.type, call.function.name), ("function", "get_weather"))
        self.assertEqual(json.loads(call.function.arguments), {"city": "Hangzhou", "days": 3})
        self.assertTrue(call.id.startswith("call_"))
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual(sent["format"], WEATHER)
        self.assertNotIn("tools", sent)
        self.assertEqual(sent["messages"][0]["role"], "system")
        self.assertIn("get_weather", sent["messages"][0]["content"])
        self.assertGreater(reply.usage.total_tokens, 0)

    async def test_named_function_streams_its_arguments(self):
        """Streamed: the call's head first, then the model's JSON as argument deltas, finish_reason tool_calls; usage null until the usage chunk."""
        self.start(fake=FakeOllama(json_reply={"city": "Hangzhou", "days": 3}))
        chunks = await self.streamed(tools=TWO_TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream_options={"include_usage": True})
        deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        self.assertEqual(deltas[0].function.name, "get_weather")
        self.assertTrue(deltas[0].id)
        self.assertGreater(len(deltas), 2)  # the arguments arrive piece by piece
        self.assertEqual({d.index for d in deltas}, {0})
        self.assertEqual(json.loads("".join(d.function.arguments or "" for d in deltas)), {"city": "Hangzhou", "days": 3})
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "tool_calls")
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))
        self.assertGreater(chunks[-1].usage.total_tokens, 0)
        self.assertEqual(chunks[-1].choices, [])

    async def test_required_with_one_tool_forces_it(self):
        """tool_choice "required" with one tool is that tool, forced (streamed and not)."""
        self.start()
        reply = await self.create(tools=TWO_TOOLS[1:], tool_choice="required")
        [call] = reply.choices[0].message.tool_calls
        self.assertEqual((call.function.name, json.loads(call.function.arguments)), ("get_time", {"zone": "Asia/Shanghai"}))
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["format"], TIME)

    async def test_required_with_several_tools_when_the_model_calls(self):
        """tool_choice "required" with several tools: Ollama gets the tools; a call comes back as it is, in one call to Ollama."""
        self.start()
        reply = await self.create(tools=TWO_TOOLS, tool_choice="required")
        self.assertEqual(reply.choices[0].finish_reason, "tool_calls")
        self.assertEqual(reply.choices[0].message.tool_calls[0].function.name, "get_weather")
        [sent] = self.fake.requests_to("/api/chat")
        self.assertEqual([t["function"]["name"] for t in sent.body["tools"]], ["get_weather", "get_time"])
        self.assertNotIn("format", sent.body)

    async def test_required_retries_once_with_a_union_schema(self):
        """A model that answers "required" without a call is asked once more under a union schema; both calls are charged; streamed too."""
        self.start(fake=FakeOllama(tool_calls=[]))
        reply = await self.create(tools=TWO_TOOLS, tool_choice="required")
        [call] = reply.choices[0].message.tool_calls
        self.assertEqual((call.function.name, json.loads(call.function.arguments)), ("get_weather", {"city": "example", "days": 1}))
        first, second = self.fake.requests_to("/api/chat")
        self.assertIn("tools", first.body)
        self.assertNotIn("tools", second.body)
        self.assertEqual([b["properties"]["name"]["enum"] for b in second.body["format"]["anyOf"]], [["get_weather"], ["get_time"]])
        self.assertGreater(reply.usage.prompt_tokens, 2 * len(first.body["messages"]))
        chunks = await self.streamed(tools=TWO_TOOLS, tool_choice="required", stream_options={"include_usage": True})
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        self.assertEqual([c.function.name for c in calls], ["get_weather"])
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "tool_calls")
        self.assertEqual(chunks[-1].usage.total_tokens, reply.usage.total_tokens)

    async def test_required_without_any_call_is_a_clear_error(self):
        """When the model still answers without a call, the client gets a 502 that says so, never a plain answer."""
        import openai

        self.start(fake=FakeOllama(tool_calls=[], json_reply={"nothing": True}))
        with self.assertRaises(openai.APIStatusError) as caught:
            await self.create(tools=TWO_TOOLS, tool_choice="required")
        self.assertEqual(caught.exception.status_code, 502)
        self.assertIn("did not call a tool", str(caught.exception))
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 2)

    async def test_allowed_tools_and_refusals(self):
        """allowed_tools narrows the offer; a function not in tools, required without tools, other tool types and a JSON response_format beside a forced call are 400s naming the field."""
        self.start()
        reply = await self.create(tools=TWO_TOOLS, tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "get_time"}}]}})
        self.assertEqual(reply.choices[0].message.tool_calls[0].function.name, "get_time")
        bad = (
            ({"tools": TWO_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
            ({"tool_choice": "required"}, "tool_choice"),
            ({"tools": TWO_TOOLS, "tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice"),
            ({"tools": TWO_TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
            ({"tools": TWO_TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "response_format": {"type": "json_object"}}, "tool_choice"),
        )
        for extra, param in bad:
            status, _, body = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body=dict({"messages": HI}, **extra))
            self.assertEqual((status, body["error"]["param"]), (400, param), (extra, body))
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)

    async def test_forced_call_in_a_session_and_length(self):
        """In a session the instruction goes to the model first, ahead of the stored context, and is never stored; a forced call cut short by max_tokens ends with finish_reason length, as OpenAI's does."""
        self.start()
        status, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=self.auth, body={"title": "t"})
        self.assertEqual(status, 201)
        sid = session["id"]
        for text in ("first", "second"):
            status, _, reply = await get_json(
                self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth,
                body={"session_id": sid, "messages": [{"role": "user", "content": text}], "tools": TWO_TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            )
            self.assertEqual((status, reply["choices"][0]["finish_reason"]), (200, "tool_calls"), reply)
        sent = self.fake.requests_to("/api/chat")[-1].body["messages"]
        self.assertEqual(sent[0]["role"], "system")
        self.assertIn("get_time", sent[0]["content"])
        self.assertEqual([m["content"] for m in sent[1:]], ["first", "", "second"])
        status, _, stored = await get_json(self.gw.url + f"/v1/sessions/{sid}", headers=self.auth)
        self.assertEqual([m["role"] for m in stored["messages"]], ["user", "assistant", "user", "assistant"])
        reply = await self.create(tools=TWO_TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=2)
        self.assertEqual(reply.choices[0].finish_reason, "length")
        self.assertEqual(reply.choices[0].message.tool_calls[0].function.name, "get_weather")


LOC = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
NESTED = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"], "$defs": {"Loc": LOC}}


class ForcedToolEdgeTests(Backed):
    """What an outsider tried against the emulation, and the variants."""

    async def post(self, body, auth=None):
        return await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=auth or self.auth, body=dict({"messages": HI}, **body))

    async def test_union_keeps_references_resolvable(self):
        """A pydantic-style schema ($ref into its own $defs) still resolves inside the retry's union schema."""
        self.start(fake=FakeOllama(tool_calls=[]))
        tools = [{"type": "function", "function": {"name": "where", "parameters": NESTED}}, TWO_TOOLS[1]]
        status, _, reply = await self.post({"tools": tools, "tool_choice": "required"})
        self.assertEqual(status, 200, reply)
        call = reply["choices"][0]["message"]["tool_calls"][0]["function"]
        self.assertEqual((call["name"], json.loads(call["arguments"])), ("where", {"loc": {"city": "example"}}))
        fmt = self.fake.requests_to("/api/chat")[-1].body["format"]
        self.assertEqual(fmt["$defs"]["f0"]["properties"]["loc"], {"$ref": "#/$defs/f0/$defs/Loc"})
        self.assertEqual(fmt["anyOf"][0]["properties"]["arguments"], {"$ref": "#/$defs/f0"})

    async def test_forced_arguments_must_be_an_object(self):
        """A forced call whose answer is not one JSON object is a 502 (streamed: the error event, no finish chunk); never invented arguments."""
        for content in ("Sure, I will call get_weather.", "", "[1, 2]"):
            fake = FakeOllama()
            fake.reply_hook = lambda path, body, content=content: content
            self.start(fake=fake)
            forced = {"tools": TWO_TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
            status, _, reply = await self.post(forced)
            self.assertEqual((status, reply["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"), content)
            self.assertIn("arguments of get_weather", reply["error"]["message"])
            status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body=dict({"messages": HI, "stream": True}, **forced))
            events = sse_events(raw)
            self.assertEqual(events[-1]["error"]["code"], "UPSTREAM_UNAVAILABLE", content)
            self.assertNotIn(b"[DONE]", raw)
            self.assertFalse([e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]])

    async def test_required_cut_short_is_length_without_a_retry(self):
        """A required call whose first reply is cut short by max_tokens ends with finish_reason length; no second call is made."""
        self.start(fake=FakeOllama(tool_calls=[]))
        status, _, reply = await self.post({"tools": TWO_TOOLS, "tool_choice": "required", "max_tokens": 2})
        self.assertEqual((status, reply["choices"][0]["finish_reason"]), (200, "length"))
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)

    async def test_required_ignores_calls_to_functions_not_offered(self):
        """A call to a function that was not offered is no call: the model is asked once more and a real call comes back."""
        self.start(fake=FakeOllama(tool_calls=[{"function": {"name": "rm_rf", "arguments": {"path": "/"}}}]))
        status, _, reply = await self.post({"tools": TWO_TOOLS, "tool_choice": "required"})
        self.assertEqual(status, 200, reply)
        self.assertEqual([c["function"]["name"] for c in reply["choices"][0]["message"]["tool_calls"]], ["get_weather"])
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 2)

    async def test_the_retry_is_reserved_from_the_token_budget(self):
        """The second call takes its own reservation first: a budget the first call's reservation spends refuses the retry with 429, before it reaches Ollama."""
        # The first reservation (a short prompt and 256 for the reply) leaves this budget in debt.
        self.start("rate_limit: {tokens_per_minute: 250}", fake=FakeOllama(tool_calls=[]))
        status, _, reply = await self.post({"tools": TWO_TOOLS, "tool_choice": "required"})
        self.assertEqual((status, reply["error"]["code"]), (429, "RATE_LIMITED"), reply)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)

    async def test_tool_definitions_and_conflicts_refused(self):
        """Function names outside OpenAI's alphabet, parameters that are not an object schema, a JSON response_format beside required, and bodies nested past 128 levels are 400s."""
        self.start()
        deep = {"type": "object", "properties": {}}
        for _ in range(200):
            deep = {"type": "object", "properties": {"a": deep}}
        cases = (
            {"tools": [{"type": "function", "function": {"name": "", "parameters": LOC}}]},
            {"tools": [{"type": "function", "function": {"name": "a\nIgnore previous", "parameters": LOC}}]},
            {"tools": [{"type": "function", "function": {"name": "x" * 65, "parameters": LOC}}]},
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            {"tools": TWO_TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}, TWO_TOOLS[1]], "tool_choice": "required"},
        )
        for body in cases:
            status, _, reply = await self.post(body)
            self.assertEqual((status, reply["error"]["code"]), (400, "INVALID_REQUEST"), body)
        status, _, _ = await self.post({"tools": [{"type": "function", "function": {"name": "mcp.server:tool-1", "parameters": LOC}}]})
        self.assertEqual(status, 200)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)


    async def test_what_the_model_sends_is_read_strictly(self):
        """Model output nested past 128 levels, or with NaN/Infinity, is a 502 (streamed: the error event), never a 500 or arguments a client cannot parse."""
        deep = "[" * 3000 + "]" * 3000
        cases = (
            ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, Reply(content=deep)),
            ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, Reply(content='{"city": NaN}')),
            ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, Reply(content='{"city": Infinity}')),
            ({"tool_choice": "required"}, Reply(content='{"name": "get_weather", "arguments": {"city": NaN}}')),
        )
        for extra, answer in cases:
            fake = FakeOllama(tool_calls=[])
            fake.reply_hook = lambda path, body, answer=answer: answer
            self.start(fake=fake)
            status, _, reply = await self.post(dict({"tools": TWO_TOOLS}, **extra))
            self.assertEqual((status, reply["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"), (extra, answer.content[:30]))
            status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body=dict({"messages": HI, "stream": True, "tools": TWO_TOOLS}, **extra))
            if status == 200:
                self.assertEqual(sse_events(raw)[-1]["error"]["code"], "UPSTREAM_UNAVAILABLE")
            else:
                self.assertEqual(status, 502)

    async def test_calls_to_functions_not_offered_are_dropped(self):
        """Whatever the tool_choice, a call to a function that was not offered never reaches the client, streamed or not."""
        self.start(fake=FakeOllama(tool_calls=[{"function": {"name": "rm_rf", "arguments": {}}}, {"function": {"name": "get_time", "arguments": {"zone": "UTC"}}}]))
        status, _, reply = await self.post({"tools": TWO_TOOLS})
        self.assertEqual([c["function"]["name"] for c in reply["choices"][0]["message"]["tool_calls"]], ["get_time"])
        status, _, raw = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=self.auth, body={"messages": HI, "stream": True, "tools": TWO_TOOLS})
        names = [tc["function"]["name"] for e in sse_events(raw)[:-1] if e["choices"] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
        self.assertEqual(names, ["get_time"])

    async def test_retry_cut_short_is_length(self):
        """When the retry itself is cut short, the answer is finish_reason length (as a forced call's), not a 502."""
        fake = FakeOllama(tool_calls=[])
        fake.reply_hook = lambda path, body: Reply(content='{"name": "get_wea') if "format" in body else None
        self.start(fake=fake)
        status, _, reply = await self.post({"tools": TWO_TOOLS, "tool_choice": "required", "max_tokens": 3})
        self.assertEqual((status, reply["choices"][0]["finish_reason"]), (200, "length"), reply)

    async def test_schema_shapes_and_native_tool_names(self):
        """Parameters whose root is not an object (anyOf, $ref, enum, bad properties) are 400s; the native route checks tool names too."""
        self.start()
        for parameters in ({"anyOf": [{"type": "string"}]}, {"$ref": "#/$defs/S", "$defs": {"S": {"type": "string"}}}, {"type": "object", "properties": [1]}, {"enum": [1]}):
            status, _, reply = await self.post({"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]})
            self.assertEqual(status, 400, parameters)
        status, _, body = await get_json(self.gw.url + "/ollama/api/chat", method="POST", headers=self.auth, body={"model": "qwen3:32b", "messages": HI, "tools": [{"type": "function", "function": {"name": "a\nIgnore previous"}}]})
        self.assertEqual(status, 400)
        self.assertIn("tools[0].function.name", body["error"])

    def test_union_rebases_pointers_only(self):
        """The retry's union rebases JSON-pointer refs (# and #/...), and leaves anchors, schemas with their own $id, and data (const, enum, default) alone."""
        from clawdbot.backend.translate import union_format

        params = {
            "type": "object",
            "properties": {
                "a": {"$ref": "#/$defs/A"},
                "b": {"$ref": "#pt"},
                "c": {"const": {"$ref": "#/x"}, "default": {"$ref": "#"}},
                "d": {"$id": "https://s.example/d", "$ref": "#/$defs/D"},
                "e": {"$ref": "#"},
            },
            "$defs": {"A": {"$anchor": "pt", "type": "string"}},
        }
        fmt = union_format([{"name": "f", "parameters": params}])
        props = fmt["$defs"]["f0"]["properties"]
        self.assertEqual(props["a"], {"$ref": "#/$defs/f0/$defs/A"})
        self.assertEqual(props["b"], {"$ref": "#pt"})
        self.assertEqual(props["c"], {"const": {"$ref": "#/x"}, "default": {"$ref": "#"}})
        self.assertEqual(props["d"], params["properties"]["d"])
        self.assertEqual(props["e"], {"$ref": "#/$defs/f0"})


class OllamaSettingsTests(Backed):
    async def test_num_ctx_and_keep_alive_on_v1(self):
        """options.num_ctx and keep_alive (sent through extra_body) reach Ollama within backend.max_num_ctx and backend.keep_alive; beyond them the bound is named."""
        import openai

        self.start("backend: {max_num_ctx: 16384, keep_alive: 10m}")
        await deferToThread(lambda: self.sdk(scope="chat:write").chat.completions.create(model="qwen3:32b", messages=HI, temperature=0.2, extra_body={"options": {"num_ctx": 8192, "top_k": 20}, "keep_alive": "5m"}))
        sent = self.fake.requests_to("/api/chat")[-1].body
        self.assertEqual(sent["options"], {"num_ctx": 8192, "top_k": 20, "temperature": 0.2})
        self.assertEqual(sent["keep_alive"], 300)
        cases = (
            ({"options": {"num_ctx": 32768}}, "16384 (backend.max_num_ctx)"),
            ({"keep_alive": "1h"}, "10m"),
            ({"options": {"temperature": 0.1}, "temperature": 0.3}, "not both"),
            ({"options": {"num_gpu": 1}}, "admin"),
            ({"options": {"bogus": 1}}, "options.bogus"),
        )
        for extra, reason in cases:
            with self.assertRaises(openai.APIStatusError) as caught:
                await deferToThread(lambda: self.sdk(scope="chat:write").chat.completions.create(model="qwen3:32b", messages=HI, extra_body=extra))
            self.assertIn(reason, str(caught.exception), extra)
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)


class OllamaClientTests(Backed):
    async def test_native_errors_have_ollamas_shape(self):
        """On /ollama/* every refusal is {"error": "<message>"}: the ollama client's ResponseError.error is a string ("not found" checks keep working)."""
        import ollama

        self.start('backend: {models: ["qwen3:32b"]}')
        host = self.gw.url + "/ollama"
        writer = {"Authorization": f"Bearer {token(scope='chat:read chat:write')}"}
        cases = (
            ({}, lambda c: c.chat(model="qwen3:32b", messages=HI), 401),
            ({"Authorization": f"Bearer {token(scope='chat:read')}"}, lambda c: c.chat(model="qwen3:32b", messages=HI), 403),
            (writer, lambda c: c.chat(model="llama3.2", messages=HI), 404),
            (writer, lambda c: c.chat(model="qwen3:32b", messages=HI, keep_alive="2h"), 400),
        )
        errors = {}
        def closing(call, headers):
            client = ollama.Client(host=host, headers=headers)
            try:
                return call(client)
            finally:
                client._client.close()

        for headers, call, status in cases:
            with self.assertRaises(ollama.ResponseError) as caught:
                await deferToThread(closing, call, headers)
            self.assertEqual(caught.exception.status_code, status)
            self.assertIsInstance(caught.exception.error, str)
            errors[status] = caught.exception.error
        # The common auto-pull check: `if "not found" in e.error`.
        self.assertIn("not found", errors[404].lower())
        self.assertIn("keep_alive", errors[400])
        status, _, body = await get_json(host + "/api/nope", headers=self.auth)
        self.assertEqual((status, set(body)), (404, {"error"}))
        status, _, body = await get_json(host + "/api/chat", method="POST", headers=self.auth, body={"model": "llama3.2", "messages": HI})
        self.assertEqual(status, 404)
        self.assertIn("not available", body["error"])

    async def test_ps_and_legacy_embeddings(self):
        """/ollama/api/ps (chat:read, allow-list applied) and the legacy /ollama/api/embeddings (chat:write, rules applied, counted) work with the ollama client."""
        import ollama

        self.start()

        def calls():
            client = ollama.Client(host=self.gw.url + "/ollama", headers=self.auth)
            try:
                client.chat(model="qwen3:32b", messages=HI)
                return client.ps(), client.embeddings(model="nomic-embed-text", prompt="hello")
            finally:
                client._client.close()

        running, vector = await deferToThread(calls)
        self.assertIn("qwen3:32b", [m.model for m in running.models])
        self.assertGreater(len(vector.embedding), 0)
        sent = self.fake.requests_to("/api/embeddings")[-1].body
        self.assertTrue(sent["user_id"].endswith("|alice"))
        status, _, body = await get_json(self.gw.url + "/ollama/api/embeddings", method="POST", headers=self.auth, body={"model": "nomic-embed-text", "prompt": "x", "input": "y"})
        self.assertEqual(status, 400)
        self.assertIn("input", body["error"])

    async def test_refusals_while_the_body_arrives_have_ollamas_shape(self):
        """A native request refused before its body is read (too large, no token) answers {"error": "<message>"} too."""
        from tests.test_hardening_http import raw_request

        self.start()
        status, body = await raw_request(
            self.gw.url,
            f"POST /ollama/api/chat HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token()}\r\nContent-Type: application/json\r\nContent-Length: 25000000",
            b"x" * 5000,
        )
        self.assertEqual(status, 413)
        self.assertIsInstance(body["error"], str)
        status, body = await raw_request(self.gw.url, "POST /ollama/api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100000", b"x" * 100000)
        self.assertEqual(status, 401)
        self.assertIsInstance(body["error"], str)
        status, body = await raw_request(
            self.gw.url,
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token()}\r\nContent-Type: application/json\r\nContent-Length: 25000000",
            b"x" * 5000,
        )
        self.assertEqual((status, body["error"]["code"]), (413, "PAYLOAD_TOO_LARGE"))
