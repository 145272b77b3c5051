"""
The compatibility suite (issue 14): real client libraries, unchanged and
with their defaults (the settings the README's "Using it from your tools"
names aside), against the gateway in front of the fake Ollama.

The Python clients that share the gateway's test environment run here, in
threads; LlamaIndex and instructor, whose releases need openai 2.x, run in
tests/clients/.venv (tests/clients/py_clients.py), and the Node clients with
C{node} (tests/clients/*.mjs); those print JSON that the tests check.

No client may load a tiktoken encoding: that is a download from the
internet on first use.  The loader is replaced by one that records the
encoding and refuses it, and every test checks that nothing was recorded.
"""

import asyncio
import json
import os
import subprocess
from unittest import mock

import ollama
import tiktoken
import tiktoken.load
from pydantic import BaseModel
from twisted.internet.threads import deferToThread

from testing.fake_ollama import FakeOllama, example_for_schema
from tests.helpers import ROOT, bearer, token
from tests.test_chat import ALL, HI, Backed

CLIENTS = os.path.join(ROOT, "tests", "clients")
CLIENTS_PYTHON = os.path.join(CLIENTS, ".venv", "bin", "python")
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Hangzhou?"}]


class Weather(BaseModel):
    """The weather in one city."""

    city: str
    temperature: float


#: What the fake model answers under Weather's schema.
WEATHER = {"city": "example", "temperature": 1.5}


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def get_time(zone: str) -> str:
    """The time in a time zone."""
    return f"noon in {zone}"


class ClientTestCase(Backed):
    """A gateway in front of a fake Ollama, with tiktoken's downloads refused and checked."""

    timeout = 120

    def setUp(self):
        self.tiktoken_loads = []
        patcher = mock.patch.object(tiktoken.load, "read_file_cached", self._refuse_download)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(lambda: self.assertEqual(self.tiktoken_loads, [], "a client tried to download a tiktoken encoding"))

    def _refuse_download(self, blobpath, expected_hash=None):
        self.tiktoken_loads.append(blobpath)
        raise RuntimeError("tiktoken would download " + blobpath)

    @property
    def base_url(self):
        return self.gw.url + "/v1"

    def chats(self):
        """The bodies the fake Ollama received on C{/api/chat}."""
        return [r.body for r in self.fake.requests_to("/api/chat")]

    async def run_client(self, argv, case):
        """
        Run a client script (C{argv} plus C{case}) with the gateway's URL and
        a token in its environment; returns the JSON object it printed.
        """
        env = dict(os.environ, CLAWDBOT_URL=self.base_url, CLAWDBOT_TOKEN=token(scope=ALL))
        done = await deferToThread(subprocess.run, [*argv, case], cwd=CLIENTS, env=env, capture_output=True, text=True, timeout=90)
        self.assertEqual(done.returncode, 0, done.stderr)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertNotIn("raised", out, out)
        return out


class OpenAIPythonTests(ClientTestCase):
    """The openai SDK (Python)."""

    async def test_chat_and_stream_with_usage(self):
        """A chat completion, and a stream whose last chunk carries usage when include_usage is asked."""
        self.start()
        reply = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK))
        self.assertEqual((reply.choices[0].message.content, reply.choices[0].finish_reason), (self.fake.reply_text, "stop"))
        self.assertGreater(reply.usage.total_tokens, 0)

        def stream():
            return list(self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK, stream=True, stream_options={"include_usage": True}))

        chunks = await deferToThread(stream)
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), self.fake.reply_text)
        self.assertEqual(chunks[-1].choices, [])
        self.assertGreater(chunks[-1].usage.completion_tokens, 0)

    async def test_tools_and_forced_tool_choice(self):
        """A tool call the model chooses; a forced one (named, and required with one tool) held to the function's schema, streamed and not."""
        self.start()
        chose = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL]))
        self.assertEqual(chose.choices[0].message.tool_calls[0].function.name, "get_weather")
        self.assertEqual(chose.choices[0].finish_reason, "tool_calls")

        arguments = example_for_schema(CITY)
        for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
            reply = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK, tools=[WEATHER_TOOL], tool_choice=choice))
            calls = reply.choices[0].message.tool_calls
            self.assertEqual([(c.function.name, json.loads(c.function.arguments)) for c in calls], [("get_weather", arguments)], choice)
            self.assertEqual(reply.choices[0].finish_reason, "tool_calls")
            sent = self.chats()[-1]
            self.assertEqual(sent["format"], CITY)
            self.assertNotIn("tools", sent)

            def stream():
                return [c for c in self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK, tools=[WEATHER_TOOL], tool_choice=choice, stream=True) if c.choices]

            chunks = await deferToThread(stream)
            deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
            self.assertEqual(deltas[0].function.name, "get_weather")
            self.assertTrue(deltas[0].id)
            self.assertEqual(json.loads("".join(d.function.arguments or "" for d in deltas)), arguments)
            self.assertEqual(chunks[-1].choices[0].finish_reason, "tool_calls")

        # "required" with several tools: the tools go to the model, which must call one.
        reply = await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required"))
        self.assertEqual(reply.choices[0].message.tool_calls[0].function.name, "get_weather")
        self.assertEqual([t["function"]["name"] for t in self.chats()[-1]["tools"]], ["get_weather", "get_time"])

    async def test_errors(self):
        """Refusals raise the SDK's own exceptions, with the reason in the message and the field in param."""
        import openai

        self.start()
        with self.assertRaises(openai.BadRequestError) as caught:
            await deferToThread(lambda: self.sdk().chat.completions.create(model="qwen3:32b", messages=ASK, tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}))
        self.assertEqual(caught.exception.body["param"], "tool_choice.function.name")
        self.assertIn("not in 'tools'", str(caught.exception))
        with self.assertRaises(openai.NotFoundError) as caught:
            await deferToThread(lambda: self.sdk().chat.completions.create(model="llama9:1b", messages=ASK))
        self.assertEqual(caught.exception.body["code"], "MODEL_NOT_FOUND")

        def unauthenticated():
            with openai.OpenAI(base_url=self.base_url, api_key="not-a-token") as client:
                return client.models.list()

        with self.assertRaises(openai.AuthenticationError) as caught:
            await deferToThread(unauthenticated)
        self.assertEqual(caught.exception.body["code"], "AUTH_INVALID_TOKEN")


class LangChainTests(ClientTestCase):
    """LangChain's ChatOpenAI and OpenAIEmbeddings (langchain-openai)."""

    def chat_model(self, **settings):
        from langchain_openai import ChatOpenAI

        llm = ChatOpenAI(model="qwen3:32b", base_url=self.base_url, api_key=token(scope=ALL), **settings)
        self.addCleanup(llm.root_client.close)
        return llm

    async def test_bind_tools_with_tool_choice(self):
        """bind_tools with tool_choice=<name> and "required": one call to that tool, streamed and not."""
        self.start()
        for choice in ("get_weather", "required"):
            llm = self.chat_model().bind_tools([get_weather], tool_choice=choice)
            message = await deferToThread(llm.invoke, "What is the weather in Hangzhou?")
            self.assertEqual([(c["name"], c["args"]) for c in message.tool_calls], [("get_weather", {"city": "example"})], choice)
            self.assertEqual(message.response_metadata["finish_reason"], "tool_calls")
            self.assertIn("format", self.chats()[-1])

            def stream():
                whole = None
                for chunk in llm.stream("What is the weather in Hangzhou?"):
                    whole = chunk if whole is None else whole + chunk
                return whole

            whole = await deferToThread(stream)
            self.assertEqual([(c["name"], c["args"]) for c in whole.tool_calls], [("get_weather", {"city": "example"})], choice)

    async def test_required_with_several_tools(self):
        """tool_choice="required" with several tools offers them all; a model that answers without a call is asked once more, and the call comes back."""
        self.start(fake=FakeOllama(tool_calls=[]))
        llm = self.chat_model().bind_tools([get_weather, get_time], tool_choice="required")
        message = await deferToThread(llm.invoke, "What is the weather in Hangzhou?")
        self.assertEqual([(c["name"], c["args"]) for c in message.tool_calls], [("get_weather", {"city": "example"})])
        first, again = self.chats()
        self.assertEqual([t["function"]["name"] for t in first["tools"]], ["get_weather", "get_time"])
        self.assertEqual(len(again["format"]["anyOf"]), 2)

    async def test_structured_output_methods(self):
        """with_structured_output(Model) gives the model with each method: function_calling and json_schema hold the model to the schema, json_mode to JSON."""
        self.start()
        for method in ("function_calling", "json_schema"):
            structured = self.chat_model().with_structured_output(Weather, method=method)
            result = await deferToThread(structured.invoke, "What is the weather in Hangzhou?")
            self.assertEqual(result, Weather(**WEATHER), method)
            sent = self.chats()[-1]
            self.assertEqual((set(sent["format"]["properties"]), sent["format"]["required"]), ({"city", "temperature"}, ["city", "temperature"]), method)
            self.assertNotIn("tools", sent)

    async def test_structured_output_json_mode(self):
        """method="json_mode" asks for JSON (Ollama's format "json"): the model's object is parsed into the model."""
        self.start(fake=FakeOllama(json_reply={"city": "Hangzhou", "temperature": 21.5}))
        structured = self.chat_model().with_structured_output(Weather, method="json_mode")
        result = await deferToThread(structured.invoke, "The weather in Hangzhou, as JSON with city and temperature.")
        self.assertEqual(result, Weather(city="Hangzhou", temperature=21.5))
        self.assertEqual(self.chats()[-1]["format"], "json")

    async def test_streaming(self):
        """Streaming gives the text whole; with stream_usage=True the last chunk carries the usage."""
        self.start()

        def stream(llm):
            chunks = list(llm.stream("hi"))
            whole = chunks[0]
            for chunk in chunks[1:]:
                whole = whole + chunk
            return whole

        whole = await deferToThread(stream, self.chat_model(stream_usage=True))
        self.assertEqual(whole.content, self.fake.reply_text)
        self.assertGreater(whole.usage_metadata["output_tokens"], 0)
        self.assertEqual(whole.usage_metadata["total_tokens"], whole.usage_metadata["input_tokens"] + whole.usage_metadata["output_tokens"])
        plain = await deferToThread(stream, self.chat_model())
        self.assertEqual(plain.content, self.fake.reply_text)
        self.assertIsNone(plain.usage_metadata)

    async def test_embeddings(self):
        """OpenAIEmbeddings(check_embedding_ctx_length=False) sends text and gets vectors."""
        from langchain_openai import OpenAIEmbeddings

        self.start()
        embeddings = OpenAIEmbeddings(model="nomic-embed-text", base_url=self.base_url, api_key=token(scope=ALL), check_embedding_ctx_length=False)
        self.addCleanup(embeddings.client._client.close)
        vectors = await deferToThread(embeddings.embed_documents, ["hello", "world"])
        self.assertEqual([len(v) for v in vectors], [768, 768])
        query = await deferToThread(embeddings.embed_query, "hello")
        self.assertEqual(query, vectors[0])
        self.assertEqual(self.fake.requests_to("/api/embed")[-1].body["input"], ["hello"])

    async def test_embeddings_default_names_the_setting(self):
        """
        With its default, OpenAIEmbeddings sends token ids made by tiktoken:
        the gateway refuses them with a 400 naming check_embedding_ctx_length=False.
        (tiktoken's encoding is a download; a byte-level stand-in takes its place here.)
        """
        import openai
        from langchain_openai import OpenAIEmbeddings

        self.start()
        stand_in = tiktoken.Encoding(name="cl100k_base", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})
        patcher = mock.patch.dict(tiktoken.registry.ENCODINGS, {"cl100k_base": stand_in})
        patcher.start()
        self.addCleanup(patcher.stop)
        embeddings = OpenAIEmbeddings(model="nomic-embed-text", base_url=self.base_url, api_key=token(scope=ALL))
        self.addCleanup(embeddings.client._client.close)
        with self.assertRaises(openai.BadRequestError) as caught:
            await deferToThread(embeddings.embed_documents, ["hello"])
        self.assertIn("check_embedding_ctx_length=False", str(caught.exception))
        self.assertEqual(self.fake.requests_to("/api/embed"), [])


class PydanticAITests(ClientTestCase):
    """pydantic-ai's Agent on an OpenAI-compatible provider."""

    def agent_run(self, prompt, **agent_settings):
        """Run an Agent on the gateway in a fresh event loop; returns its result."""
        from pydantic_ai import Agent
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai_compatible import OpenAICompatibleProvider

        async def run():
            provider = OpenAICompatibleProvider("clawdbot", base_url=self.base_url, api_key=token(scope=ALL))
            try:
                return await Agent(OpenAIChatModel("qwen3:32b", provider=provider), **agent_settings).run(prompt)
            finally:
                await provider.client.close()

        return asyncio.run(run())

    async def test_default_structured_output(self):
        """output_type=Model uses its default ToolOutput (one output tool, tool_choice required): the model comes back."""
        self.start()
        result = await deferToThread(self.agent_run, "What is the weather in Hangzhou?", output_type=Weather)
        self.assertEqual(result.output, Weather(**WEATHER))
        sent = self.chats()[-1]
        self.assertEqual(set(sent["format"]["properties"]), {"city", "temperature"})
        self.assertNotIn("tools", sent)
        self.assertEqual([part.tool_name for part in result.all_messages()[1].parts], ["final_result"])
        self.assertGreater(result.usage.output_tokens, 0)

    async def test_text(self):
        """A plain text run."""
        self.start()
        result = await deferToThread(self.agent_run, "hi")
        self.assertEqual(result.output, self.fake.reply_text)


class OllamaPythonTests(ClientTestCase):
    """The ollama Python client on /ollama."""

    async def test_chat_stream_ps_embeddings_and_errors(self):
        """chat, stream, ps and the legacy embeddings work; a refusal is a ResponseError with a string error and the status."""
        self.start('backend: {models: ["qwen3:32b", "nomic-embed-text"]}')

        def calls():
            client = ollama.Client(host=self.gw.url + "/ollama", headers=bearer(token(scope=ALL)))
            try:
                out = {"chat": client.chat(model="qwen3:32b", messages=HI).message.content}
                out["stream"] = "".join(part.message.content for part in client.chat(model="qwen3:32b", messages=HI, stream=True))
                out["ps"] = [m.model for m in client.ps().models]
                out["embedding"] = len(client.embeddings(model="nomic-embed-text", prompt="hello").embedding)
                try:
                    client.chat(model="llama3.2", messages=HI)
                except ollama.ResponseError as e:
                    out["error"] = (e.status_code, e.error)
                return out
            finally:
                client._client.close()

        out = await deferToThread(calls)
        self.assertEqual((out["chat"], out["stream"]), (self.fake.reply_text, self.fake.reply_text))
        self.assertIn("qwen3:32b", out["ps"])
        self.assertEqual(out["embedding"], 768)
        status, error = out["error"]
        self.assertEqual(status, 404)
        self.assertIsInstance(error, str)
        self.assertIn("not found", error.lower())


class LlamaIndexTests(ClientTestCase):
    """LlamaIndex's OpenAILike (tests/clients/py_clients.py, in tests/clients/.venv)."""

    async def test_defaults_use_legacy_completions(self):
        """With its defaults, complete, stream_complete and chat go to POST /v1/completions (Ollama's /api/generate)."""
        self.start()
        out = await self.run_client([CLIENTS_PYTHON, "py_clients.py"], "complete")
        self.assertEqual(out, {"complete": self.fake.reply_text, "stream": self.fake.reply_text, "chat": self.fake.reply_text, "tiktoken": []})
        self.assertEqual(len(self.fake.requests_to("/api/generate")), 3)
        self.assertEqual(self.chats(), [])

    async def test_chat_model(self):
        """With is_chat_model=True, chat and stream_chat go to the chat route."""
        self.start()
        out = await self.run_client([CLIENTS_PYTHON, "py_clients.py"], "chat")
        self.assertEqual(out, {"chat": self.fake.reply_text, "stream": self.fake.reply_text, "tiktoken": []})
        self.assertEqual(len(self.chats()), 2)

    async def test_structured_predict_and_required_tool(self):
        """structured_predict (tool_choice required, parallel_tool_calls false) gives the model; chat_with_tools(tool_required=True) a call."""
        self.start()
        out = await self.run_client([CLIENTS_PYTHON, "py_clients.py"], "structured")
        self.assertEqual(out["structured"], WEATHER)
        self.assertEqual(out["calls"], [{"name": "get_weather", "arguments": {"city": "example"}}])
        self.assertEqual(out["tiktoken"], [])
        for sent in self.chats():
            self.assertIn("format", sent)
            self.assertNotIn("tools", sent)


class InstructorTests(ClientTestCase):
    """instructor.from_openai in its default mode (tests/clients/py_clients.py, in tests/clients/.venv)."""

    async def test_default_mode_flat_and_nested_models(self):
        """Mode.TOOLS forces the model's function: a flat model and a nested one come back validated."""
        self.start()
        out = await self.run_client([CLIENTS_PYTHON, "py_clients.py"], "instructor")
        self.assertEqual(out["mode"], "TOOLS")
        self.assertEqual(out["weather"], WEATHER)
        self.assertEqual(out["forecast"], {"place": WEATHER, "days": [{"name": "example", "sunny": True}]})
        self.assertEqual(out["tiktoken"], [])
        formats = [sent["format"] for sent in self.chats()]
        self.assertEqual(len(formats), 2)
        self.assertIn("$defs", formats[1])


class NodeOpenAITests(ClientTestCase):
    """The official openai npm package (tests/clients/openai_sdk.mjs)."""

    async def node(self, case):
        return await self.run_client(["node", "openai_sdk.mjs"], case)

    async def test_chat_and_stream(self):
        """A chat completion, and a stream with usage at the end."""
        self.start()
        out = await self.node("chat")
        self.assertEqual((out["text"], out["finish"]), (self.fake.reply_text, "stop"))
        self.assertGreater(out["usage"]["total_tokens"], 0)
        out = await self.node("stream")
        self.assertEqual((out["role"], out["text"], out["finish"]), ("assistant", self.fake.reply_text, "stop"))
        self.assertGreater(out["usage"]["completion_tokens"], 0)

    async def test_tools_and_forced_tool_choice(self):
        """A chosen tool call, and a forced one streamed and not."""
        self.start()
        out = await self.node("tools")
        self.assertEqual(([c["name"] for c in out["calls"]], out["finish"]), (["get_weather"], "tool_calls"))
        out = await self.node("forced")
        expected = [("get_weather", {"city": "example"})]
        self.assertEqual([(c["name"], c["arguments"]) for c in out["calls"]], expected)
        self.assertEqual([(c["name"], c["arguments"]) for c in out["streamed"]["calls"]], expected)
        self.assertEqual((out["finish"], out["streamed"]["finish"]), ("tool_calls", "tool_calls"))

    async def test_errors(self):
        """A refusal raises the SDK's BadRequestError with the reason, status, code and param."""
        self.start()
        out = await self.node("error")
        self.assertEqual((out["error"], out["status"], out["code"], out["param"]), ("BadRequestError", 400, "INVALID_REQUEST", "temperature"))
        self.assertIn("'temperature' must be between 0 and 2", out["message"])


class AISDKTests(ClientTestCase):
    """The AI SDK with @ai-sdk/openai-compatible (tests/clients/ai_sdk.mjs)."""

    async def ai(self, case):
        return await self.run_client(["node", "ai_sdk.mjs"], case)

    async def test_generate_object(self):
        """generateObject with a zod schema: the schema is sent as json_schema and the object comes back."""
        self.start()
        out = await self.ai("object")
        self.assertEqual(out["object"], {"city": "example", "temperature": 1.5, "sunny": True})
        self.assertEqual(set(self.chats()[-1]["format"]["properties"]), {"city", "temperature", "sunny"})
        self.assertGreater(out["usage"]["outputTokens"], 0)

    async def test_stream_text(self):
        """A plain streamText: the text whole, and usage (includeUsage)."""
        self.start()
        out = await self.ai("text")
        self.assertEqual(out["text"], self.fake.reply_text)
        self.assertEqual(out["finish"], "stop")
        self.assertGreater(out["usage"]["outputTokens"], 0)

    async def test_stream_text_with_required_tool(self):
        """streamText with tools and toolChoice "required": the call streams as input deltas and its tool runs."""
        self.start()
        out = await self.ai("tools")
        self.assertEqual(out["calls"], [{"name": "get_weather", "input": {"city": "example"}}])
        self.assertEqual(out["results"], ["sunny in example"])
        self.assertEqual(json.loads("".join(out["deltas"])), {"city": "example"})
        self.assertEqual(out["finish"], "tool-calls")
