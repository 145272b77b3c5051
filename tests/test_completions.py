"""
OpenAI's legacy text completions (C{POST /v1/completions}) over Ollama's
C{/api/generate}, driven with the official openai SDK as LlamaIndex's
C{OpenAILike} drives them: plain and streamed, refusals, failures.
"""

import openai
from twisted.internet.threads import deferToThread

from testing.fake_ollama import FakeOllama, ModelSpec, tokenize
from tests.helpers import bearer, get_json, token
from tests.test_chat import Backed, sse_events

CODER = ModelSpec.named("qwen2.5-coder:7b", capabilities=("completion", "tools", "insert"))
PROMPT = "Once upon a time"


class CompletionTests(Backed):
    def complete(self, **kw):
        """C{client.completions.create} on a worker thread (the SDK blocks)."""
        kw.setdefault("model", "qwen3:32b")
        kw.setdefault("prompt", PROMPT)
        return deferToThread(lambda: self.sdk().completions.create(**kw))

    def streamed(self, **kw):
        """Every chunk of a streamed completion, through the SDK."""
        kw.setdefault("model", "qwen3:32b")
        kw.setdefault("prompt", PROMPT)
        return deferToThread(lambda: list(self.sdk().completions.create(stream=True, **kw)))

    async def post(self, body, headers=None):
        return await get_json(self.gw.url + "/v1/completions", method="POST", headers=self.auth if headers is None else headers, body=body)

    def generated(self):
        """The body of the last call that reached Ollama's /api/generate."""
        return self.fake.requests_to("/api/generate")[-1].body

    async def test_plain(self):
        """A text_completion with the reply as its text, usage from Ollama's counts; the prompt goes to /api/generate untemplated by the gateway."""
        self.start()
        result = await self.complete(user="u-42")
        self.assertEqual((result.object, result.model), ("text_completion", "qwen3:32b"))
        self.assertTrue(result.id.startswith("cmpl-"), result.id)
        choice = result.choices[0]
        self.assertEqual((choice.text, choice.index, choice.logprobs, choice.finish_reason), (self.fake.reply_text, 0, None, "stop"))
        self.assertGreater(result.usage.prompt_tokens, 0)
        self.assertEqual(result.usage.completion_tokens, len(tokenize(self.fake.reply_text)))
        self.assertEqual(result.usage.total_tokens, result.usage.prompt_tokens + result.usage.completion_tokens)
        sent = self.generated()
        self.assertEqual((sent["prompt"], sent["stream"]), (PROMPT, False))
        self.assertTrue(sent["user_id"].endswith("|alice"), sent["user_id"])
        for key in ("raw", "template", "system", "user", "options", "suffix"):
            self.assertNotIn(key, sent)
        # A list holding one prompt is that prompt.
        await self.complete(prompt=["Twice upon a time"])
        self.assertEqual(self.generated()["prompt"], "Twice upon a time")

    async def test_streamed_with_usage(self):
        """Streamed: one chunk per Ollama line, finish_reason last, then the usage chunk (no choices), then [DONE]; the others carry usage: null."""
        self.start()
        status, headers, raw = await self.post({"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}})
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        events = sse_events(raw)
        lines = self.fake.requests_to("/api/generate")[-1].lines_sent
        self.assertEqual(len(events), lines + 2)
        self.assertEqual(events[-1], b"[DONE]")
        chunks, last = events[:-2], events[-2]
        self.assertEqual({e["object"] for e in events[:-1]}, {"text_completion"})
        self.assertEqual(len({e["id"] for e in events[:-1]}), 1)
        self.assertTrue(all("usage" in c and c["usage"] is None for c in chunks))
        self.assertEqual([c["choices"][0]["finish_reason"] for c in chunks], [None] * (lines - 1) + ["stop"])
        self.assertEqual("".join(c["choices"][0]["text"] for c in chunks), self.fake.reply_text)
        self.assertEqual(last["choices"], [])
        self.assertGreater(last["usage"]["completion_tokens"], 0)
        self.assertIs(self.generated()["stream"], True)

        sdk_chunks = await self.streamed(stream_options={"include_usage": True})
        self.assertEqual("".join(c.choices[0].text for c in sdk_chunks if c.choices), self.fake.reply_text)
        self.assertEqual(sdk_chunks[-1].choices, [])
        self.assertEqual(sdk_chunks[-1].usage.total_tokens, last["usage"]["total_tokens"])
        self.assertEqual([c.choices[0].finish_reason for c in sdk_chunks if c.choices][-1], "stop")

    async def test_streamed_without_usage(self):
        """Without include_usage the chunks have no usage field and no usage chunk comes."""
        self.start()
        status, _, raw = await self.post({"prompt": PROMPT, "stream": True})
        events = sse_events(raw)
        self.assertEqual(status, 200)
        self.assertEqual(len(events), self.fake.requests_to("/api/generate")[-1].lines_sent + 1)
        self.assertTrue(all("usage" not in e and len(e["choices"]) == 1 for e in events[:-1]))

    async def test_settings_reach_generate(self):
        """suffix, stop, max_tokens and the sampling fields reach /api/generate; a model without insert support is refused by Ollama."""
        self.start(fake=FakeOllama(models=["qwen3:32b", CODER]))
        fim = {"prompt": "def add(a, b):", "suffix": "\n    return total\n"}
        await self.complete(model="qwen2.5-coder:7b", stop=["\n\n", "def "], max_tokens=50, temperature=0.2, seed=7, **fim)
        sent = self.generated()
        self.assertEqual((sent["model"], sent["prompt"], sent["suffix"]), ("qwen2.5-coder:7b", "def add(a, b):", "\n    return total\n"))
        self.assertEqual(sent["options"], {"num_predict": 50, "stop": ["\n\n", "def "], "temperature": 0.2, "seed": 7})
        await self.complete(stop="END", extra_body={"options": {"top_k": 20}})
        self.assertEqual(self.generated()["options"], {"stop": ["END"], "top_k": 20})
        # qwen3's template has no suffix: Ollama refuses fill-in-the-middle.
        with self.assertRaises(openai.BadRequestError) as caught:
            await self.complete(suffix="tail")
        self.assertIn("the model backend refused the request", str(caught.exception))

    async def test_length_finish_reason(self):
        """A reply cut by max_tokens ends with finish_reason length, plain and streamed."""
        self.start()
        cut = "".join(tokenize(self.fake.reply_text)[:3])
        result = await self.complete(max_tokens=3)
        self.assertEqual((result.choices[0].text, result.choices[0].finish_reason), (cut, "length"))
        self.assertEqual(result.usage.completion_tokens, 3)
        chunks = await self.streamed(max_tokens=3)
        self.assertEqual("".join(c.choices[0].text for c in chunks), cut)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")

    async def test_echo(self):
        """echo puts the prompt before the text: in the text, and in the first chunk of a stream."""
        self.start()
        result = await self.complete(echo=True)
        self.assertEqual(result.choices[0].text, PROMPT + self.fake.reply_text)
        chunks = await self.streamed(echo=True)
        self.assertTrue(chunks[0].choices[0].text.startswith(PROMPT), chunks[0])
        self.assertEqual("".join(c.choices[0].text for c in chunks), PROMPT + self.fake.reply_text)
        self.assertEqual(self.generated()["prompt"], PROMPT)

    async def test_thinking_is_not_text(self):
        """A thinking model's thinking (on by default on /api/generate) stays out of the text; think is Ollama's switch."""
        self.start(fake=FakeOllama(think_by_default=True))
        result = await self.complete()
        self.assertEqual(result.choices[0].text, self.fake.reply_text)
        chunks = await self.streamed()
        self.assertEqual("".join(c.choices[0].text for c in chunks), self.fake.reply_text)
        self.assertGreater(len(chunks), len(tokenize(self.fake.reply_text)) + 1)
        await self.complete(extra_body={"think": False})
        self.assertIs(self.generated()["think"], False)

    async def test_refusals(self):
        """What one Ollama call cannot honour is a 400 whose message names the field, and nothing reaches Ollama."""
        self.start()
        cases = (
            ({"prompt": [15339, 1917]}, "'prompt' holds token ids"),
            ({"prompt": [[15339, 1917]]}, "'prompt' holds token ids"),
            ({"prompt": ["one", "two"]}, "'prompt' may hold one text"),
            ({"prompt": ""}, "'prompt' must not be empty"),
            ({"prompt": 5}, "'prompt' must be a string"),
            ({"n": 2}, "'n' must be 1"),
            ({"best_of": 3}, "'best_of' must be 1"),
            ({"logprobs": 1}, "'logprobs' is not supported"),
            ({"logit_bias": {"50256": -100}}, "'logit_bias' is not supported"),
            ({"echo": "yes"}, "'echo' must be true or false"),
            ({"suffix": 3}, "'suffix' must be a string"),
            ({"extra_body": {"messages": []}}, "'messages' is not a supported parameter"),
            ({"extra_body": {"think": "max"}}, "'think' must be"),
        )
        for kw, reason in cases:
            with self.assertRaises(openai.BadRequestError) as caught:
                await self.complete(**kw)
            self.assertIn(reason, caught.exception.body["message"], kw)
            self.assertEqual(caught.exception.body["code"], "INVALID_REQUEST")
            self.assertEqual(caught.exception.body["param"], reason.split("'")[1], kw)
        status, _, reply = await self.post({"model": "qwen3:32b"})
        self.assertEqual((status, reply["error"]["details"]), (400, "'prompt' is required"))
        self.assertEqual(self.fake.requests_to("/api/generate"), [])

    async def test_authentication_and_scope(self):
        """No token is a 401 and a token without chat:write a 403, before anything reaches Ollama; an unknown model is 404."""
        self.start()
        status, _, reply = await self.post({"prompt": PROMPT}, headers={})
        self.assertEqual((status, reply["error"]["code"]), (401, "AUTH_MISSING_TOKEN"))
        status, _, reply = await self.post({"prompt": PROMPT}, headers=bearer(token(scope="chat:read")))
        self.assertEqual((status, reply["error"]["code"]), (403, "AUTH_INSUFFICIENT_SCOPE"))
        self.assertEqual(self.fake.requests_to("/api/generate"), [])
        with self.assertRaises(openai.NotFoundError) as caught:
            await self.complete(model="nope:1b")
        self.assertEqual(caught.exception.body["code"], "MODEL_NOT_FOUND")

    async def test_rate_limited(self):
        """Each call spends a request from the caller's budget."""
        self.start("rate_limit: {requests_per_minute: 1}")
        await self.complete()
        with self.assertRaises(openai.RateLimitError):
            await self.complete()

    async def test_mid_stream_error_and_early_close(self):
        """An error line or a dropped connection mid-stream ends the stream with an error event in the §4 shape, and no [DONE]."""
        self.start()
        for behaviour in ({"fail_mid_stream": 3}, {"close_early": 3}):
            self.fake.behave(times=1, **behaviour)
            status, _, raw = await self.post({"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}})
            events = sse_events(raw)
            self.assertEqual(status, 200)
            self.assertEqual(set(events[-1]), {"error"}, behaviour)
            self.assertEqual(events[-1]["error"]["code"], "UPSTREAM_UNAVAILABLE")
            self.assertEqual(len(events[:-1]), 3)
            self.assertNotIn(b"[DONE]", raw)

    async def test_backend_failure_before_the_stream(self):
        """Ollama failing before the first byte is a 502 JSON error, streamed or not."""
        self.start()
        for stream in (False, True):
            self.fake.behave(times=1, status_error=500)
            status, _, reply = await self.post({"prompt": PROMPT, "stream": stream})
            self.assertEqual((status, reply["error"]["code"]), (502, "UPSTREAM_UNAVAILABLE"))
