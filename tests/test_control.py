"""The control channel (engine.control) over a real socketpair, both ends in one event loop."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import load_config
from engine.control import ControlClient, ControlError, Outbox, channel_pair, read_init, send_init, serve


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_init_frame_carries_configuration_and_suspensions_then_requests_are_answered() -> None:
    async def scenario() -> None:
        config = load_config(None)
        supervisor_end, worker_end = channel_pair()
        assert worker_end.get_inheritable() and not supervisor_end.get_inheritable()
        send_init(supervisor_end, config, [{"rule_id": "r1", "domain": "x.test"}])
        client = ControlClient(supervisor_end)
        early = asyncio.ensure_future(client.call("echo", value=1))  # sent before the channel started
        await client.start()
        await asyncio.sleep(0.05)
        channel = read_init(worker_end)
        assert channel.config == config and channel.suspensions == [{"rule_id": "r1", "domain": "x.test"}]

        async def slow(seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "slow"

        def fail() -> None:
            raise ValueError("no such queue")

        handlers = {"echo": lambda value: {"value": value}, "slow": slow, "fail": fail}
        server = asyncio.ensure_future(serve(channel.sock, handlers, channel.unpacker))
        assert await early == {"value": 1}
        assert await asyncio.gather(client.call("slow", seconds=0.05), client.call("echo", value=b"\x00")) == [
            "slow",
            {"value": b"\x00"},
        ]
        with pytest.raises(ControlError, match="ValueError: no such queue"):
            await client.call("fail")
        with pytest.raises(ControlError, match="unknown operation 'nope'"):
            await client.call("nope")
        with pytest.raises(ControlError, match="did not answer 'slow' within"):
            await client.call("slow", timeout=0.05, seconds=1.0)
        pending = asyncio.ensure_future(client.call("slow", seconds=5.0))
        await asyncio.sleep(0.05)
        server.cancel()
        channel.sock.close()
        with pytest.raises(ControlError, match="closed the control channel"):
            await pending
        assert client.closed
        with pytest.raises(ControlError, match="not connected"):
            await client.call("echo", value=2)
        await client.close()

    run(scenario())


def test_a_worker_end_without_init_is_refused() -> None:
    supervisor_end, worker_end = channel_pair()
    supervisor_end.close()
    with pytest.raises(ControlError, match="closed before the init frame"):
        read_init(worker_end)


def test_worker_notices_reach_the_supervisor_even_when_made_before_the_channel_is_up() -> None:
    async def scenario() -> None:
        supervisor_end, worker_end = channel_pair()
        send_init(supervisor_end, load_config(None), [])
        notices: list[tuple[str, dict]] = []
        client = ControlClient(supervisor_end, lambda kind, args: notices.append((kind, args)))
        await client.start()
        channel = read_init(worker_end)
        outbox = Outbox()
        outbox.notice("suspend", rule_id="early")
        server = asyncio.ensure_future(serve(channel.sock, {"echo": lambda value: value}, channel.unpacker, outbox))
        assert await client.call("echo", value=1) == 1
        outbox.notice("suspend", rule_id="late")
        assert await client.call("echo", value=2) == 2  # answers come after the notice sent before them
        assert notices == [("suspend", {"rule_id": "early"}), ("suspend", {"rule_id": "late"})]
        server.cancel()
        await client.close()

    run(scenario())
