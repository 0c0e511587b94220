"""The agents the coordinator runs over stored content, and what each writes back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.agents.summarizer import summarize
from app.agents.tagger import extract_keywords
from app.agents.tracker import Activity
from app.content import ContentStore
from app.events.envelope import utc_now

__all__ = ["AGENTS", "AgentContext", "record_text"]

CONTENT_TABLES = ("video", "article")


def record_text(record: Mapping[str, Any]) -> str:
    """The text an agent works on: a video's transcript or an article's main text."""
    text = record.get("transcript") or record.get("text") or ""
    return text if isinstance(text, str) else ""


@dataclass
class AgentContext:
    """What agents share during one run: the content store and, loaded once, the corpus."""

    content: ContentStore
    _corpus: list[str] | None = field(default=None, init=False)

    async def corpus(self) -> list[str]:
        if self._corpus is None:
            texts: list[str] = []
            for table in CONTENT_TABLES:
                for record in await self.content.query_table(table, limit=100_000):
                    if text := record_text(record):
                        texts.append(text)
            self._corpus = texts
        return self._corpus


AgentFn = Callable[[AgentContext, Activity, Mapping[str, Any]], Awaitable[dict[str, Any]]]


async def run_tagger(
    context: AgentContext, activity: Activity, record: Mapping[str, Any]
) -> dict[str, Any]:
    text = record_text(record)
    await activity.progress(0.2, "Reading the stored corpus")
    corpus = await context.corpus()
    await activity.progress(0.5, f"Scoring keywords against {len(corpus):,} documents")
    tags = await asyncio.to_thread(extract_keywords, text, corpus, limit=10)
    activity.result = {"tags": tags}
    activity.final_message = f"Tagged: {', '.join(tags[:5])}" if tags else "No keywords found"
    return {"tags": tags, "tagged_at": utc_now()}


async def run_summarizer(
    context: AgentContext, activity: Activity, record: Mapping[str, Any]
) -> dict[str, Any]:
    text = record_text(record)
    await activity.progress(0.3, f"Ranking sentences of {len(text):,} chars")
    sentences = await asyncio.to_thread(summarize, text, max_sentences=3)
    summary = " ".join(sentences)
    activity.result = {"sentences": len(sentences), "summary_length": len(summary)}
    activity.final_message = f"Summarised in {len(sentences)} sentences"
    return {"summary": summary, "summary_sentences": sentences, "summarized_at": utc_now()}


#: Agent name -> what it does. Each returns the fields to merge into the content record.
AGENTS: dict[str, AgentFn] = {"tagger": run_tagger, "summarizer": run_summarizer}

#: The field whose absence makes a record "untagged" for each agent.
PRODUCES = {"tagger": "tags", "summarizer": "summary"}
