"""The coordinator: runs agents over stored content as server-owned jobs.

A run is one coordinator activity (``coordinator_<id>`` in the ``agent`` stream). Its first
event, ``started`` with status ``pending``, holds the request (agents and scope); the job
runner then claims it like an ingest. The run resolves its scope once and records the item
list in the log, reports "Processing video 5/10" before each item, runs each agent on the item
as a child activity, and records every item's outcome. A run taken over after a crash reads
all of that back and goes on with the items not yet done; a child activity the dead process
left running is marked failed. One item failing is recorded and the run goes on; the run ends
with ``{"processed", "failed", "skipped"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import and_, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.agents.tracker import ActivityTracker, agent_event
from app.agents.workers import AGENTS, CONTENT_TABLES, PRODUCES, AgentContext, AgentFn, record_text
from app.content import AGENT_FIELDS, ContentStore
from app.eventlog import Event, EventStore, NewEvent
from app.events.envelope import utc_now
from app.jobs import job_leases
from app.projections.agents import AGENT_STREAM, TERMINAL_STATUSES, agent_activities

__all__ = ["COORDINATOR", "AgentRuns", "InvalidRun", "check_scope"]

logger = logging.getLogger(__name__)

COORDINATOR = "coordinator"
Scope = str | list[str]


class InvalidRun(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def check_scope(agents: Sequence[str], scope: Any) -> Scope:
    """Validate a run request; returns the scope in canonical form."""
    if not agents:
        raise InvalidRun("agent", "name at least one agent")
    for agent in agents:
        if agent not in AGENTS:
            raise InvalidRun(
                "agent", f"unknown agent {agent!r}; known: {', '.join(sorted(AGENTS))}"
            )
    if scope in ("untagged", "all"):
        return str(scope)
    if isinstance(scope, list) and scope and len(scope) <= 10_000:
        for item in scope:
            table, _, key = item.partition(":") if isinstance(item, str) else ("", "", "")
            if table not in CONTENT_TABLES or not key:
                raise InvalidRun(
                    "scope",
                    "scope items must be content ids like 'video:<id>' or 'article:<key>', "
                    f"got {item!r}",
                )
        return list(dict.fromkeys(scope))
    raise InvalidRun("scope", "scope must be 'untagged', 'all' or a non-empty list of content ids")


def _kind(item: str) -> str:
    return item.partition(":")[0]


class AgentRuns:
    """Starting runs, and the ``agent_run`` job kind that executes them."""

    name = "agent_run"
    projection = "agents"

    def __init__(
        self,
        store: EventStore,
        engine: AsyncEngine,
        tracker: ActivityTracker,
        content: ContentStore,
        *,
        concurrency: int = 2,
        agents: Mapping[str, AgentFn] = AGENTS,
    ) -> None:
        self._store = store
        self._engine = engine
        self._tracker = tracker
        self._content = content
        self._agents = agents
        self.concurrency = concurrency

    def run_request(
        self, agents: Sequence[str], scope: Any, trigger: dict[str, Any] | None = None
    ) -> tuple[str, NewEvent]:
        """A new run's id and its first event (to append, possibly with other events)."""
        scope = check_scope(agents, scope)
        run_id = f"{COORDINATOR}_{uuid.uuid4().hex[:16]}"
        what = f"{len(scope)} item(s)" if isinstance(scope, list) else f"{scope} content"
        event = agent_event(
            run_id,
            "started",
            COORDINATOR,
            {
                "status": "pending",
                "message": f"Queued: {', '.join(agents)} over {what}",
                "progress": 0.0,
                "run": {"agents": list(agents), "scope": scope, "trigger": trigger},
            },
            expected_version=0,
        )
        return run_id, event

    async def start_run(
        self, agents: Sequence[str], scope: Any, trigger: dict[str, Any] | None = None
    ) -> str:
        run_id, event = self.run_request(agents, scope, trigger)
        await self._store.append_one(event)
        return run_id

    def wants(self, event: Event) -> bool:
        return event.event == "started" and event.source_id.startswith(f"{COORDINATOR}_")

    async def candidates(self, limit: int, now_ms: int) -> list[str]:
        query = (
            select(agent_activities.c.source_id)
            .select_from(
                agent_activities.outerjoin(
                    job_leases, job_leases.c.job_id == agent_activities.c.source_id
                )
            )
            .where(
                and_(
                    agent_activities.c.agent_name == COORDINATOR,
                    not_(agent_activities.c.status.in_(TERMINAL_STATUSES)),
                    or_(job_leases.c.job_id.is_(None), job_leases.c.expires_at < now_ms),
                )
            )
            .order_by(agent_activities.c.position)
            .limit(limit)
        )
        async with self._engine.connect() as connection:
            return [row[0] for row in (await connection.execute(query)).all()]

    async def run(self, job_id: str) -> None:
        events = await self._store.read_source(AGENT_STREAM, job_id)
        if not events or events[-1].event in ("complete", "failed"):
            return
        spec = events[0].payload_dict().get("run") or {}
        agents = [agent for agent in spec.get("agents", []) if agent in self._agents]
        items: list[str] | None = None
        done: dict[tuple[str, str], str] = {}
        in_flight: str | None = None
        for event in events[1:]:
            payload = event.payload_dict()
            if isinstance(payload.get("items"), list):
                items = payload["items"]
            if "child" in payload:
                in_flight = payload["child"]
            if "item_done" in payload:
                done[(payload["agent"], payload["item_done"])] = payload["outcome"]
                in_flight = None
        beating = asyncio.create_task(self._beat(job_id))
        try:
            await self._run(job_id, agents, spec.get("scope"), items, done, in_flight)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    async def _beat(self, run_id: str) -> None:
        while True:
            await asyncio.sleep(self._tracker.heartbeat_seconds)
            with contextlib.suppress(Exception):
                await self._tracker.heartbeat(run_id, COORDINATOR)

    async def _run(
        self,
        run_id: str,
        agents: list[str],
        scope: Any,
        items: list[str] | None,
        done: dict[tuple[str, str], str],
        in_flight: str | None,
    ) -> None:
        progress = self._tracker.update_activity
        if items is None:
            items = await self._resolve(agents, scope)
            await progress(
                run_id,
                COORDINATOR,
                progress=0.0,
                message=f"Found {len(items)} item(s) for {', '.join(agents)}",
                items=items,
            )
        else:
            total = len(items) * len(agents)
            await progress(
                run_id,
                COORDINATOR,
                progress=len(done) / total if total else 0.0,
                message=f"Resuming after an interruption: {len(done)}/{total} already done",
                resumed=True,
            )
            if in_flight is not None:
                await self._tracker.fail_activity(
                    in_flight,
                    in_flight.partition("_")[0],
                    error="Interrupted: the coordinator stopped before this finished; retrying",
                )
        counts = {"processed": 0, "failed": 0, "skipped": 0}
        for outcome in done.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        total = len(items) * len(agents)
        context = AgentContext(self._content)
        step = 0
        for index, item in enumerate(items, start=1):
            for agent in agents:
                step += 1
                if (agent, item) in done:
                    continue
                child = f"{agent}_{uuid.uuid4().hex[:16]}"
                label = f"Processing {_kind(item)} {index}/{len(items)}"
                await progress(
                    run_id,
                    COORDINATOR,
                    progress=(step - 1) / total,
                    message=label if len(agents) == 1 else f"{label} ({agent})",
                    item=item,
                    agent=agent,
                    child=child,
                )
                outcome = await self._process(context, agent, item, child, run_id)
                counts[outcome] += 1
                await progress(
                    run_id,
                    COORDINATOR,
                    progress=step / total,
                    message=f"{agent} {outcome} {item}",
                    item_done=item,
                    agent=agent,
                    outcome=outcome,
                )
        await self._tracker.complete_activity(
            run_id,
            COORDINATOR,
            message=(
                f"Processed {counts['processed']}, failed {counts['failed']}, "
                f"skipped {counts['skipped']}"
            ),
            result=counts,
        )

    async def _resolve(self, agents: Sequence[str], scope: Any) -> list[str]:
        if isinstance(scope, list):
            return list(scope)
        found: list[str] = []
        for table in CONTENT_TABLES:
            if scope == "all":
                records = await self._content.query_table(table, limit=100_000)
                found.extend(f"{table}:{_key(record)}" for record in records)
                continue
            seen: set[str] = set()
            for agent in agents:
                for record in await self._content.query_table(
                    table, where_missing=PRODUCES[agent], limit=100_000
                ):
                    item = f"{table}:{_key(record)}"
                    if item not in seen:
                        seen.add(item)
                        found.append(item)
        return found

    async def _process(
        self, context: AgentContext, agent: str, item: str, child: str, run_id: str
    ) -> str:
        table, _, key = item.partition(":")
        record = await self._content.get(table, key)
        text = record_text(record) if record else ""
        if record is None or not text:
            activity = await self._tracker.register_activity(
                agent, source_id=child, message=f"{agent} on {item}", item=item, run=run_id
            )
            reason = "not stored" if record is None else "no text"
            await self._tracker.complete_activity(
                activity.source_id,
                agent,
                message=f"Skipped {item}: {reason}",
                result={"skipped": reason},
            )
            return "skipped"
        try:
            async with self._tracker.track(
                agent, source_id=child, message=f"{agent} on {item}", item=item, run=run_id
            ) as activity:
                fields = await self._agents[agent](context, activity, record)
                # The item names the activity that wrote it, so a reader can go to its log.
                fields[AGENT_FIELDS.get(agent, f"{agent}_run")] = {
                    "source_id": child,
                    "run_id": run_id,
                    "at": utc_now(),
                }
                await self._content.merge(table, key, fields)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("%s failed on %s", agent, item, exc_info=True)
            return "failed"
        return "processed"


def _key(record: Mapping[str, Any]) -> str:
    """A record's key from its ``id`` (``video:abc`` -> ``abc``)."""
    record_id = str(record.get("id", ""))
    return record_id.partition(":")[2] or record_id
