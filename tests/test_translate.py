"""
OpenAI <-> Ollama translation, both ways, as pure functions.
"""

import base64
import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from clawdbot.auth.identity import Principal
from clawdbot.config import parse_config
from clawdbot.errors import APIError
from clawdbot.backend.translate import (
    LineSplitter,
    StreamTranslator,
    UpstreamStreamError,
    chat_request,
    chat_response,
    embeddings_request,
    embeddings_response,
    models_response,
    usage,
    with_counts_of,
)
from tests.helpers import BASE_CONFIG, merge_yaml

CONFIG = parse_config(BASE_CONFIG, {})
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def config(extra):
    return parse_config(merge_yaml(BASE_CONFIG, extra), {})


def translate(body, cfg=CONFIG, **kw):
    return chat_request(body, cfg, **kw)[0]


def refused(body, cfg=CONFIG):
    try:
        chat_request(body, cfg)
    except APIError as e:
        return e
    raise AssertionError("accepted")


class RequestTests(SynchronousTestCase):
    def test_minimal_request_gets_default_model(self):
        """A request without a model goes to the configured default (the seed's qwen3:32b)."""
        out = translate({"messages": [{"role": "user", "content": "你好"}]})
        self.assertEqual(out, {"model": "qwen3:32b", "messages": [{"role": "user", "content": "你好"}], "stream": False})

    def test_options_mapping(self):
        """Sampling options, limits, stop, seed and penalties map to Ollama's options."""
        out = translate(
            {
                "model": "qwen3:32b",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 0.7,
                "top_p": 0.9,
                "max_tokens": 100,
                "stop": "END",
                "seed": 42,
                "presence_penalty": 0.5,
                "frequency_penalty": -0.5,
                "stream": True,
            }
        )
        self.assertEqual(
            out["options"],
            {"temperature": 0.7, "top_p": 0.9, "num_predict": 100, "stop": ["END"], "seed": 42, "presence_penalty": 0.5, "frequency_penalty": -0.5},
        )
        self.assertTrue(out["stream"])
        self.assertEqual(translate({"messages": [], "max_completion_tokens": 7, "max_tokens": 9})["options"], {"num_predict": 7})

    def test_audit_fields(self):
        """The gateway adds user_id (the owner key: provider and sub) and session_id to the Ollama body."""
        alice = Principal(sub="alice", issuer="https://idp.example.com")
        out = translate({"messages": []}, principal=alice, session_id="s1")
        self.assertEqual((out["user_id"], out["session_id"]), (alice.key, "s1"))
        self.assertNotEqual(Principal(sub="alice", issuer="https://other.example.com").key, alice.key)

    def test_aliases_and_allow_list(self):
        """Aliases resolve; a model outside the allow-list is MODEL_NOT_FOUND."""
        cfg = config('backend: {models: ["qwen3:32b"], aliases: {gpt-4o: "qwen3:32b", old: "llama2"}}')
        self.assertEqual(translate({"model": "gpt-4o", "messages": []}, cfg)["model"], "qwen3:32b")
        for model in ("llama3", "old"):
            err = refused({"model": model, "messages": []}, cfg)
            self.assertEqual((err.status, err.code), (404, "MODEL_NOT_FOUND"))

    def test_images_from_data_urls(self):
        """image_url data URLs become Ollama images; text parts join into content."""
        out = translate(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
                        ],
                    }
                ]
            }
        )
        # The images stay raw bytes: the handler has them processed off the reactor.
        self.assertEqual(out["messages"], [{"role": "user", "content": "What is this?", "images": [base64.b64decode(PNG)]}])

    def test_unsupported_values_are_400(self):
        """n > 1, remote images, logprobs and unknown parameters are refused, not dropped."""
        cases = [
            {"messages": [], "n": 2},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}]}]},
            {"messages": [], "logprobs": True},
            {"messages": [], "frobnicate": 1},
            {"messages": [], "temperature": "hot"},
            {"messages": [], "temperature": 3},
            {"messages": [], "max_tokens": 0},
            {"messages": [], "stream": "yes"},
            {"messages": [], "tool_choice": "required"},
            {"messages": [], "response_format": {"type": "xml"}},
            {"messages": [], "reasoning_effort": "extreme"},
            {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": "hello"},
            {},
            {"messages": [], "model": 5},
        ]
        for body in cases:
            err = refused(body)
            self.assertEqual((err.status, err.code), (400, "INVALID_REQUEST"), body)
            self.assertTrue(err.details)

    def test_response_format(self):
        """json_object and json_schema become Ollama's format."""
        self.assertEqual(translate({"messages": [], "response_format": {"type": "json_object"}})["format"], "json")
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        out = translate({"messages": [], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        self.assertEqual(out["format"], schema)
        self.assertNotIn("format", translate({"messages": [], "response_format": {"type": "text"}}))

    def test_tools_and_tool_history(self):
        """Tools pass through; assistant tool_calls get object arguments and tool results their tool name."""
        tools = [{"type": "function", "function": {"name": "weather", "description": "d", "parameters": {"type": "object"}}}]
        out = translate(
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                ],
                "tools": tools,
            }
        )
        self.assertEqual(out["tools"], tools)
        self.assertEqual(out["messages"][1]["tool_calls"], [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}])
        self.assertEqual(out["messages"][2], {"role": "tool", "content": "sunny", "tool_name": "weather"})
        self.assertNotIn("tools", translate({"messages": [], "tools": tools, "tool_choice": "none"}))

    def test_reasoning_effort(self):
        """reasoning_effort maps to think: none turns thinking off, the levels on."""
        self.assertIs(translate({"messages": [], "reasoning_effort": "none"})["think"], False)
        self.assertIs(translate({"messages": [], "reasoning_effort": "high"})["think"], True)

    def test_developer_role(self):
        """The developer role is sent as system."""
        self.assertEqual(translate({"messages": [{"role": "developer", "content": "be brief"}]})["messages"][0]["role"], "system")


class ResponseTests(SynchronousTestCase):
    REPLY = {
        "model": "qwen3:32b",
        "created_at": "2026-11-27T10:00:00.123456789Z",
        "message": {"role": "assistant", "content": "Hello!", "thinking": "The user greets me."},
        "done": True,
        "done_reason": "stop",
        "total_duration": 5,
        "prompt_eval_count": 12,
        "eval_count": 3,
    }

    def test_chat_completion(self):
        """A reply becomes chat.completion with reasoning_content, finish_reason and usage."""
        out = chat_response(self.REPLY, "qwen3:32b", created=1000)
        self.assertTrue(out["id"].startswith("chatcmpl-"))
        self.assertEqual(out["object"], "chat.completion")
        self.assertEqual(out["created"], 1000)
        self.assertEqual(out["choices"][0]["message"], {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."})
        self.assertEqual(out["choices"][0]["finish_reason"], "stop")
        self.assertEqual(out["usage"], {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})

    def test_length_and_tool_calls(self):
        """done_reason length gives finish_reason length; tool calls give tool_calls with JSON-string arguments."""
        self.assertEqual(chat_response(dict(self.REPLY, done_reason="length"), "m")["choices"][0]["finish_reason"], "length")
        reply = dict(self.REPLY, message={"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "巴黎"}}}]})
        choice = chat_response(reply, "m")["choices"][0]
        self.assertEqual(choice["finish_reason"], "tool_calls")
        self.assertIsNone(choice["message"]["content"])
        call = choice["message"]["tool_calls"][0]
        self.assertEqual(call["type"], "function")
        self.assertEqual(json.loads(call["function"]["arguments"]), {"city": "巴黎"})
        self.assertTrue(call["id"].startswith("call_"))

    def test_models(self):
        """/api/tags becomes the OpenAI model list, filtered by the allow-list, with aliases."""
        tags = {"models": [{"name": "qwen3:32b", "modified_at": "2026-01-02T03:04:05.123456789+08:00"}, {"name": "llama3:8b", "modified_at": "x"}]}
        out = models_response(tags, config('backend: {models: ["qwen3:32b"], aliases: {gpt-4o: "qwen3:32b"}}'))
        self.assertEqual([m["id"] for m in out["data"]], ["qwen3:32b", "gpt-4o"])
        self.assertEqual(out["data"][0]["object"], "model")
        self.assertGreater(out["data"][0]["created"], 0)

    def test_embeddings(self):
        """Embeddings map both ways; base64 encoding packs little-endian float32."""
        body, opts = embeddings_request({"model": "nomic-embed-text", "input": ["a", "b"], "encoding_format": "base64"}, CONFIG)
        self.assertEqual(body, {"model": "nomic-embed-text", "input": ["a", "b"]})
        out = embeddings_response({"embeddings": [[0.5, -1.0]], "prompt_eval_count": 4}, "nomic-embed-text", opts["encoding_format"])
        self.assertEqual(struct.unpack("<2f", base64.b64decode(out["data"][0]["embedding"])), (0.5, -1.0))
        self.assertEqual(out["usage"], {"prompt_tokens": 4, "total_tokens": 4})
        for bad in ({"input": [1, 2]}, {"input": []}, {"input": "x", "encoding_format": "int8"}):
            self.assertRaises(APIError, embeddings_request, bad, CONFIG)


def ollama_lines(tokens, thinking=(), done_reason="stop"):
    lines = []
    for t in thinking:
        lines.append({"model": "m", "created_at": "t", "message": {"role": "assistant", "content": "", "thinking": t}, "done": False})
    for t in tokens:
        lines.append({"model": "m", "created_at": "t", "message": {"role": "assistant", "content": t}, "done": False})
    lines.append({"model": "m", "created_at": "t", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": done_reason, "prompt_eval_count": 5, "eval_count": len(tokens)})
    return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines)


def parse_sse(data):
    events = []
    for block in data.split(b"\n\n"):
        if block:
            assert block.startswith(b"data: "), block
            payload = block[6:]
            events.append(payload if payload == b"[DONE]" else json.loads(payload))
    return events


def run_stream(raw, cuts, include_usage=False):
    splitter = LineSplitter()
    translator = StreamTranslator("qwen3:32b", include_usage)
    out = b""
    last = 0
    for cut in sorted(set(cuts)) + [len(raw)]:
        for line in splitter.feed(raw[last:cut]):
            out += translator.line(line)
        last = cut
    return translator, parse_sse(out)


class StreamTests(SynchronousTestCase):
    def test_chunks(self):
        """One chunk per Ollama line, the role first, finish_reason last, usage when asked, then [DONE]."""
        translator, events = run_stream(ollama_lines(["Hel", "lo"], thinking=["hmm"]), [], include_usage=True)
        self.assertEqual(events[-1], b"[DONE]")
        chunks = events[:-1]
        self.assertEqual(len(chunks), 5)
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": "", "reasoning_content": "hmm"})
        self.assertEqual(chunks[1]["choices"][0]["delta"], {"content": "Hel"})
        self.assertEqual(chunks[3]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[4]["choices"], [])
        self.assertEqual(chunks[4]["usage"], {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
        self.assertTrue(all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks))
        self.assertEqual("".join(translator.content), "Hello")

    def test_absurd_counts_do_not_cut_the_stream(self):
        """A backend's count beyond 64 bits (which orjson cannot write) ends the stream normally, counted as 0."""
        raw = ollama_lines(["a"]).replace(b'"eval_count": 1', b'"eval_count": 123456789012345678901234')
        translator, events = run_stream(raw, [], include_usage=True)
        self.assertEqual(events[-2]["usage"]["completion_tokens"], 0)
        self.assertEqual(events[-1], b"[DONE]")

    def test_counts_only_sane_integers(self):
        """A backend's count that is not an integer from 0 to 2**53 (a string, a bool, negative, absurd) counts as 0 everywhere."""
        for bad in ("5", -1, True, 2.5, 2**63, None, [3]):
            self.assertEqual(usage({"prompt_eval_count": bad, "eval_count": 4}), {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}, bad)
            self.assertEqual(with_counts_of({"eval_count": bad}, {"eval_count": 2})["eval_count"], 2, bad)

    def test_streamed_tool_calls(self):
        """Streamed tool calls carry an index, an id and JSON-string arguments; finish_reason is tool_calls."""
        lines = [
            {"message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]}, "done": False},
            {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
        ]
        raw = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        _, events = run_stream(raw, [])
        call = events[0]["choices"][0]["delta"]["tool_calls"][0]
        self.assertEqual((call["index"], call["function"]["name"], call["function"]["arguments"]), (0, "weather", '{"city": "Paris"}'))
        self.assertEqual(events[1]["choices"][0]["finish_reason"], "tool_calls")

    def test_error_line(self):
        """An error line from Ollama stops the translation with a curated reason."""
        translator = StreamTranslator("m")
        self.assertRaises(UpstreamStreamError, translator.line, b'{"error":"CUDA out of memory at 0x7f..."}')
        self.assertRaises(UpstreamStreamError, translator.line, b"not json")

    @given(
        st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30),
        st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
    )
    @settings(max_examples=300, deadline=None)
    def test_reassembly_any_split(self, tokens, cuts):
        """However the upstream bytes are split (even inside UTF-8 characters), every token arrives once, in order."""
        raw = ollama_lines(tokens)
        cuts = [c % (len(raw) + 1) for c in cuts]
        translator, events = run_stream(raw, cuts)
        deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        self.assertEqual([d for d in deltas if d], tokens)
        self.assertEqual(events[-1], b"[DONE]")
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
