"""
A session turn as the model sees it and as it is kept (issue 20): the
turn's images stored and sent again within C{history.image_turns}; the
session's system prompt and temperature; C{finish_on_disconnect} (the reply
runs to its end when the client leaves, and the stopper ends it early);
and the models' capabilities in C{/v1/models}.  Against the fake Ollama,
checking what it received.
"""

import base64
import io
import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from clawdbot.http.chat import Capabilities
from testing.fake_ollama import FakeOllama, _pending_bytes
from tests.helpers import Backed, bearer, get_json, stream_call, token, until

AUTH = bearer(token(scope="chat:read chat:write"))


def png_url(colour):
    """A small PNG of one colour, as a client's data URL."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def with_image(text, colour):
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": png_url(colour)}}]}


def user(text):
    return {"role": "user", "content": text}


class RawClient(Protocol):
    """
    A client on a raw connection that posts one chat request and reads the
    stream, so a test can stop reading or leave whenever it likes.
    """

    def __init__(self, body, paused=False):
        self.body = json.dumps(body).encode()
        self.paused = paused
        self.data = b""
        self.waits = []
        self.closed = Deferred()

    def connectionMade(self):
        self.transport.write(
            (
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"{'Authorization: ' + AUTH['Authorization']}\r\nContent-Length: {len(self.body)}\r\n\r\n"
            ).encode()
            + self.body
        )
        if self.paused:
            self.transport.pauseProducing()

    def events(self, count):
        """A Deferred firing once C{count} SSE events arrived."""
        d = Deferred()
        self.waits.append((count, d))
        self.dataReceived(b"")
        return d

    def dataReceived(self, data):
        self.data += data
        for wait in list(self.waits):
            if self.data.count(b"data: ") >= wait[0]:
                self.waits.remove(wait)
                wait[1].callback(None)

    def connectionLost(self, reason):
        self.closed.callback(None)


class Turns(Backed):
    timeout = 60

    async def session(self, **settings):
        status, _, session = await get_json(self.gw.url + "/v1/sessions", method="POST", headers=AUTH, body={"title": "t"})
        self.assertEqual(status, 201, session)
        if settings:
            await self.gw.parts.history.store.update(session["id"], **settings)
        return session["id"]

    async def turn(self, sid, messages, **extra):
        return await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=AUTH, body={"session_id": sid, "messages": messages, **extra})

    async def stored(self, sid):
        status, _, session = await get_json(self.gw.url + f"/v1/sessions/{sid}", headers=AUTH)
        self.assertEqual(status, 200, session)
        return session

    def sent(self):
        """The messages of the last call the fake received."""
        return self.fake.requests_to("/api/chat")[-1].body["messages"]

    async def connect(self, body, paused=False):
        client = RawClient(body, paused)
        host, port = self.gw.url.split("//")[1].split(":")
        await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), client)
        return client

    def chat_requests(self):
        return [r for r in self.gw.parts.runtime.inflight if r.path == b"/v1/chat/completions"]

    async def leave(self, client):
        """Close the client's connection; return once the gateway has seen it go."""
        (request,) = self.chat_requests()
        client.transport.loseConnection()
        await client.closed
        await until(lambda: request.gone, what="the gateway seeing the client leave")


class ImageTests(Turns):
    async def test_image_stored_and_shown(self):
        """The turn's image is stored as the gateway re-encoded it (what the model got) and comes back in GET as an image part."""
        self.start()
        sid = await self.session()
        status, _, _ = await self.turn(sid, [with_image("what is this?", "red")])
        self.assertEqual(status, 200)
        sent = self.sent()[-1]
        self.assertEqual(len(sent["images"]), 1)
        session = await self.stored(sid)
        first = session["messages"][0]
        self.assertEqual(
            first["content"],
            [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + sent["images"][0]}}],
        )
        self.assertEqual(session["messages"][1]["content"], self.fake.reply_text)

    async def test_images_sent_again_within_image_turns(self):
        """Stored images go back to the model with the last image_turns user turns of the context; older ones as text only."""
        self.start("history: {image_turns: 2}")
        sid = await self.session()
        await self.turn(sid, [with_image("one", "red")])
        red = self.sent()[-1]["images"]
        await self.turn(sid, [with_image("two", "blue")])
        blue = self.sent()[-1]["images"]
        self.assertNotEqual(red, blue)
        await self.turn(sid, [user("three")])
        self.assertEqual([m.get("images") for m in self.sent()], [red, None, blue, None, None])
        await self.turn(sid, [user("four")])
        # "one" is now the third user turn back: its image stays behind.
        self.assertEqual([m["content"] for m in self.sent() if m["role"] == "user"], ["one", "two", "three", "four"])
        self.assertEqual([m.get("images") for m in self.sent()], [None, None, blue, None, None, None, None])

    async def test_image_turns_zero_never_resends(self):
        """With image_turns 0, stored images never go back to the model (they stay stored)."""
        self.start("history: {image_turns: 0}")
        sid = await self.session()
        await self.turn(sid, [with_image("one", "red")])
        await self.turn(sid, [user("two")])
        self.assertEqual([m.get("images") for m in self.sent()], [None, None, None])
        self.assertIsInstance((await self.stored(sid))["messages"][0]["content"], list)

    async def test_quota_counts_image_bytes(self):
        """The stored-bytes cap per request counts the images: a short text passes alone and is refused with its image."""
        self.start("history: {max_bytes_per_request: 300}")
        sid = await self.session()
        status, _, body = await self.turn(sid, [with_image("hi", "green")])
        self.assertEqual(status, 413, body)
        self.assertEqual(body["error"]["code"], "PAYLOAD_TOO_LARGE")
        self.assertEqual((await self.stored(sid))["messages"], [])
        status, _, _ = await self.turn(sid, [user("hi")])
        self.assertEqual(status, 200)


class SettingsTests(Turns):
    async def test_system_prompt_first_and_not_stored(self):
        """The session's system prompt goes first, before the stored context, and is never stored."""
        self.start()
        sid = await self.session(system_prompt="Answer in French.")
        await self.turn(sid, [user("hi")])
        await self.turn(sid, [user("again")])
        self.assertEqual(
            [(m["role"], m["content"]) for m in self.sent()],
            [("system", "Answer in French."), ("user", "hi"), ("assistant", self.fake.reply_text), ("user", "again")],
        )
        session = await self.stored(sid)
        self.assertEqual([m["role"] for m in session["messages"]], ["user", "assistant", "user", "assistant"])

    async def test_no_system_prompt_no_system_message(self):
        """Without a system prompt nothing is added."""
        self.start()
        sid = await self.session()
        await self.turn(sid, [user("hi")])
        self.assertEqual([m["role"] for m in self.sent()], ["user"])
        self.assertNotIn("temperature", self.fake.requests_to("/api/chat")[-1].body.get("options", {}))

    async def test_temperature_unless_the_request_sets_one(self):
        """The session's temperature applies when the request sets none (as temperature or options.temperature)."""
        self.start()
        sid = await self.session(temperature=0.3)
        await self.turn(sid, [user("a")])
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["options"]["temperature"], 0.3)
        await self.turn(sid, [user("b")], temperature=1.5)
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["options"]["temperature"], 1.5)
        await self.turn(sid, [user("c")], options={"temperature": 0.9})
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["options"]["temperature"], 0.9)
        await self.turn(sid, [user("d")], max_tokens=50)
        self.assertEqual(self.fake.requests_to("/api/chat")[-1].body["options"], {"temperature": 0.3, "num_predict": 50})


class DisconnectTests(Turns):
    async def test_reply_finishes_after_the_client_leaves(self):
        """
        With finish_on_disconnect the reply runs on when the client leaves:
        stored complete, `replying` while it runs, and the request accounted
        at the end with the reply's real counts.
        """
        self.start()
        reference = await self.session()
        _, _, plain = await self.turn(reference, [user("hi")])
        sid = await self.session()
        self.fake.hold(after=3, times=1)
        client = await self.connect({"session_id": sid, "messages": [user("hi")], "stream": True, "finish_on_disconnect": True})
        await client.events(2)
        await self.leave(client)
        exchange = self.fake.requests_to("/api/chat")[-1]
        self.assertEqual(exchange.outcome, "pending")
        during = await self.stored(sid)
        self.assertEqual(during["messages"], [])
        self.assertIs(during["replying"], True)
        self.assertNotIn('"client_gone"', self.access_text())
        self.fake.release()
        self.assertEqual(await exchange.when_closed(), "completed")
        await until(lambda: '"client_gone"' in self.access_text(), what="the access log line")
        after = await self.stored(sid)
        self.assertEqual(
            [(m["role"], m["content"], m["incomplete"]) for m in after["messages"]],
            [("user", "hi", False), ("assistant", self.fake.reply_text, False)],
        )
        self.assertIs(after["replying"], False)
        line = [entry for entry in self.access_lines() if entry.get("client_gone")][-1]
        self.assertEqual((line["session"], line["tokens"]), (sid, plain["usage"]["total_tokens"]))

    async def test_paused_client_leaves(self):
        """A client that stopped reading (the backend read paused) and then left: the read resumes and the whole reply is stored."""
        big = " ".join(["x" * 20000] * 500)  # about 10 MB of reply
        self.start("backend: {idle_timeout: 3s}", fake=FakeOllama(reply_text=big))
        sid = await self.session()
        client = await self.connect({"session_id": sid, "messages": [user("hi")], "stream": True, "finish_on_disconnect": True}, paused=True)
        await until(lambda: self.chat_requests(), what="the request arriving")
        (request,) = self.chat_requests()
        # The client's connection is full: the gateway paused its read from the backend.
        await until(lambda: request.channel.transport.producerPaused, what="the backend read pausing")
        self.assertGreater(sum(_pending_bytes(p.transport) for p in self.fake.factory.protocols), 0)
        await self.leave(client)
        await until(lambda: not self.gw.parts.history.busy(sid), what="the turn ending")
        reply = (await self.gw.parts.history.store.context(sid, 2))[-1]
        self.assertEqual((reply.role, len(reply.content), reply.incomplete), ("assistant", len(big), False))

    async def test_drain_stops_a_reply_whose_client_left(self):
        """A shutdown drain waits for a reply that outlived its client, then stops it at the deadline: kept, marked incomplete."""
        self.start()
        sid = await self.session()
        self.fake.hold(after=3, times=1)
        client = await self.connect({"session_id": sid, "messages": [user("hi")], "stream": True, "finish_on_disconnect": True})
        await client.events(2)
        await self.leave(client)
        runtime = self.gw.parts.runtime
        # Still counted in flight: the drain waits for it.
        self.assertEqual(len(self.chat_requests()), 1)
        await runtime.drain(0.2)
        await until(lambda: not self.gw.parts.history.busy(sid), what="the turn ending")
        reply = (await self.gw.parts.history.store.context(sid, 2))[-1]
        self.assertEqual((reply.role, reply.incomplete), ("assistant", True))
        self.assertTrue(reply.content)
        self.fake.release()

    async def test_stop_ends_a_detached_reply_incomplete(self):
        """The stopper ends a reply whose client has left: the backend call is dropped, what was said is stored incomplete."""
        self.start()
        sid = await self.session()
        self.fake.hold(after=3, times=1)
        client = await self.connect({"session_id": sid, "messages": [user("hi")], "stream": True, "finish_on_disconnect": True})
        await client.events(2)
        await self.leave(client)
        exchange = self.fake.requests_to("/api/chat")[-1]
        status, _, _ = await get_json(self.gw.url + f"/v1/sessions/{sid}/stop", method="POST", headers=AUTH, body={})
        self.assertEqual(status, 204)
        self.assertEqual(await exchange.when_closed(), "client_disconnected")
        await until(lambda: not self.gw.parts.history.busy(sid), what="the turn ending")
        messages = (await self.stored(sid))["messages"]
        self.assertEqual([(m["role"], m["incomplete"]) for m in messages], [("user", False), ("assistant", True)])
        self.assertTrue(self.fake.reply_text.startswith(messages[1]["content"]))
        self.assertGreater(len(messages[1]["content"]), 0)
        self.assertNotIn(sid, self.gw.parts.history.stoppers)
        self.assertFalse(self.gw.parts.history.stop(sid))

    async def test_stop_while_listening(self):
        """A listening client whose reply is stopped hears the end ([DONE], no finish_reason); the reply is stored incomplete."""
        self.start()
        sid = await self.session()
        self.fake.hold(after=3, times=1)
        streamed = stream_call(self.gw.url + "/v1/chat/completions", {"session_id": sid, "messages": [user("hi")], "stream": True}, AUTH)
        await streamed.when_seen(b"data: ", 2)
        self.assertTrue(self.gw.parts.history.stop(sid))
        status, raw = await streamed.done
        self.assertEqual(status, 200)
        self.assertTrue(raw.endswith(b"data: [DONE]\n\n"), raw[-200:])
        self.assertNotIn(b'"finish_reason":"', raw)
        messages = (await self.stored(sid))["messages"]
        self.assertEqual([(m["role"], m["incomplete"]) for m in messages], [("user", False), ("assistant", True)])

    async def test_stop_before_the_reply_began(self):
        """A turn stopped before Ollama answered is a clear 400 and stores nothing."""
        self.start()
        sid = await self.session()
        self.fake.hold(times=1)
        pending = ensureDeferred(get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=AUTH, body={"session_id": sid, "messages": [user("hi")]}))
        await until(lambda: self.fake.held, what="the call reaching the fake")
        self.assertTrue(self.gw.parts.history.stop(sid))
        status, _, body = await pending
        self.assertEqual(status, 400)
        self.assertIn("stopped", body["error"]["details"])
        self.assertEqual((await self.stored(sid))["messages"], [])

    async def test_without_the_field_a_disconnect_stops_the_reply(self):
        """Without finish_on_disconnect a client that leaves stops the reply, stored incomplete, as before."""
        self.start()
        sid = await self.session()
        self.fake.hold(after=3, times=1)
        client = await self.connect({"session_id": sid, "messages": [user("hi")], "stream": True})
        await client.events(2)
        exchange = self.fake.requests_to("/api/chat")[-1]
        client.transport.loseConnection()
        self.assertEqual(await exchange.when_closed(), "client_disconnected")
        await until(lambda: not self.gw.parts.history.busy(sid), what="the turn ending")
        messages = (await self.stored(sid))["messages"]
        self.assertEqual([(m["role"], m["incomplete"]) for m in messages], [("user", False), ("assistant", True)])

    async def test_field_refused_when_wrong(self):
        """finish_on_disconnect is a boolean, and only with a session_id."""
        self.start()
        sid = await self.session()
        for body in (
            {"messages": [user("hi")], "finish_on_disconnect": True},
            {"session_id": sid, "messages": [user("hi")], "finish_on_disconnect": "yes"},
            {"session_id": sid, "messages": [user("hi")], "finish_on_disconnect": 1},
        ):
            status, _, answer = await get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=AUTH, body=body)
            self.assertEqual((status, answer["error"]["code"]), (400, "INVALID_REQUEST"), body)
            self.assertIn("finish_on_disconnect", answer["error"]["details"])
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        status, _, _ = await self.turn(sid, [user("hi")], finish_on_disconnect=True)
        self.assertEqual(status, 200)
        self.assertEqual(len((await self.stored(sid))["messages"]), 2)


class CapabilityTests(Turns):
    async def models(self, path="/v1/models"):
        status, _, body = await get_json(self.gw.url + path, headers=AUTH)
        self.assertEqual(status, 200, body)
        return body

    async def test_capabilities_listed_and_cached(self):
        """Each model carries Ollama's capabilities (an alias its target's); /api/show is asked once per model."""
        self.start('backend: {aliases: {gpt-4o: "qwen3:32b"}}')
        listed = {m["id"]: m.get("capabilities") for m in (await self.models())["data"]}
        self.assertEqual(
            listed,
            {"qwen3:32b": ["completion", "tools", "thinking"], "nomic-embed-text:latest": ["embedding"], "gpt-4o": ["completion", "tools", "thinking"]},
        )
        await self.models()
        one = await self.models("/v1/models/nomic-embed-text:latest")
        self.assertEqual(one["capabilities"], ["embedding"])
        alias = await self.models("/v1/models/gpt-4o")
        self.assertEqual(alias["capabilities"], ["completion", "tools", "thinking"])
        shown = sorted(r.body["model"] for r in self.fake.requests_to("/api/show"))
        self.assertEqual(shown, ["nomic-embed-text:latest", "qwen3:32b"])

    async def test_show_failing_leaves_the_field_out(self):
        """
        When /api/show fails the list is still served, without capabilities;
        the failed model is not asked again at once (each list would cost a
        backend call per model), but after Capabilities.RETRY_AFTER.
        """
        self.patch(Capabilities, "RETRY_AFTER", 0.5)
        self.start()
        self.fake.behave(status_error=500, paths=("/api/show",))
        body = await self.models()
        self.assertEqual(sorted(m["id"] for m in body["data"]), ["nomic-embed-text:latest", "qwen3:32b"])
        self.assertTrue(all("capabilities" not in m for m in body["data"]), body)
        shows = len(self.fake.requests_to("/api/show"))
        self.assertEqual(shows, 2)
        self.assertNotIn("capabilities", await self.models("/v1/models/qwen3:32b"))
        await self.models()
        self.assertEqual(len(self.fake.requests_to("/api/show")), shows)
        self.fake.behave()
        await deferLater(reactor, 0.6, lambda: None)
        body = await self.models()
        self.assertEqual({m["id"]: m["capabilities"] for m in body["data"]}["qwen3:32b"], ["completion", "tools", "thinking"])
