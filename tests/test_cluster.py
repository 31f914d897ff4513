"""Two `engine serve` nodes sharing one real redis-server (`[cluster] redis`): suppression, suspensions and
a destination's message rate hold across both, and mail keeps flowing while Redis is down.

One pair of nodes serves the whole module (starting them is most of the cost); each test uses its own
destination domains, and the Redis outage test runs last.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.suppression import SuppressionList, suppression_path
from tests.harness import Engine, Sink, engine_command, engine_toml, free_port, listener, wait_for
from tests.redis_server import RedisServer

REFUSED = "550 5.1.1 no such user"


@dataclass
class Node:
    engine: Engine
    tx: int
    bulk: int
    admin: int
    suppression: SuppressionList

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin}/api/v1{path}", data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def suppressed(self, recipient: str) -> list[dict]:
        return [r for r in self.engine.events("Suppressed") if r["recipient"] == recipient]


@dataclass
class Cluster:
    redis: RedisServer
    sink: Sink
    a: Node
    b: Node


def node(directory: Path, name: str, sink: Sink, redis: RedisServer) -> Node:
    directory.mkdir()
    tx, bulk, admin = free_port(), free_port(), free_port()
    text = engine_toml(
        admin=admin,
        hostname=f"{name}.mta.test",
        routes={"*": sink.address},
        listeners=[listener("tx", tx, "transactional"), listener("bulk", bulk, "bulk")],
        lanes={
            "transactional": {"retry_intervals": ["1s"]},
            "bulk": {
                "retry_intervals": ["1s"],
                "list_unsubscribe": {"mailto": "unsubscribe@mta.test", "url": "https://mta.test/u/{token}"},
            },
        },
        extra={"shaping": {"rate.test": {"max_message_rate": "20/s"}}, "cluster": {"redis": redis.url}},
    )
    engine = Engine(directory, text).start([tx, bulk, admin])
    wait_for(lambda: "cluster: joined" in engine.log_text(), 10, what=f"node {name} joined")
    return Node(engine, tx, bulk, admin, SuppressionList(suppression_path(directory / "spool")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(directory / "redis").start()
    sink = Sink(directory / "sink", reply=f"*@bounce.test={REFUSED}")
    nodes: list[Node] = []
    try:
        nodes = [node(directory / name, name, sink, redis) for name in ("a", "b")]
        yield Cluster(redis, sink, *nodes)
    finally:
        for each in nodes:
            each.suppression.close()
            each.engine.stop()
        sink.stop()
        redis.stop()


def send(port: int, recipients: list[str], subject: str) -> None:
    data = f"From: news@example.net\r\nTo: list@example.net\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("news@example.net", recipients, data)


def delivered(sink: Sink, recipient: str) -> int:
    return sum(recipient in envelope["recipients"] for envelope, _ in sink.messages())


def test_both_nodes_log_that_they_joined(cluster: Cluster) -> None:
    for each in (cluster.a, cluster.b):
        assert "cluster: joined redis://127.0.0.1" in each.engine.log_text()
    assert cluster.redis.client().zcard("engine:nodes") == 2
    for each in (cluster.a, cluster.b):
        request = urllib.request.Request(f"http://127.0.0.1:{each.admin}/api/v1/status")
        with urllib.request.urlopen(request, timeout=10) as response:
            status = json.loads(response.read())["cluster"]
        assert status["joined"] and status["redis"] == cluster.redis.url


def test_suppression_added_on_one_node_is_honoured_by_the_other(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    a.api("POST", "/suppression", {"address": "gone@dest.test", "reason": "asked to"})
    started = time.monotonic()
    wait_for(lambda: b.suppression.contains("gone@dest.test"), 5, interval=0.01, what="suppression on B")
    assert time.monotonic() - started < 1.0
    send(b.bulk, ["gone@dest.test", "stays@dest.test"], "after-suppression")
    wait_for(lambda: delivered(cluster.sink, "stays@dest.test"), 10, what="the other recipient")
    assert b.suppressed("gone@dest.test") and delivered(cluster.sink, "gone@dest.test") == 0

    a.api("DELETE", "/suppression?address=gone@dest.test")
    wait_for(lambda: not b.suppression.contains("gone@dest.test"), 5, what="removal on B")


def test_hard_bounce_on_one_node_suppresses_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    send(a.bulk, ["dead@bounce.test"], "bounces")
    wait_for(lambda: b.suppression.contains("dead@bounce.test", "any"), 10, what="hard bounce suppressed on B")
    assert b.suppression.get("dead@bounce.test").reason == "hard bounce"
    send(b.bulk, ["dead@bounce.test", "alive@dest.test"], "after-bounce")
    wait_for(lambda: delivered(cluster.sink, "alive@dest.test"), 10, what="the other recipient")
    assert b.suppressed("dead@bounce.test")
    assert not [r for r in b.engine.events("Bounce") if r["recipient"] == "dead@bounce.test"]


def test_suspension_made_on_one_node_holds_the_other_and_resume_anywhere_releases_all(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    rule = a.api("POST", "/suspend", {"domain": "hold.test", "reason": "maintenance"})
    wait_for(lambda: b.api("GET", "/suspend")["suspensions"], 5, what="the rule on B")
    assert [item["id"] for item in b.api("GET", "/suspend")["suspensions"]] == [rule["id"]]
    send(a.tx, ["one@hold.test"], "held")
    send(b.tx, ["two@hold.test"], "held")
    send(b.tx, ["free@dest.test"], "not-held")
    wait_for(lambda: delivered(cluster.sink, "free@dest.test"), 10, what="mail to other domains")
    time.sleep(0.5)
    assert delivered(cluster.sink, "one@hold.test") == delivered(cluster.sink, "two@hold.test") == 0

    b.api("DELETE", f"/suspend/{rule['id']}")
    wait_for(lambda: delivered(cluster.sink, "one@hold.test"), 10, what="A released by B's resume")
    wait_for(lambda: delivered(cluster.sink, "two@hold.test"), 10, what="B released")
    assert a.api("GET", "/suspend")["suspensions"] == []


def blast(port: int, count: int) -> None:
    command = engine_command(
        "send", "--server", f"127.0.0.1:{port}", "--to", "user{n}@rate.test", "--count", str(count),
        "--concurrency", "10", "--size", "512", "--quiet",
    )  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_destination_rate_holds_for_both_nodes_together(cluster: Cluster) -> None:
    per_node = 115
    senders = [threading.Thread(target=blast, args=(node.tx, per_node)) for node in (cluster.a, cluster.b)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)

    def arrivals() -> list[tuple[float, str]]:
        return sorted(
            (e["received"], e["helo"]) for e, _ in cluster.sink.messages() if "@rate.test" in e["recipients"][0]
        )

    wait_for(lambda: len(arrivals()) >= 2 * per_node, 30, what="every rate.test message")
    steady = arrivals()[10:]  # past the first burst
    span = steady[-1][0] - steady[0][0]
    rate = (len(steady) - 1) / span
    assert span >= 10
    assert 18.0 <= rate <= 22.0, f"{rate:.2f} msgs/s over {span:.1f}s"
    # Both nodes got their share all along: each one's last message came near the end, not halfway.
    finished = {helo: received - steady[0][0] for received, helo in steady}
    assert sorted(finished) == ["a.mta.test", "b.mta.test"]
    assert min(finished.values()) >= 0.8 * span, f"finished at {finished} of {span:.1f}s"


def test_mail_flows_while_redis_is_down_and_changes_catch_up(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    cluster.redis.kill()
    send(a.tx, ["during-a@dest.test"], "redis-down")
    send(b.tx, ["during-b@dest.test"], "redis-down")
    a.api("POST", "/suppression", {"address": "while-down@dest.test"})
    wait_for(lambda: delivered(cluster.sink, "during-a@dest.test"), 10, what="A delivering without Redis")
    wait_for(lambda: delivered(cluster.sink, "during-b@dest.test"), 10, what="B delivering without Redis")
    for each in (a, b):
        wait_for(lambda e=each: "cluster: no Redis at" in e.engine.log_text(), 5, what="the warning")
    assert not b.suppression.contains("while-down@dest.test")

    cluster.redis.start()  # the same port, empty: the nodes bring their entries back
    wait_for(lambda: b.suppression.contains("while-down@dest.test"), 15, what="the add reaching B")
    for each in (a, b):
        assert each.engine.log_text().count("cluster: no Redis at") == 1
        wait_for(lambda e=each: e.engine.log_text().count("cluster: joined") == 2, 10, what="rejoined")
    send(b.bulk, ["while-down@dest.test", "after@dest.test"], "after-outage")
    wait_for(lambda: delivered(cluster.sink, "after@dest.test"), 10, what="the other recipient")
    assert b.suppressed("while-down@dest.test") and delivered(cluster.sink, "while-down@dest.test") == 0
