"""Settings -> backends -> store, saver, graph and service: built once per process."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver

from state import (
    Backends,
    TieredCheckpointSaver,
    TieredStateStore,
    open_backends,
)

from .agents import AgentDeps, StepHook
from .effects import Effects, SimulatedProvider
from .events import CaseEvents
from .graph import CaseGraph, build_graph
from .metrics import BacklogSampler, app_metrics
from .service import CaseService
from .settings import AppSettings, get_app_settings
from .telemetry import configure_telemetry


@dataclass
class Runtime:
    settings: AppSettings
    backends: Backends
    store: TieredStateStore
    saver: BaseCheckpointSaver[Any]
    graph: CaseGraph
    provider: SimulatedProvider
    service: CaseService
    # Write-behind mode: keeps the backlog gauges' reading fresh.
    backlog_sampler: BacklogSampler | None = None

    @classmethod
    async def open(cls, settings: AppSettings, *, after_step: StepHook | None = None) -> Runtime:
        configure_telemetry(settings)
        backends = await open_backends(settings)
        try:
            saver = TieredCheckpointSaver.from_backends(backends)
            return cls.assemble(settings, backends, saver, after_step=after_step)
        except BaseException:
            await backends.close()
            raise

    @classmethod
    def assemble(
        cls,
        settings: AppSettings,
        backends: Backends,
        saver: BaseCheckpointSaver[Any],
        *,
        after_step: StepHook | None = None,
    ) -> Runtime:
        """Wire the app over open backends and a checkpoint saver (`after_step`: tests only)."""
        store = TieredStateStore.from_backends(backends)
        provider = SimulatedProvider(store)
        graph = build_graph(
            AgentDeps(
                store,
                Effects(
                    store,
                    provider,
                    lease_seconds=settings.state_lock_ttl_ms / 1000,
                    call_timeout_seconds=settings.case_effect_timeout_seconds,
                ),
                settings,
                after_step,
            ),
            saver,
        )
        service = CaseService(
            store,
            graph,
            settings,
            backends.retention,
            saver if isinstance(saver, TieredCheckpointSaver) else None,
            CaseEvents(
                backends.events,
                max_streams=settings.case_max_event_streams,
                max_streams_per_caller=settings.case_max_event_streams_per_caller,
            ),
        )
        app_metrics.register_backends(backends, store)
        app_metrics.register_run_slots(service.run_slots)
        if isinstance(saver, TieredCheckpointSaver) and backends.flusher is not None:
            app_metrics.register_losses(lambda: saver.losses_found)
        sampler = None
        if backends.flusher is not None:
            sampler = BacklogSampler(backends.flusher.backlog)
            sampler.start()
            app_metrics.register_backlog_source(sampler.latest)
        return cls(settings, backends, store, saver, graph, provider, service, sampler)

    async def close(self) -> None:
        app_metrics.register_losses(None)
        app_metrics.register_run_slots(None)
        if self.backlog_sampler is not None:
            app_metrics.register_backlog_source(None)
            await self.backlog_sampler.stop()
        await self.service.close()
        await self.store.close()
        await self.backends.close()


class RuntimeHolder:
    """The process's one Runtime, opened on first use (HTTP and timer functions share it)."""

    def __init__(
        self,
        settings: Callable[[], AppSettings] = get_app_settings,
        *,
        after_step: StepHook | None = None,
        freeze_when_open: bool = False,
    ) -> None:
        self._settings = settings
        self._after_step = after_step
        self._freeze_when_open = freeze_when_open
        self._runtime: Runtime | None = None
        self._opening = asyncio.Lock()

    def settings(self) -> AppSettings:
        return self._runtime.settings if self._runtime else self._settings()

    async def get(self) -> Runtime:
        if self._runtime is None:
            async with self._opening:
                if self._runtime is None:
                    self._runtime = await Runtime.open(
                        self._settings(), after_step=self._after_step
                    )
                    if self._freeze_when_open:
                        # What the process holds by now (modules, clients, compiled graphs:
                        # ~200,000 objects) lives as long as the runtime. Frozen, a full
                        # collection no longer walks it: otherwise a ~100 ms pause every
                        # ~80 cases (measured), in whichever request triggers it.
                        gc.freeze()
        return self._runtime

    async def close(self) -> None:
        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            await runtime.close()
            if self._freeze_when_open:
                gc.unfreeze()


process_runtime = RuntimeHolder(freeze_when_open=True)
