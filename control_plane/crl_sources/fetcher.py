"""The CRL fetcher task (SPEC §13): fetches every TrustConfig's CRL sources over HTTP(S) with httpx (or
from a local file), bounded in size, time and redirects, and hands each answer to `schedule` to decide on.
A new CRL becomes a TrustConfig revision written as `system:crl-fetcher` through the API's own write path;
an unchanged or refused one writes nothing, so nothing is pushed to the nodes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import stat
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from mtlsgate.v1 import resources_pb2
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily

from control_plane.api.errors import InvalidResource
from control_plane.crl_sources import schedule
from control_plane.crl_sources.schedule import (
    Accepted,
    Body,
    Failed,
    NotModified,
    Runtime,
    Source,
    Unchanged,
)
from control_plane.store.base import EtagMismatch, Store, StoreError

log = logging.getLogger("mtlsgate.crl_fetcher")

FETCH_FAILURES = Counter("mtlsgate_crl_fetch_failures_total", "CRL source fetches that yielded no usable CRL",
                         ["reason"])
FETCHES = Counter("mtlsgate_crl_fetches_total", "CRL source fetches by result (new, unchanged, failed)",
                  ["result"])

# A write through the API's path: (TrustConfig with its new crl_source_status, etag precondition).
Writer = Callable[[resources_pb2.TrustConfig, str], Any]

_REDIRECTS = (301, 302, 303, 307, 308)
_WRITE_ATTEMPTS = 5  # etag races with people's edits before the fetch counts as failed


@dataclass(frozen=True)
class FetchOptions:
    deadline_seconds: float = 30.0  # the whole fetch, redirects included: a trickling body cannot hold it
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 10.0  # between two reads
    max_bytes: int = schedule.MAX_RESPONSE_BYTES
    concurrency: int = 4


# ---------------------------------------------------------------- one download


def _scrub(text: str, uri: str) -> str:
    """An exception's text without the URL's query (signed bucket URLs carry their signature there)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.query:
        text = text.replace(parts.query, "…")
    return " ".join(text.split())[:300]


def _read_file(path: str, max_bytes: int, validator: str) -> Body | NotModified | Failed:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the read
    except OSError as exc:
        return Failed("file_error", f"cannot open: {exc.strerror}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Failed("file_error", "not a regular file")
        if info.st_size > max_bytes:
            return Failed("too_large", f"file of {info.st_size} bytes, more than {max_bytes}")
        version = f"{info.st_mtime_ns}-{info.st_size}-{info.st_ino}"
        if validator and validator == version:
            return NotModified()
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        return Failed("file_error", f"cannot read: {exc.strerror}")
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        return Failed("too_large", f"file larger than {max_bytes} bytes")
    return Body(data, http_etag=version)


async def download(client: httpx.AsyncClient, uri: str, runtime: Runtime | None,
                   options: FetchOptions) -> Body | NotModified | Failed:
    """GET one source: conditional on the last good answer's validators, at most MAX_REDIRECTS hops to
    http(s) URLs, the body read in chunks and abandoned past `max_bytes`, all within the deadline."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        path = urllib.parse.unquote(parts.path)
        try:
            async with asyncio.timeout(options.deadline_seconds):
                return await asyncio.to_thread(_read_file, path, options.max_bytes,
                                               runtime.http_etag if runtime else "")
        except TimeoutError:
            return Failed("timeout", f"file not read within {options.deadline_seconds:g}s")
    headers = {"Accept": "application/pkix-crl, application/x-pem-file;q=0.9, */*;q=0.5",
               # A compressed body could expand past the bound in one chunk; CRLs are served as is.
               "Accept-Encoding": "identity"}
    if runtime is not None and runtime.http_etag:
        headers["If-None-Match"] = runtime.http_etag
    if runtime is not None and runtime.last_modified:
        headers["If-Modified-Since"] = runtime.last_modified
    url = uri
    try:
        async with asyncio.timeout(options.deadline_seconds):
            for hops in range(schedule.MAX_REDIRECTS + 1):
                async with client.stream("GET", url, headers=headers) as response:
                    if response.status_code in _REDIRECTS:
                        target = schedule.redirect_target(url, response.headers.get("location", ""), hops)
                        if isinstance(target, Failed):
                            return target
                        url = target
                        continue
                    if response.status_code != 200:
                        return schedule.http_outcome(response.status_code, response.headers, b"")
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > options.max_bytes:
                        return Failed("too_large", f"Content-Length {length}, more than {options.max_bytes} bytes")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > options.max_bytes:
                            return Failed("too_large", f"response larger than {options.max_bytes} bytes")
                        chunks.append(chunk)
                    return schedule.http_outcome(200, response.headers, b"".join(chunks))
            return Failed("too_many_redirects", f"more than {schedule.MAX_REDIRECTS} redirects")
    except TimeoutError:
        return Failed("timeout", f"no complete answer within {options.deadline_seconds:g}s")
    except httpx.TimeoutException as exc:
        return Failed("timeout", f"{type(exc).__name__}")
    except httpx.ConnectError as exc:
        return Failed("connect_error", _scrub(str(exc) or type(exc).__name__, uri))
    except httpx.HTTPError as exc:
        return Failed("http_error", f"{type(exc).__name__}: {_scrub(str(exc), uri)}")


# ---------------------------------------------------------------- the task


class CrlFetcher:
    """Keeps every source of every stored TrustConfig fresh. Its memory (`Runtime` per source) is what
    status shows besides the stored CRL; it starts empty after a restart (the CRLs themselves are stored)."""

    def __init__(self, store: Store, writer: Writer, options: FetchOptions | None = None, *,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random) -> None:
        self.store = store
        self.writer = writer
        self.options = options or FetchOptions()
        self.clock = clock
        self.rand = rand
        self.runtime: dict[tuple[str, str], Runtime] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[str]] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._semaphore: asyncio.Semaphore | None = None
        _AGES.fetchers.add(self)

    # ---------------------------------------------------------- lifecycle

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            o = self.options
            self._client = httpx.AsyncClient(
                follow_redirects=False,  # followed by hand: each hop is checked (schedule.redirect_target)
                timeout=httpx.Timeout(connect=o.connect_timeout_seconds, read=o.read_timeout_seconds,
                                      write=o.read_timeout_seconds, pool=o.connect_timeout_seconds),
                headers={"User-Agent": "mtlsgate-crl-fetcher"},
            )
        return self._client

    def start(self) -> None:
        """Run in the background on the current event loop until `close()`."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        wake = self._wake

        def on_write(_revision: int) -> None:  # may run on another thread (store writers)
            loop.call_soon_threadsafe(wake.set)

        self._unsubscribe = self.store.subscribe(on_write)
        self._task = loop.create_task(self._run(), name="crl-fetcher")

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks = [t for t in [self._task, *self._inflight.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def sources(self) -> list[Source]:
        return [s for tc in self.store.state().trust_configs.values() for s in schedule.sources_of(tc)]

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            now = self.clock()
            sources = self.sources()
            keys = {s.key for s in sources}
            for key in [k for k in self.runtime if k not in keys]:
                del self.runtime[key]
            for source in sources:
                rt = self.runtime.setdefault(source.key, schedule.first_runtime(now))
                if rt.next_attempt <= now and source.key not in self._inflight:
                    task = asyncio.create_task(self.refresh(source), name=f"crl-fetch {source.trust_config}")
                    self._inflight[source.key] = task
                    task.add_done_callback(functools.partial(self._done, source.key))
            waiting = [rt.next_attempt for k, rt in self.runtime.items() if k not in self._inflight]
            delay = min(waiting, default=now + 3600) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, delay))

    def _done(self, key: tuple[str, str], _task: object = None) -> None:
        self._inflight.pop(key, None)
        if self._wake is not None:
            self._wake.set()

    # ---------------------------------------------------------- one attempt

    async def refresh(self, source: Source) -> str:
        """Fetch one source now and act on the answer. Returns `new`, `unchanged` or the failure reason."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.options.concurrency)
        async with self._semaphore:
            runtime = self.runtime.get(source.key) or schedule.first_runtime(self.clock())
            tc = self.store.state().trust_configs.get(source.trust_config)
            held = schedule.held_for(tc, source.uri) if tc is not None else None
            # Without a CRL held, a 304 would leave nothing to enforce: ask unconditionally.
            answer = await download(self._http(), source.uri,
                                    runtime if held is not None and held.der_crl else None, self.options)
            now = self.clock()
            if isinstance(answer, NotModified):
                return self._succeeded(source, runtime, now, held, keep_validators=True)
            if isinstance(answer, Failed):
                return self._failed(source, runtime, now, answer)
            der = schedule.crl_der(answer.data)
            if isinstance(der, Failed):
                return self._failed(source, runtime, now, der)
            return await self._decide_and_write(source, runtime, answer, der)

    async def _decide_and_write(self, source: Source, runtime: Runtime, answer: Body, der: bytes) -> str:
        for _ in range(_WRITE_ATTEMPTS):
            now = self.clock()
            tc = self.store.get(source.trust_config)
            if not isinstance(tc, resources_pb2.TrustConfig) or source.uri not in {
                    s.uri for s in schedule.sources_of(tc)}:
                return "gone"  # the source was removed while we fetched it
            held = schedule.held_for(tc, source.uri)
            # Parsing and verifying a large CRL takes a while: off the event loop.
            decision = await asyncio.to_thread(schedule.evaluate, source, der, tc, held, now)
            if isinstance(decision, Failed):
                return self._failed(source, runtime, now, decision)
            if isinstance(decision, Unchanged):
                return self._succeeded(source, runtime, now, held, answer=answer)
            assert isinstance(decision, Accepted)
            try:
                self.writer(schedule.with_status(tc, decision.status), tc.etag)
            except EtagMismatch:
                continue  # someone edited the TrustConfig meanwhile: decide again on their version
            except InvalidResource as exc:
                detail = "; ".join(str(v) for v in exc.violations)[:300]
                return self._failed(source, runtime, now, Failed("store_refused", detail))
            except StoreError as exc:
                return self._failed(source, runtime, now, Failed("store_refused", str(exc)[:300]))
            log.info("new CRL from %s for %s: cRLNumber %s, %d revoked", schedule.shown_uri(source.uri),
                     source.trust_config, decision.status.crl_number, decision.status.revoked_count)
            return self._succeeded(source, runtime, now, decision.status, answer=answer, result="new")
        return self._failed(source, runtime, self.clock(),
                            Failed("write_conflict", f"the TrustConfig kept changing ({_WRITE_ATTEMPTS} tries)"))

    def _succeeded(self, source: Source, runtime: Runtime, now: float,
                   held: resources_pb2.CrlSourceStatus | None, *, answer: Body | None = None,
                   keep_validators: bool = False, result: str = "unchanged") -> str:
        next_update = held.next_update.ToNanoseconds() / 1e9 if held is not None and held.HasField(
            "next_update") else None
        if runtime.failures:
            log.info("CRL source %s for %s recovered after %d failure(s)", schedule.shown_uri(source.uri),
                     source.trust_config, runtime.failures)
        self.runtime[source.key] = schedule.after_success(
            runtime, source, now, next_update, http_etag=answer.http_etag if answer else "",
            last_modified=answer.last_modified if answer else "", keep_validators=keep_validators)
        FETCHES.labels(result).inc()
        return result

    def _failed(self, source: Source, runtime: Runtime, now: float, failure: Failed) -> str:
        if runtime.last_error_reason != failure.reason:
            log.warning("CRL source %s for %s refused (%s): %s; keeping the last good CRL",
                        schedule.shown_uri(source.uri), source.trust_config, failure.reason, failure.message)
        self.runtime[source.key] = schedule.after_failure(runtime, source, now, failure.reason, failure.message,
                                                          self.rand())
        FETCH_FAILURES.labels(failure.reason).inc()
        FETCHES.labels("failed").inc()
        return failure.reason

    # ---------------------------------------------------------- what status shows

    def live_status(self, tc: resources_pb2.TrustConfig) -> None:
        """Fill `tc.crl_source_status` for reading: one entry per source (stored CRL facts plus the live
        schedule and errors), in source order."""
        now = self.clock()
        stored = {s.uri: s for s in tc.crl_source_status}
        entries = []
        for source in schedule.sources_of(tc):
            entry = resources_pb2.CrlSourceStatus()
            held = stored.get(source.uri)
            if held is not None:
                entry.CopyFrom(held)
            entry.trust_store, entry.uri, entry.distribution_point = (source.trust_store, source.uri,
                                                                      source.distribution_point)
            rt = self.runtime.get(source.key)
            if rt is not None:
                for field, value in (("last_attempt_time", rt.last_attempt), ("last_success_time", rt.last_success),
                                     ("next_attempt_time", rt.next_attempt), ("last_error_time", rt.last_error_time),
                                     ("failing_since", rt.failing_since)):
                    if value:
                        getattr(entry, field).FromNanoseconds(int(value * 1e9))
                entry.last_error = rt.last_error
                entry.last_error_reason = rt.last_error_reason
                entry.consecutive_failures = rt.failures
            age = schedule.age_seconds(held, now)
            if age is not None:
                entry.age_seconds = round(age, 3)
            entry.problem = schedule.problem(held, rt, now)
            entries.append(entry)
        del tc.crl_source_status[:]
        tc.crl_source_status.extend(entries)

    def ages(self) -> Iterator[tuple[str, str, float]]:
        now = self.clock()
        for tc in self.store.state().trust_configs.values():
            for status in tc.crl_source_status:
                age = schedule.age_seconds(status, now)
                if age is not None:
                    yield tc.name, schedule.shown_uri(status.uri), age


class _AgeCollector:
    """`mtlsgate_crl_source_age_seconds`: computed at scrape time from each fetcher's held CRLs."""

    def __init__(self) -> None:
        self.fetchers: weakref.WeakSet[CrlFetcher] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("mtlsgate_crl_source_age_seconds",
                                   "Seconds since thisUpdate of the CRL held for a source",
                                   labels=["trust_config", "uri"])
        for fetcher in list(self.fetchers):
            for name, uri, age in fetcher.ages():
                family.add_metric([name, uri], age)
        yield family


_AGES = _AgeCollector()
REGISTRY.register(_AGES)  # type: ignore[arg-type]
