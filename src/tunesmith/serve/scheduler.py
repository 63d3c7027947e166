"""The scheduler thread: it alone touches the models, and it runs continuous batching.

Each turn it takes the requests that arrived (waiting a few ms when idle, so requests sent together
share their prefill), prefills waiting sequences while the batch has room, then runs one decoding
step of every engine with active rows. A sequence leaves when it samples an end token, reaches
max_tokens, meets a stop string, passes its deadline, or its client goes away; a waiting one takes
its place at the next turn.

Requests talk to the thread through `Job`: the HTTP side submits one (refused when `max_queue`
jobs are already in flight) and receives events through `emit`, a thread-safe callback:
("delta", choice, text), ("finish", choice, reason, completion_tokens), ("done",) or
("error", http_status, message).
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import Engine, Sequence, now, pick


@dataclass
class Job:
    model: str
    seqs: list[Sequence]
    emit: Callable[[tuple], None]
    cancelled: bool = False
    open: int = field(init=False)  # choices not finished yet

    def __post_init__(self):
        self.open = len(self.seqs)
        for i, s in enumerate(self.seqs):
            s.job, s.index = self, i


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not sent yet)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Scheduler:
    """Owns the model pool; `submit` jobs from any thread."""

    def __init__(self, pool, max_batch: int = 16, max_queue: int = 64, batch_wait_s: float = 0.003,
                 threads: int | None = None):
        self.pool, self.max_batch, self.max_queue, self.batch_wait_s = pool, max_batch, max_queue, batch_wait_s
        self.threads = threads  # torch's intra-op threads for the decoding thread; None: leave as set
        self.tokenizer = pool.tokenizer
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Sequence] = deque()
        self.in_flight = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.failed: str | None = None  # why the thread died, if it did
        self.thread = threading.Thread(target=self._run, name="tunesmith-serve-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish what is in flight, then end the thread."""
        self.stopping = True
        self.inbox.put(None)
        self.thread.join()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when `max_queue` jobs are already in flight (the caller answers 429)."""
        with self.lock:
            if self.in_flight >= self.max_queue or self.stopping or self.failed:
                return False
            self.in_flight += 1
        self.inbox.put(job)
        return True

    def _release(self, job: Job, event: tuple) -> None:
        with self.lock:
            self.in_flight -= 1
        job.emit(event)

    # ---- the thread

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            while True:
                busy = bool(self.waiting) or any(e.rows for e in self.pool.engines())
                self._take(block=not busy)
                if not busy and not self.waiting and self.stopping and self.inbox.empty():
                    return  # stopping, and everything in flight has finished
                self._admit()
                for engine in self.pool.engines():
                    self._expire(engine)
                    if engine.rows:
                        self._advance(engine, engine.step())
        except BaseException:  # a bug, or out of memory: every open request hears of it, later ones get 503
            with self.lock:
                self.failed = "the server failed while generating: " + traceback.format_exc().strip().splitlines()[-1]
            jobs = {id(s.job): s.job for e in self.pool.engines() for s in e.rows if s.finish is None}
            jobs.update({id(s.job): s.job for s in self.waiting})
            while not self.inbox.empty():
                job = self.inbox.get()
                if job is not None:
                    jobs[id(job)] = job
            for job in jobs.values():
                self._release(job, ("error", 500, self.failed))
            raise

    def _take(self, block: bool) -> None:
        """Move arrived jobs' sequences to the waiting line (when idle, wait for one first)."""
        items = []
        try:
            items.append(self.inbox.get(timeout=None if block else 0.0))
        except queue.Empty:
            return
        deadline = time.monotonic() + self.batch_wait_s
        while True:  # gather what arrives together, so it shares one prefill
            try:
                items.append(self.inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for job in items:
            if job is not None:  # None: the wake-up `stop` sends
                self._route(job)

    def _route(self, job: Job) -> None:
        in_use = {s.job.model for e in self.pool.engines() for s in e.rows} | {s.job.model for s in self.waiting}
        try:
            engine, slot = self.pool.resolve(job.model, in_use)
        except Exception as e:  # a broken adapter folder fails its requests, not the server
            self._release(job, ("error", 500, f"model `{job.model}` cannot be loaded: {e}"))
            return
        for s in job.seqs:
            s.engine, s.adapter = engine, slot
            self.waiting.append(s)

    def _admit(self) -> None:
        """Prefill waiting sequences while the batch has room, one prefill per engine."""
        room = self.max_batch - sum(len(e.rows) for e in self.pool.engines())
        groups: dict[int, list[Sequence]] = {}
        while self.waiting and room > 0:
            s = self.waiting.popleft()
            if s.job.cancelled:
                self._finish(s, "cancelled")
                continue
            groups.setdefault(id(s.engine), []).append(s)
            room -= 1
        for seqs in groups.values():
            engine = seqs[0].engine
            self._advance(engine, engine.join(seqs), seqs)

    def _expire(self, engine: Engine) -> None:
        t = now()
        for s in engine.rows:
            if s.finish is None and s.job.cancelled:
                self._finish(s, "cancelled")
            elif s.finish is None and t > s.deadline:
                self._finish(s, "length")
        engine.drop_finished()

    def _advance(self, engine: Engine, logits, seqs: list[Sequence] | None = None) -> None:
        """Sample each row's next token, send the new text, end the rows that are done."""
        for s, row in zip(seqs if seqs is not None else engine.rows, logits):
            token = pick(row, s)
            if token in engine.stops:
                self._finish(s, "stop", ended_on_token=True)
                continue
            s.ids.append(token)
            self._send_text(s, final=False)
            if s.finish is None and len(s.ids) >= s.max_tokens:
                self._finish(s, "length")
        engine.drop_finished()

    def _send_text(self, s: Sequence, final: bool) -> None:
        with self.pool.tokenizer_lock:
            text = self.tokenizer.decode(s.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(stop) for stop in s.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: the reply ends before it
            text, final = text[:cut], True
        if not final:
            if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                return
            text = text[:len(text) - _held_back(text, s.stop)]
        if len(text) > len(s.sent) and text.startswith(s.sent):
            s.job.emit(("delta", s.index, text[len(s.sent):]))
            s.sent = text
        if cut >= 0:
            s.finish = "stop"
            self._close(s, len(s.ids))

    def _finish(self, s: Sequence, reason: str, ended_on_token: bool = False) -> None:
        if s.finish is not None:
            return
        if reason != "cancelled":
            self._send_text(s, final=True)  # text held back for a stop string that never came
        if s.finish is None:
            s.finish = reason
            self._close(s, len(s.ids) + int(ended_on_token))

    def _close(self, s: Sequence, completion_tokens: int) -> None:
        s.job.emit(("finish", s.index, s.finish, completion_tokens))
        s.job.open -= 1
        if s.job.open == 0:
            self._release(s.job, ("done",))
