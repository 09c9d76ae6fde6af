"""AsyncLLM: streaming deltas, cancellation frees blocks, validation errors, shutdown, engine death."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch

from engine.conftest import random_model, tiny_config
from tulu.engine.async_engine import AsyncLLM, EngineDeadError
from tulu.engine.engine import LLM, EngineConfig, LLMEngine
from tulu.engine.sampling import SamplingParams
from tulu.errors import GenerationError, TuluError
from tulu.model import GPTNeoXForCausalLM

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    """conftest's tiny random model (vocab 512, window 256), norms and biases as initialised."""
    return random_model(tiny_config(), seed=0, perturb=False)


PROMPTS = [[(7 * i + j) % 500 + 1 for j in range(3 + 5 * i)] for i in range(10)]


def run(coro):
    return asyncio.run(coro)


async def collect(stream) -> list:
    """Every output of a stream (wrapped in asyncio.wait_for, a hang fails the test)."""
    return [out async for out in stream]


async def settle(condition: Callable[[], bool]) -> None:
    """Wait up to 2 s for `condition`: the engine thread applies an abort on its next turn, so
    right after a stream is left the blocks may still be held. The test's own asserts follow
    (a condition never met fails there, not here)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.02)


def assert_idle(engine: LLMEngine) -> None:
    assert engine.pool.num_used == 0
    assert not engine.scheduler.waiting and not engine.scheduler.running


def test_streams_equal_blocking_generate(model):
    expected = [o.outputs[0].token_ids for o in LLM(model, None).generate(PROMPTS, GREEDY)]
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()

        async def one(prompt):
            tokens, finished = [], 0
            async for out in llm.generate(prompt, GREEDY):
                tokens += out.outputs[0].delta_token_ids
                assert out.outputs[0].token_ids == tokens
                finished += out.finished
            assert finished == 1
            return tokens

        got = await asyncio.gather(*(one(p) for p in PROMPTS))
        await llm.shutdown()
        return got

    assert run(main()) == expected
    assert_idle(engine)


def test_leaving_the_stream_early_aborts_and_frees_blocks(model):
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

        async def leave_after(n):
            seen = 0
            async for out in llm.generate(PROMPTS[3], params):
                seen += len(out.outputs[0].delta_token_ids)
                if seen >= n:
                    break
            return seen

        await asyncio.gather(*(leave_after(3) for _ in range(8)))
        await settle(lambda: engine.pool.num_used == 0 and not engine.scheduler.running)
        assert llm.num_requests == 0
        await llm.shutdown()

    run(main())
    assert_idle(engine)


def test_cancelled_task_aborts(model):
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

        started = asyncio.Event()

        async def consume():
            async for _ in llm.generate(PROMPTS[5], params):
                started.set()
                await asyncio.sleep(3600)  # a slow client: cancelled while holding the stream

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(lambda: engine.pool.num_used == 0)
        await llm.shutdown()

    run(main())
    assert_idle(engine)


def test_validation_errors_are_raised_before_any_output(model):
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        too_long = SamplingParams(max_tokens=250, temperature=0.0)
        with pytest.raises(GenerationError, match="context window of 256"):
            async for _ in llm.generate(list(range(1, 20)), too_long):
                pass
        with pytest.raises(GenerationError, match="empty"):
            async for _ in llm.generate([], GREEDY):
                pass
        # The engine still serves afterwards.
        outs = [o async for o in llm.generate(PROMPTS[0], GREEDY)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 24
        await llm.shutdown()

    run(main())
    assert_idle(engine)


def test_shutdown_drains_then_aborts(model, monkeypatch):
    engine = LLMEngine(model, None, EngineConfig())
    real_step = engine.step

    def slow_step():  # >= 2 s for the long request, so the 1 s drain deadline surely cuts it
        time.sleep(0.01)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        endless = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

        async def collect(prompt, params, started: asyncio.Event):
            last = None
            async for out in llm.generate(prompt, params):
                last = out
                started.set()
            return last

        started = asyncio.Event(), asyncio.Event()
        quick = asyncio.create_task(collect(PROMPTS[0], short, started[0]))
        slow = asyncio.create_task(collect(PROMPTS[9], endless, started[1]))
        # Both running (not merely queued) when the shutdown begins; the quick one needs a
        # few 10 ms steps of the 1 s drain, the long one at least 2 s.
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        await llm.shutdown(drain_timeout=1.0)
        done_quick, done_slow = await quick, await slow
        assert done_quick.outputs[0].finish_reason == "length"
        # Past the deadline the long request is aborted, and its stream ends with the notice.
        assert done_slow.outputs[0].finish_reason == "abort"
        assert 0 < len(done_slow.outputs[0].token_ids) < 200
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate(PROMPTS[0], short):
                pass

    run(main())
    assert_idle(engine)


def test_requests_during_the_drain_are_refused_at_once(model, monkeypatch):
    """A request submitted while shutdown drained was admitted, then aborted when the drain
    ended: it is refused at once (and /health's check says why), while the running request
    still finishes."""
    engine = LLMEngine(model, None, EngineConfig())
    real_step = engine.step

    def slow_step():  # the running request needs >= 0.2 s, so the drain is under way
        time.sleep(0.01)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    short = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        stream = llm.generate(PROMPTS[0], short)
        await asyncio.wait_for(anext(stream), 10)
        draining = asyncio.create_task(llm.shutdown(drain_timeout=30.0))
        await asyncio.sleep(0)  # the shutdown has begun (it is waiting for the drain)
        assert not draining.done()
        with pytest.raises(EngineDeadError, match="shutting down"):
            await asyncio.wait_for(collect(llm.generate(PROMPTS[1], short)), 3)
        with pytest.raises(EngineDeadError, match="shutting down"):
            llm.check_health()
        rest = await asyncio.wait_for(collect(stream), 10)
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"
        assert len(rest[-1].outputs[0].token_ids) == 20
        await asyncio.wait_for(draining, 10)

    run(main())
    assert_idle(engine)


def test_a_dead_engine_names_its_failure_to_later_requests(model, monkeypatch):
    """After the engine thread died, new requests and /health's check name the failure; an
    exception's str alone can be empty (AssertionError()), which read "not running ()"."""
    engine = LLMEngine(model, None, EngineConfig())

    def broken_step():
        raise AssertionError

    async def main():
        llm = AsyncLLM(engine)
        monkeypatch.setattr(engine, "step", broken_step)
        llm.start()
        with pytest.raises(EngineDeadError, match="AssertionError"):
            await asyncio.wait_for(collect(llm.generate(PROMPTS[0], GREEDY)), 3)
        with pytest.raises(EngineDeadError, match=r"not running \(it stopped: AssertionError"):
            await asyncio.wait_for(collect(llm.generate(PROMPTS[0], GREEDY)), 3)
        with pytest.raises(EngineDeadError, match="AssertionError"):
            llm.check_health()
        await llm.shutdown()

    run(main())


def test_engine_failure_reaches_every_stream(model, monkeypatch):
    engine = LLMEngine(model, None, EngineConfig())

    def broken_step():
        raise torch.cuda.OutOfMemoryError("simulated out of memory")

    async def main():
        llm = AsyncLLM(engine)
        monkeypatch.setattr(engine, "step", broken_step)
        llm.start()
        with pytest.raises(EngineDeadError, match="simulated out of memory"):
            async for _ in llm.generate(PROMPTS[0], GREEDY):
                pass
        assert not llm.is_running
        await llm.shutdown()

    run(main())


def test_a_refused_chat_prompt_fails_alone(tok_model, demo_tokenizer):
    """Malformed chat messages raise ChatFormatError (a TuluError, not a GenerationError): the
    request is refused, and the engine keeps serving instead of dying."""
    engine = LLMEngine(tok_model, demo_tokenizer, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        bad = [{"role": "user", "content": 5}]
        with pytest.raises(TuluError, match="field 'content'"):
            await asyncio.wait_for(collect(llm.generate(bad, GREEDY)), 3)
        assert llm.is_running
        outs = [o async for o in llm.generate(PROMPTS[0], GREEDY)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 24
        await llm.shutdown()

    run(main())
    assert_idle(engine)


def test_engine_death_reaches_requests_not_yet_admitted(model, monkeypatch):
    """The engine thread dying while it adds a request must fail that request's waiter (it
    waits for admission, not for outputs), never leave it waiting forever."""
    engine = LLMEngine(model, None, EngineConfig())

    def broken_add(*args, **kwargs):
        raise RuntimeError("simulated bug in add_request")

    async def main():
        llm = AsyncLLM(engine)
        monkeypatch.setattr(engine, "add_request", broken_add)
        llm.start()
        with pytest.raises(EngineDeadError, match="simulated bug"):
            await asyncio.wait_for(collect(llm.generate(PROMPTS[0], GREEDY)), 3)
        assert not llm.is_running
        await llm.shutdown()

    run(main())


def test_a_reused_request_id_never_gets_the_old_requests_outputs(model):
    """Leaving a stream aborts its request later, on the engine thread; a new stream that
    reuses the id in between must not receive the old request's abort notice."""
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        endless = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = llm.generate(PROMPTS[3], endless, request_id="same")
        first = await anext(stream)
        assert first.request_id == "same"
        await stream.aclose()  # queues the abort of the old request
        outs = await asyncio.wait_for(
            collect(llm.generate(PROMPTS[0], GREEDY, request_id="same")), 3
        )
        assert [o.request_id for o in outs] == ["same"] * len(outs)
        assert outs[-1].outputs[0].finish_reason == "length"
        assert (
            outs[-1].outputs[0].token_ids
            == LLM(model, None).generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids
        )
        await llm.shutdown()

    run(main())
    assert_idle(engine)


def test_shutdown_aborts_requests_whatever_the_engine_thread_is_doing(model):
    """Shutdown queues its aborts, then flags the stop: an engine thread that had just read
    the (empty) command queue and sees the flag must still apply those aborts, so that every
    stream ends with its abort notice and the KV blocks are freed, not with EngineDeadError."""
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        apply_commands = llm._apply_commands
        armed, parked = threading.Event(), threading.Event()

        def apply_then_wait_for_shutdown(loop):
            met = apply_commands(loop)
            if armed.is_set():  # once: the shutdown happens right after this read
                armed.clear()
                parked.set()
                deadline = time.monotonic() + 10
                while not llm._stopping and time.monotonic() < deadline:
                    time.sleep(0.001)
            return met

        llm._apply_commands = apply_then_wait_for_shutdown
        llm.start()
        endless = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = llm.generate(PROMPTS[3], endless)
        await anext(stream)
        armed.set()
        assert await asyncio.to_thread(parked.wait, 10)
        await llm.shutdown()
        outs = await asyncio.wait_for(collect(stream), 10)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"

    run(main())
    assert_idle(engine)


def test_a_slow_consumer_gets_merged_outputs_whose_deltas_add_up(tok_model, demo_tokenizer):
    """The engine does not wait for a slow consumer: the outputs it has not taken are merged
    into one (not queued one per step, each with every token so far), and the joined deltas
    still equal the final tokens and text."""
    engine = LLMEngine(tok_model, demo_tokenizer, EngineConfig())
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    expected = LLM(tok_model, demo_tokenizer).generate(["The cat"], params)[0].outputs[0]

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        stream = llm.generate("The cat", params)
        first = await asyncio.wait_for(anext(stream), 10)
        for _ in range(500):  # the consumer sleeps while the engine finishes the request
            if engine.num_unfinished_requests == 0:
                break
            await asyncio.sleep(0.01)
        rest = await asyncio.wait_for(collect(stream), 10)
        await llm.shutdown()
        return [first, *rest]

    outs = run(main())
    # The 59 outputs made while the consumer slept arrive as one (the final one may come
    # apart when the consumer wakes between the engine's last step and its delivery).
    assert len(outs) <= 3
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == expected.token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == expected.text
    assert outs[-1].outputs[0].token_ids == expected.token_ids
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_the_final_output_frees_the_request_id(model):
    """A consumer that stops reading at the final output (without closing the stream) may
    reuse the request id at once, and shutdown does not wait for that stream."""
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        stream = llm.generate(PROMPTS[0], GREEDY, request_id="same")
        while not (await asyncio.wait_for(anext(stream), 10)).finished:
            pass
        assert llm.num_requests == 0
        outs = await asyncio.wait_for(
            collect(llm.generate(PROMPTS[1], GREEDY, request_id="same")), 10
        )
        assert outs[-1].outputs[0].finish_reason == "length"
        started = time.monotonic()
        await llm.shutdown(drain_timeout=5.0)
        assert time.monotonic() - started < 2.0
        await stream.aclose()

    run(main())
    assert_idle(engine)


def test_requests_after_shutdown_are_told_it_shut_down(model):
    engine = LLMEngine(model, None, EngineConfig())

    async def main():
        llm = AsyncLLM(engine)
        llm.start()
        await llm.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect(llm.generate(PROMPTS[0], GREEDY)), 3)
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(llm.unload_lora("none"), 3)

    run(main())
    assert_idle(engine)
