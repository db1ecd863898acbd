"""The HTTP guard of SONA's vLLM routes: request models, admin policy, body cap, rate limit."""

from __future__ import annotations

import asyncio
import json

import pytest

from sona_plugin.integrations.vllm import guard


def parse_feedback(obj) -> guard.FeedbackBody:
    return guard.parse(guard.FeedbackBody, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "obj, words",
    [
        ({"id": "x", "reward": 3}, "field 'reward'"),
        ({"id": "x", "reward": "good"}, "field 'reward'"),
        ({"id": "x", "reward": True}, "field 'reward'"),
        ({"id": "x", "liked": "yes"}, "field 'liked'"),
        ({"id": "x", "liked": 1}, "field 'liked'"),
        ({"id": "x", "reward": 1, "extra": 1}, "unknown field 'extra'"),
        ({"id": "x" * (guard.MAX_ID_CHARS + 1), "reward": 1}, "field 'id'"),
        ({"id": "", "reward": 1}, "field 'id'"),
        ({"id": 7, "reward": 1}, "field 'id'"),
        ({"id": "x", "reward": 1, "index": -1}, "field 'index'"),
        ({"id": "x", "reward": 1, "index": 10**9}, "field 'index'"),
    ],
)
def test_bad_feedback_bodies_name_the_field(obj, words):
    with pytest.raises(guard.BadRequest) as e:
        parse_feedback(obj)
    assert e.value.status == 400 and words in str(e.value), str(e.value)


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_rewards_are_refused(raw):
    with pytest.raises(guard.BadRequest, match="reward"):
        guard.parse(guard.FeedbackBody, b'{"id": "x", "reward": ' + raw + b"}")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"[" * 100000])
def test_non_objects_are_refused(raw):
    with pytest.raises(guard.BadRequest, match="JSON object"):
        guard.parse(guard.FeedbackBody, raw)


def test_good_feedback_bodies_parse():
    b = parse_feedback({"id": "chatcmpl-1", "reward": 1, "index": 2})
    assert (b.target(), b.reward, b.index) == ("chatcmpl-1", 1.0, 2)
    assert parse_feedback({"response_id": "r", "liked": False}).target() == "r"
    with pytest.raises(ValueError, match="'id'"):
        parse_feedback({"reward": 0.5}).target()


def test_learn_and_rollback_bodies_are_bounded():
    assert guard.parse(guard.LearnBody, b"").gate is True  # an empty body: the defaults
    with pytest.raises(guard.BadRequest, match="epochs"):
        guard.parse(guard.LearnBody, b'{"epochs": 1000000}')
    with pytest.raises(guard.BadRequest, match="gate"):
        guard.parse(guard.LearnBody, b'{"gate": "no"}')
    with pytest.raises(guard.BadRequest, match="version"):
        guard.parse(guard.RollbackBody, b'{"version": 0}')
    with pytest.raises(guard.BadRequest, match="version"):
        guard.parse(guard.RollbackBody, b'{"version": true}')


class _Request:
    def __init__(self, body: bytes, declared: str | None):
        self.headers = {} if declared is None else {"content-length": declared}
        self._body = body

    async def stream(self):
        for i in range(0, len(self._body), 1000):
            yield self._body[i : i + 1000]


def test_bodies_over_the_cap_get_413_even_when_the_length_lies():
    big = b"x" * (guard.MAX_BODY_BYTES + 1)
    for declared in (str(len(big)), "10", None):
        with pytest.raises(guard.BadRequest) as e:
            asyncio.run(guard.read_body(_Request(big, declared)))
        assert e.value.status == 413
    assert asyncio.run(guard.read_body(_Request(b"{}", "2"))) == b"{}"


def test_admin_is_closed_beyond_loopback_without_a_token():
    for host in (None, "0.0.0.0", "10.1.2.3", "::"):
        status, msg = guard.AdminPolicy(None, host).check(None)
        assert status == 403 and "SONA_ADMIN_TOKEN" in msg
    assert guard.AdminPolicy(None, "127.0.0.1").check(None) is None
    assert guard.AdminPolicy(None, "0.0.0.0", open_admin=True).check(None) is None


def test_admin_token_is_required_when_set_even_on_loopback():
    p = guard.AdminPolicy("s3cret", "127.0.0.1")
    assert p.check(None)[0] == 401
    assert p.check("Bearer wrong")[0] == 401
    assert p.check("Bearer s3cret") is None
    assert p.mode == "token"


def test_rate_limiter_buckets_per_key_with_retry_after():
    now = [0.0]
    lim = guard.RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [lim.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = lim.take("a")
    assert wait == pytest.approx(0.5)
    assert lim.take("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert lim.take("a") == 0.0
    assert guard.RateLimiter(rate=0, burst=1).take("a") == 0.0  # off


def test_rate_limit_key_trusts_the_api_key_only_when_vllm_checks_it():
    assert guard.client_key("Bearer k1", "1.2.3.4", keys_checked=False) == "addr:1.2.3.4"
    k1 = guard.client_key("Bearer k1", "1.2.3.4", keys_checked=True)
    assert k1.startswith("key:") and "k1" not in k1
    assert k1 != guard.client_key("Bearer k2", "1.2.3.4", keys_checked=True)
