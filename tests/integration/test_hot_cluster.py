"""The hot tier on a clustered Redis, as Azure Managed Redis runs (clustering policy
`EnterpriseCluster`): a script or transaction whose keys hash to different slots is
refused with CROSSSLOT there, whichever shard holds them. A one-node cluster holding
every slot refuses them the same way, so each case here goes through every script the
app runs (records, locks, events, the checkpoint cache, the write-behind log, its
flush and acknowledgement, maintenance) and must end as on a plain server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableConfig

from devstack import ClusterRedisServer, free_port
from state import Settings, TieredCheckpointSaver
from support_cases.models import CaseStatus
from support_cases.service import case_config
from support_cases.settings import AppSettings
from tests.chat_graph import CHECKPOINTS_PER_INVOKE, NODES, chat_graph
from tests.faults.apps import open_runtime, submission


@pytest.fixture(scope="module")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterRedisServer]:
    server = ClusterRedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("cluster"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
async def test_cases_run_on_a_clustered_redis(
    backend: str,
    mode: str,
    cluster_redis: ClusterRedisServer,
    env_for: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    settings = AppSettings.model_validate(
        {
            **{name.lower(): value for name, value in env_for(backend).items()},
            "redis_url": cluster_redis.url,
            "state_write_mode": mode,
        }
    )
    auto, review = f"cluster-auto-{tmp_path.name}", f"cluster-review-{tmp_path.name}"
    async with open_runtime(settings) as app:
        service = app.runtime.service
        await service.submit(submission(auto), None)
        await service.submit(submission(review, amount=750.0), None)
        await service.wait_idle()
        assert (await service.status(review)).status is CaseStatus.AWAITING_REVIEW
        decided = await app.decide(review, "approve", "reviewer")
        assert decided.accepted
        await service.wait_idle()
        for case_id in (auto, review):
            assert (await service.status(case_id)).status is CaseStatus.COMPLETED
            assert app.runtime.backends.events is not None
            assert await app.runtime.backends.events.read(case_id), "no events were appended"
        report = await service.health()
        assert report.status == "ok", report
        if mode == "write-behind":
            # Every entry the runs appended was flushed and acknowledged.
            assert report.backlog is not None and report.backlog.entries == 0, report.backlog
        config = case_config(auto)
        assert await app.runtime.saver.aget_tuple(config) is not None
        await app.runtime.saver.adelete_thread(auto)
        assert await app.runtime.saver.aget_tuple(config) is None


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
def test_the_saver_sync_api_and_maintenance_on_a_clustered_redis(
    backend: str, cluster_redis: ClusterRedisServer, env_for: Callable[..., dict[str, str]]
) -> None:
    settings = Settings.model_validate(
        {
            **{name.lower(): value for name, value in env_for(backend).items()},
            "redis_url": cluster_redis.url,
            "state_write_mode": "write-behind",
        }
    )
    thread, copy = f"cluster-sync-{uuid.uuid4().hex[:8]}", f"cluster-copy-{uuid.uuid4().hex[:8]}"
    config: RunnableConfig = {"configurable": {"thread_id": thread}}
    with TieredCheckpointSaver.open_sync(settings) as saver:
        graph = chat_graph(saver)
        for _ in range(2):
            graph.invoke({"messages": []}, config)
        saver.flush(thread)
        assert len(list(saver.list(config))) == 2 * CHECKPOINTS_PER_INVOKE
        saver.copy_thread(thread, copy)
        saver.prune([thread], strategy="keep_latest")
        assert len(list(saver.list(config))) == 1
        assert len(graph.get_state(config).values["messages"]) == 2 * len(NODES)
        copied = graph.get_state({"configurable": {"thread_id": copy}}).values["messages"]
        assert len(copied) == 2 * len(NODES)
        for thread_id in (thread, copy):
            saver.delete_thread(thread_id)
            assert saver.get_tuple({"configurable": {"thread_id": thread_id}}) is None
