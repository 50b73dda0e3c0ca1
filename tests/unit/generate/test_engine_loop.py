"""EngineLoop: concurrent callers share one engine (no vLLM needed: a scripted engine)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from l2vg_ray.generate.backends import EngineLoop


@dataclass
class Out:
    request_id: str
    finished: bool
    ids: list[int]


class ScriptedEngine:
    """Finishes a request after len(prompt) steps; records how many requests each step held."""

    def __init__(self, fail_at_step: int | None = None):
        self.live: dict[str, list] = {}
        self.held: list[int] = []
        self.fail_at_step = fail_at_step
        self.aborted: list[str] = []
        self.thread_ids: set[int] = set()

    def add_request(self, request_id, prompt, params):
        if not prompt["prompt_token_ids"]:
            raise ValueError("empty prompt")
        self.live[request_id] = [len(prompt["prompt_token_ids"]), prompt["prompt_token_ids"]]

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.held.append(len(self.live))
        time.sleep(0.005)  # a step takes time, as a forward pass does
        if self.fail_at_step is not None and len(self.held) == self.fail_at_step:
            raise RuntimeError("engine died")
        done = []
        for rid, state in list(self.live.items()):
            state[0] -= 1
            if state[0] == 0:
                done.append(Out(rid, True, [t + 1 for t in state[1]]))
                del self.live[rid]
        return done

    def abort_request(self, ids):
        self.aborted.extend(ids)
        for i in ids:
            self.live.pop(i, None)


def test_outputs_in_order_for_one_caller():
    engine = ScriptedEngine()
    outs = EngineLoop(engine, params=None).run([[1, 2, 3], [5], [7, 8]])
    assert [o.ids for o in outs] == [[2, 3, 4], [6], [8, 9]]
    assert not engine.live


def test_concurrent_callers_share_the_engine():
    engine = ScriptedEngine()
    loop = EngineLoop(engine, params=None)
    batches = [[[b * 10 + i] * (1 + (i * 7 + b) % 9) for i in range(4)] for b in range(6)]
    results: dict[int, list] = {}
    start = threading.Barrier(len(batches))

    def call(b):
        start.wait()
        results[b] = loop.run(batches[b])

    threads = [threading.Thread(target=call, args=(b,)) for b in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for b, prompts in enumerate(batches):
        assert [o.ids for o in results[b]] == [[t + 1 for t in p] for p in prompts]
    # Requests of several batches were in the engine together (one batch holds 4).
    assert max(engine.held) > 4


def test_a_refused_request_and_an_engine_error_fail_only_what_they_touch():
    engine = ScriptedEngine()
    loop = EngineLoop(engine, params=None)
    with pytest.raises(ValueError, match="empty prompt"):
        loop.run([[1], []])
    broken = ScriptedEngine(fail_at_step=2)
    loop = EngineLoop(broken, params=None)
    with pytest.raises(RuntimeError, match="engine died"):
        loop.run([[1, 2, 3], [4, 5, 6]])
    assert sorted(broken.aborted) and not broken.live
    assert [o.ids for o in loop.run([[9]])] == [[10]]  # the loop still serves
