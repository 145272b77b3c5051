"""
A fair share of one backend (issue 16): the backend's slots go to the
principal who has had the least weighted service, a per-principal cap, the
queue position a waiting call is told, and the wait measured per class.
The queue is driven directly on a Clock (no sockets, no sleeps); one test
goes through the gateway.
"""

import collections

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clawdbot.backend.ollama import Share, Slots
from testing.fake_ollama import FakeOllama
from tests.helpers import bearer, get_json, token, when_queued
from tests.test_chat import HI, Backed


class Queue:
    """A Slots under test: calls that wait, and a record of who got each slot."""

    def __init__(self, limit, per_user=0, max_queue=10_000):
        self.clock = Clock()
        self.slots = Slots(self.clock)
        self.limit, self.per_user, self.max_queue = limit, per_user, max_queue
        self.holding = []  # (share) in grant order, still held
        self.granted = []  # keys, in grant order

    def call(self, share):
        d = Deferred.fromCoroutine(self.slots.acquire(self.limit, self.max_queue, 3600, share, self.per_user))

        def got(_):
            self.holding.append(share)
            self.granted.append(share.key)

        d.addCallback(got)
        return d

    def finish_one(self):
        """The oldest call still holding a slot ends."""
        share = self.holding.pop(0)
        self.slots.release(self.limit, share, self.per_user)
        return share


class FairQueueTests(SynchronousTestCase):
    def test_a_single_call_does_not_wait_behind_a_crowd(self):
        """Two slots; A opens 20 slow calls, then B sends one: B's call gets the very next slot that frees."""
        q = Queue(limit=2)
        a, b = Share("a"), Share("b")
        for _ in range(20):
            q.call(a)
        q.call(b)
        self.assertEqual(q.granted, ["a", "a"])
        q.finish_one()
        self.assertEqual(q.granted[-1], "b")

    def test_equal_shares_when_both_saturate(self):
        """A and B both keep the queue full: over a long run each gets half the slots (within 10%)."""
        q = Queue(limit=2)
        a, b = Share("a"), Share("b")
        for _ in range(300):
            q.call(a)
        for _ in range(300):
            q.call(b)
        for _ in range(400):
            q.finish_one()
        counts = collections.Counter(q.granted)
        self.assertLessEqual(abs(counts["a"] - counts["b"]), 0.1 * len(q.granted), counts)

    def test_weights(self):
        """Weights 2, 1 and 0.5: while all saturate, slots go 4:2:1 (each within 10% of its share)."""
        q = Queue(limit=3)
        shares = {"staff": Share("s", 2.0, "staff"), "user": Share("u", 1.0), "batch": Share("b", 0.5, "batch")}
        for _ in range(500):
            for share in shares.values():
                q.call(share)
        for _ in range(700):
            q.finish_one()
        counts = collections.Counter(q.granted)
        total = sum(counts.values())
        for key, part in (("s", 4 / 7), ("u", 2 / 7), ("b", 1 / 7)):
            self.assertLessEqual(abs(counts[key] / total - part), 0.1 * part, counts)

    def test_idle_time_is_not_banked(self):
        """B idle while A used the backend alone does not come back owed 100 slots: it gets its share from then on."""
        q = Queue(limit=1)
        a, b = Share("a"), Share("b")
        for _ in range(101):
            q.call(a)
        for _ in range(100):
            q.finish_one()
        for _ in range(20):
            q.call(b)
        for _ in range(20):
            q.call(a)
        q.granted.clear()
        for _ in range(20):
            q.finish_one()
        counts = collections.Counter(q.granted)
        self.assertLessEqual(abs(counts["a"] - counts["b"]), 2, counts)

    def test_per_user_cap(self):
        """With per_user 1, A holds one slot however many are free; its next call waits, others' do not."""
        q = Queue(limit=3, per_user=1)
        a, b = Share("a"), Share("b")
        second = [q.call(a), q.call(a)][1]
        self.assertEqual(q.granted, ["a"])
        self.assertNoResult(second)
        q.call(b)
        self.assertEqual(q.granted, ["a", "b"])
        q.finish_one()  # A's first ends: its second starts
        self.assertEqual(q.granted, ["a", "b", "a"])
        self.assertEqual(q.slots.held["a"], 1)

    def test_queue_position_and_wait(self):
        """A call that waits is told, when it leaves the queue, where it stood (1 = next) and how long it waited; a wait that ends in a 503 is told too."""
        q = Queue(limit=1)
        told = []
        a = Share("a")
        b = Share("b", waited=lambda seconds, position, served: told.append((seconds, position, served)))
        for _ in range(5):
            q.call(a)
        q.call(b)
        q.clock.advance(2.5)
        q.finish_one()
        self.assertEqual(told, [(2.5, 1, True)])  # ahead of A's four waiting calls
        late = Queue(limit=1)
        late.call(a)
        d = Deferred.fromCoroutine(late.slots.acquire(1, 10, 3, b))
        late.clock.advance(3)
        self.failureResultOf(d)
        self.assertEqual(told[-1], (3, 1, False))

    def test_position_is_the_place_in_the_order_served(self):
        """The position a call is told is its place in the order the queue then serves in: a principal's later calls stand behind its earlier ones, weighted."""
        q = Queue(limit=1)
        told = []
        q.call(Share("x"))
        slow = Share("slow", 0.5)
        for _ in range(2):
            q.call(slow)
        q.call(Share("c"))
        q.call(Share("d"))
        q.call(Share("e", waited=lambda seconds, position, served: told.append(position)))
        while q.holding:
            q.finish_one()
        self.assertEqual(q.granted[1:], ["slow", "c", "d", "e", "slow"])
        self.assertEqual(told, [4])

    def test_no_credit_from_holding_a_long_call(self):
        """A principal holding one long call while another is served 100 times does not come back owed a burst."""
        q = Queue(limit=2)
        mallory, steady = Share("mallory"), Share("steady")
        q.call(mallory)  # held throughout
        long_call = q.holding.pop(0)
        for _ in range(100):
            q.call(steady)
            q.finish_one()
        for _ in range(60):
            q.call(mallory)
        for _ in range(20):
            q.call(steady)
        q.granted.clear()
        for _ in range(30):
            q.finish_one()
        counts = collections.Counter(q.granted)
        self.assertLessEqual(abs(counts["mallory"] - counts["steady"]), 3, counts)
        q.slots.release(q.limit, long_call)

    def test_a_changing_weight_moves_nobody_else(self):
        """One principal calling with weights 100 and 0.01 (two tokens) changes only its own place: two newcomers after it still share evenly."""
        q = Queue(limit=4)
        for _ in range(3):
            q.call(Share("p", 100.0, "vip"))
        q.call(Share("p", 0.01, "batch"))
        for _ in range(30):
            q.call(Share("other"))
            q.call(Share("z"))
        q.granted.clear()
        for _ in range(20):
            q.finish_one()
        counts = collections.Counter(q.granted)
        self.assertLessEqual(abs(counts["other"] - counts["z"]), 1, counts)

    def test_a_raised_limit_serves_waiting_calls(self):
        """After a reload lifts the per-user cap (or raises max_connections), the next call hands the free slots out instead of waiting behind them."""
        q = Queue(limit=4, per_user=1)
        a, b = Share("a"), Share("b")
        waiting = [q.call(a) for _ in range(4)][1:]
        q.per_user = 0
        mine = q.call(b)
        self.successResultOf(mine)
        for d in waiting[:2]:
            self.successResultOf(d)
        self.assertEqual(q.slots.active, 4)

    def test_weights_hold_for_one_call_at_a_time(self):
        """A principal re-calling as soon as each call ends still gets its weight's share against a backlogged one (what it used is owed while idle)."""
        q = Queue(limit=1)
        staff, batch = Share("staff", 10.0, "staff"), Share("batch", 0.1, "batch")
        for _ in range(400):
            q.call(staff)
        q.call(batch)
        for _ in range(300):
            share = q.finish_one()
            if share.key == "batch":
                q.call(batch)  # straight back in
        counts = collections.Counter(q.granted)
        self.assertLessEqual(counts["batch"], 0.02 * len(q.granted), counts)
        self.assertGreater(counts["batch"], 0)

    def test_bookkeeping_ends_with_the_calls(self):
        """Nothing is kept for principals with no call held or waiting (the table cannot grow without end)."""
        q = Queue(limit=2)
        for key in "abcdef":
            q.call(Share(key))
        while q.holding:
            q.finish_one()
        self.assertEqual((q.slots.active, q.slots.waiting, dict(q.slots.held)), (0, [], {}))
        # What idle principals still owe is kept, but bounded however many there are.
        from clawdbot.backend.ollama import MAX_IDLE

        for n in range(3 * MAX_IDLE):
            q.call(Share(f"p{n}"))
            q.finish_one()
        self.assertLessEqual(len(q.slots.finish), MAX_IDLE + 1)
        self.assertEqual(set(q.slots.finish), q.slots.idle)


class GatewayFairShareTests(Backed):
    async def test_queue_position_header_and_wait_metric(self):
        """Through the gateway: a call that waited carries x-clawdbot-queue-position; its wait is in clawdbot_queue_wait_seconds under its class."""
        self.start("max_connections: 1\nlimits: {fair_share: {weights: {staff: 2}}}", fake=FakeOllama())
        self.fake.hold()
        hog = bearer(token(sub="hog", scope="chat:write"))
        staff = bearer(token(sub="ann", scope="chat:write staff"))
        first = ensureDeferred(get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=hog, body={"messages": HI}))
        await self.fake.when_requests(1, "/api/chat")
        queued = when_queued(self, self.gw.parts)
        second = ensureDeferred(get_json(self.gw.url + "/v1/chat/completions", method="POST", headers=staff, body={"messages": HI}))
        await queued
        self.fake.release()
        status, headers, _ = await first
        self.assertEqual((status, headers.getRawHeaders("x-clawdbot-queue-position")), (200, None))
        await self.fake.when_requests(2, "/api/chat")
        self.fake.release()
        status, headers, _ = await second
        self.assertEqual((status, headers.getRawHeaders("x-clawdbot-queue-position")), (200, ["1"]))
        metrics = self.gw.parts.metrics.render().decode()
        self.assertIn('clawdbot_queue_wait_seconds_count{class="staff"} 1.0', metrics)


class ModelLimitTests(Backed):
    async def test_a_capped_model_cannot_take_every_slot(self):
        """
        backend.model_limits caps a model's calls at once, on every route
        that names it (chat plain and streamed, native, through an alias),
        while other models keep the remaining slots; the per-model gauges
        show it.
        """
        from tests.helpers import until

        self.start('max_connections: 4\nbackend: {aliases: {big: "qwen3:32b"}, model_limits: {big: {max_connections: 1}}}', fake=FakeOllama())
        self.fake.hold(paths=("/api/chat",))
        url = self.gw.url
        auth = bearer(token(scope="chat:read chat:write"))

        def chat(model, **extra):
            return ensureDeferred(get_json(url + "/v1/chat/completions", method="POST", headers=auth, body=dict({"model": model, "messages": HI}, **extra)))

        first = chat("qwen3:32b")
        await self.fake.when_requests(1, "/api/chat")
        capped = self.gw.parts.ollama.model_slots["qwen3:32b"]
        waiting = [chat("big"), chat("qwen3:32b", stream=True), ensureDeferred(get_json(url + "/ollama/api/chat", method="POST", headers=auth, body={"model": "qwen3:32b", "messages": HI, "stream": False}))]
        await until(lambda: len(capped.waiting) == 3, what="three calls waiting for the capped model")
        # Another model still has slots: embeddings go through while the 32b waits.
        status, _, _ = await get_json(url + "/v1/embeddings", method="POST", headers=auth, body={"model": "nomic-embed-text", "input": "x"})
        self.assertEqual(status, 200)
        metrics = self.gw.parts.metrics.render().decode()
        self.assertIn('clawdbot_model_active{model="qwen3:32b"} 1.0', metrics)
        self.assertIn('clawdbot_model_queue_depth{model="qwen3:32b"} 3.0', metrics)
        self.assertIn('clawdbot_model_tokens_total{direction="prompt",model="other"}', metrics)  # the embeddings: an uncapped model
        self.assertEqual(len(self.fake.requests_to("/api/chat")), 1)
        for n in range(2, 5):
            self.fake.release()
            await self.fake.when_requests(n, "/api/chat")
        self.fake.release()
        for d in [first, *waiting]:
            self.assertEqual((await d)[0], 200)
        self.assertEqual((capped.active, capped.waiting, self.gw.parts.ollama.slots.active), (0, [], 0))
        metrics = self.gw.parts.metrics.render().decode()
        self.assertIn('clawdbot_model_time_to_first_token_seconds_count{model="qwen3:32b"} 1.0', metrics)
        self.assertIn('clawdbot_model_tokens_total{direction="completion",model="qwen3:32b"}', metrics)


class ModelAccessTests(Backed):
    async def test_rules_apply_wherever_a_model_is_named(self):
        """
        backend.model_access: interns may use the embedding model only (named
        through an alias in the rule); admins everything; anyone else, every
        model. Chat, streaming, completions, embeddings, native calls,
        /v1/models, /v1/models/{id} and /ollama/api/tags all follow it.
        """
        self.start(
            'backend: {aliases: {emb: "nomic-embed-text:latest"}, model_access: [{team: interns, models: [emb]}, {scope: admin, models: ["*"]}]}',
            fake=FakeOllama(),
        )
        url = self.gw.url
        intern = bearer(token(sub="ian", scope="chat:read chat:write", teams=["interns"]))
        boss = bearer(token(sub="bo", scope="chat:read chat:write admin", teams=["interns"]))
        other = bearer(token(sub="oz", scope="chat:read chat:write"))

        def post(path, headers, body):
            return get_json(url + path, method="POST", headers=headers, body=body)

        refused = (
            ("/v1/chat/completions", {"model": "qwen3:32b", "messages": HI}),
            ("/v1/chat/completions", {"messages": HI, "stream": True}),  # the default model
            ("/v1/completions", {"model": "qwen3:32b", "prompt": "x"}),
            ("/v1/embeddings", {"model": "qwen3:32b", "input": "x"}),
        )
        for path, body in refused:
            status, _, reply = await post(path, intern, body)
            self.assertEqual((status, reply["error"]["code"]), (403, "MODEL_NOT_ALLOWED"), (path, body))
        status, _, reply = await post("/ollama/api/chat", intern, {"model": "qwen3:32b", "messages": HI, "stream": False})
        self.assertEqual(status, 403)
        self.assertIsInstance(reply["error"], str)
        self.assertEqual(self.fake.requests_to("/api/chat"), [])
        for name in ("emb", "nomic-embed-text:latest"):
            status, _, _ = await post("/v1/embeddings", intern, {"model": name, "input": "x"})
            self.assertEqual(status, 200, name)
        status, _, listed = await get_json(url + "/v1/models", headers=intern)
        self.assertEqual(sorted(m["id"] for m in listed["data"]), ["emb", "nomic-embed-text:latest"])
        self.assertEqual((await get_json(url + "/v1/models/qwen3:32b", headers=intern))[0], 404)
        status, _, tags = await get_json(url + "/ollama/api/tags", headers=intern)
        self.assertEqual([m["name"] for m in tags["models"]], ["nomic-embed-text:latest"])
        for who in (boss, other):
            status, _, _ = await post("/v1/chat/completions", who, {"model": "qwen3:32b", "messages": HI})
            self.assertEqual(status, 200)
            status, _, listed = await get_json(url + "/v1/models", headers=who)
            self.assertIn("qwen3:32b", [m["id"] for m in listed["data"]])

    def test_rules_are_checked(self):
        """A rule names a team or a scope (not both, not neither) and at least one model."""
        from clawdbot.config import ConfigError, parse_config
        from tests.helpers import BASE_CONFIG, merge_yaml

        for bad in ("[{models: [x]}]", "[{team: a, scope: b, models: [x]}]", "[{team: a, models: []}]"):
            with self.assertRaises(ConfigError):
                parse_config(merge_yaml(BASE_CONFIG, "backend: {model_access: " + bad + "}"), {})


class GatewayFairnessTests(Backed):
    async def test_one_request_is_not_queued_behind_a_crowd(self):
        """
        Through the gateway, max_connections 2: A opens 20 slow streams, then
        B sends one request; when one of A's calls ends, B's is the next to
        reach Ollama (one slot turnover), not the 19th.
        """
        self.start("max_connections: 2\nlimits: {max_queue: 100}", fake=FakeOllama(tokens=8))
        self.fake.hold(paths=("/api/chat",))
        url = self.gw.url
        greedy = bearer(token(sub="greedy", scope="chat:write"))
        ann = bearer(token(sub="ann", scope="chat:write"))

        def chat(headers, text, stream=False):
            body = {"messages": [{"role": "user", "content": text}], "stream": stream}
            return ensureDeferred(get_json(url + "/v1/chat/completions", method="POST", headers=headers, body=body))

        crowd = [chat(greedy, f"a{i}", stream=True) for i in range(20)]
        await self.fake.when_requests(2, "/api/chat")
        from tests.helpers import until

        await until(lambda: len(self.gw.parts.ollama.slots.waiting) == 18, what="A's other 18 calls queued")
        mine = chat(ann, "b")
        await until(lambda: len(self.gw.parts.ollama.slots.waiting) == 19, what="B's call queued")
        self.fake.release(1)  # one of A's calls ends: a slot turns over
        await self.fake.when_requests(3, "/api/chat")
        self.assertEqual(self.fake.requests_to("/api/chat")[2].body["messages"][-1]["content"], "b")
        for n in range(3, 22):
            self.fake.release()
            if n < 21:
                await self.fake.when_requests(n + 1, "/api/chat")
        self.fake.release()
        status, headers, _ = await mine
        self.assertEqual((status, headers.getRawHeaders("x-clawdbot-queue-position")), (200, ["1"]))
        for d in crowd:
            self.assertEqual((await d)[0], 200)
