"""Power of two choices and its numbers, as pure functions."""

import random
from collections import Counter

from serve._models import ReplicaInfo
from serve._policy import (
    QueueLengths,
    backoff_s,
    candidate_tiers,
    choose,
    probe_deadline_s,
    sample_two,
)


def replicas(n: int, limit: int = 5) -> list[ReplicaInfo]:
    return [ReplicaInfo(f"r{i}", f"a{i}", max_ongoing_requests=limit) for i in range(n)]


def test_sample_two_is_distinct_and_uniform() -> None:
    rng = random.Random(1)
    pool = replicas(4)
    counts: Counter[str] = Counter()
    for _ in range(4000):
        a, b = sample_two(pool, rng)
        assert a is not b
        counts[a.replica_id] += 1
        counts[b.replica_id] += 1
    assert all(1700 < c < 2300 for c in counts.values())
    assert sample_two(pool[:1], rng) == pool[:1]
    assert sample_two([], rng) == []


def test_shorter_known_queue_wins() -> None:
    pool = replicas(2)
    lens = {"r0": 3, "r1": 1}
    for seed in range(20):
        assert choose(pool, lens.get, random.Random(seed)).replica is pool[1]


def test_full_candidates_are_not_chosen_but_probed() -> None:
    pool = replicas(2, limit=2)
    choice = choose(pool, {"r0": 2, "r1": 5}.get, random.Random(0))
    assert choice.replica is None
    assert {r.replica_id for r in choice.probe} == {"r0", "r1"}


def test_unknown_candidate_is_probed_while_known_one_is_used() -> None:
    pool = replicas(2)
    choice = choose(pool, {"r0": 4}.get, random.Random(0))
    assert choice.replica is pool[0]
    assert [r.replica_id for r in choice.probe] == ["r1"]


def test_all_unknown_means_probe_everyone_sampled() -> None:
    choice = choose(replicas(3), lambda _: None, random.Random(0))
    assert choice.replica is None
    assert len(choice.probe) == 2


def test_single_replica() -> None:
    pool = replicas(1)
    assert choose(pool, {"r0": 0}.get, random.Random(0)).replica is pool[0]
    assert choose(pool, {"r0": 5}.get, random.Random(0)).replica is None


def test_backoff_schedule() -> None:
    assert [backoff_s(i) for i in range(9)] == [0.0, 0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff_s(10**6) == 0.5


def test_probe_deadline_doubles_to_one_second() -> None:
    assert [probe_deadline_s(i) for i in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert probe_deadline_s(10**9) == 1.0


def test_queue_lengths_estimate_reported_plus_unread() -> None:
    lens = QueueLengths(ttl_s=10)
    assert lens.estimate("r", now=0) is None
    lens.report("r", 2, now=0, acked=0)
    lens.sent("r", 1)
    lens.sent("r", 2)
    assert lens.estimate("r", now=1) == 4  # two requests the replica had not read yet
    lens.report("r", 3, now=2, acked=1)  # it read request 1 (counted in its 3)
    assert lens.estimate("r", now=2) == 4
    lens.report("r", 1, now=3, acked=2)
    assert lens.estimate("r", now=3) == 1
    lens.report("r", 5, now=4)  # a probe answer: carries no frame id
    assert lens.estimate("r", now=4) == 5
    lens.report("r", 0, now=5, acked=1)  # an older acknowledgement never moves it back
    assert lens.estimate("r", now=5) == 0
    assert lens.estimate("r", now=15.5) is None  # expired
    lens.forget("r")
    assert lens.known() == set()


def _with_models(*model_sets: set[str], host: str = "") -> list[ReplicaInfo]:
    return [
        ReplicaInfo(f"r{i}", f"a{i}", host=host, model_ids=frozenset(models))
        for i, models in enumerate(model_sets)
    ]


def test_multiplex_tiers_prefer_holders_then_fewest_models_then_all() -> None:
    pool = _with_models({"a", "b"}, {"b"}, set(), set())
    tiers = candidate_tiers(pool, model_id="a")
    assert [[r.replica_id for r in t] for t in tiers] == [
        ["r0"],
        ["r2", "r3"],
        ["r0", "r1", "r2", "r3"],
    ]


def test_multiplex_without_holders_goes_to_the_fewest_models() -> None:
    pool = _with_models({"a"}, {"b", "c"}, {"d"})
    tiers = candidate_tiers(pool, model_id="z")
    assert [[r.replica_id for r in t] for t in tiers] == [["r0", "r2"], ["r0", "r1", "r2"]]


def test_multiplex_with_equal_model_counts_is_just_all() -> None:
    pool = _with_models(set(), set())
    assert candidate_tiers(pool, model_id="z") == [pool]


def test_locality_tiers() -> None:
    pool = [
        ReplicaInfo("near", "a", host="me"),
        ReplicaInfo("far", "b", host="other"),
    ]
    tiers = candidate_tiers(pool, local_host="me", prefer_local=True)
    assert [[r.replica_id for r in t] for t in tiers] == [["near"], ["near", "far"]]
    assert candidate_tiers(pool, local_host="me", prefer_local=False) == [pool]
    assert candidate_tiers(pool, local_host="nowhere", prefer_local=True) == [pool]
