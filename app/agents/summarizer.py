"""Extractive summaries: the sentences most central to a text, ranked TextRank-style.

Sentences are nodes, joined by the cosine similarity of their TF-IDF vectors (idf over the
text's own sentences); PageRank over that graph scores how much each sentence shares with
the rest. Pure and deterministic.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict

from app.agents.text import is_content_word, map_plurals, split_sentences, tokenize

__all__ = ["summarize"]

_MIN_WORDS = 5
_DAMPING = 0.85
_TOLERANCE = 1e-6
_MAX_ITERATIONS = 100
# Each sentence keeps only its strongest links: the top sentences barely change, and the
# graph of a long transcript stays small enough to rank in milliseconds.
_MAX_NEIGHBOURS = 20

Graph = list[dict[int, float]]


def summarize(text: str, *, max_sentences: int = 3) -> list[str]:
    """Up to ``max_sentences`` sentences of ``text``, the most central first chosen, returned
    in their original order.

    Sentences of fewer than five words are not candidates unless there is nothing else, and
    sentences without words never are; a text with no more candidates than ``max_sentences``
    returns them all.
    """
    if max_sentences < 1:
        raise ValueError("max_sentences must be at least 1")
    sentences = split_sentences(text)
    words = [tokenize(sentence) for sentence in sentences]
    candidates = [index for index, found in enumerate(words) if len(found) >= _MIN_WORDS]
    if not candidates:
        candidates = [index for index, found in enumerate(words) if found]
    if len(candidates) <= max_sentences:
        return [sentences[index] for index in candidates]
    vectors = _weigh_terms([words[index] for index in candidates])
    ranks = _rank_nodes(_link_similar(vectors))
    best = heapq.nsmallest(
        max_sentences, range(len(candidates)), key=lambda node: (-ranks[node], node)
    )
    return [sentences[candidates[node]] for node in sorted(best)]


def _weigh_terms(sentences: list[list[str]]) -> list[dict[str, float]]:
    """Unit-length TF-IDF vectors of the sentences' content words, plurals folded."""
    plurals = map_plurals(word for words in sentences for word in words if is_content_word(word))
    counts = [
        Counter(plurals[word] for word in words if is_content_word(word)) for words in sentences
    ]
    frequencies: Counter[str] = Counter()
    for found in counts:
        frequencies.update(found.keys())
    total = len(sentences)
    vectors: list[dict[str, float]] = []
    for found in counts:
        vector = {
            term: (1.0 + math.log(count)) * (math.log((1 + total) / (1 + frequencies[term])) + 1.0)
            for term, count in found.items()
        }
        norm = math.sqrt(sum(weight * weight for weight in vector.values()))
        vectors.append({term: weight / norm for term, weight in vector.items()})
    return vectors


def _link_similar(vectors: list[dict[str, float]]) -> Graph:
    """Cosine similarities between sentences sharing a term, each sentence keeping its
    strongest links (a link kept by either end is kept by both)."""
    postings: defaultdict[str, list[tuple[int, float]]] = defaultdict(list)
    for node, vector in enumerate(vectors):
        for term, weight in vector.items():
            postings[term].append((node, weight))
    similarities: list[defaultdict[int, float]] = [defaultdict(float) for _ in vectors]
    for posting in postings.values():
        for position, (node, weight) in enumerate(posting):
            for other, other_weight in posting[position + 1 :]:
                similarities[node][other] += weight * other_weight
                similarities[other][node] += weight * other_weight
    graph: Graph = [{} for _ in vectors]
    for node, linked in enumerate(similarities):
        for other, _ in heapq.nlargest(
            _MAX_NEIGHBOURS, linked.items(), key=lambda item: (item[1], -item[0])
        ):
            graph[node][other] = graph[other][node] = linked[other]
    return graph


def _rank_nodes(graph: Graph) -> list[float]:
    """Weighted PageRank by power iteration; a sentence linked to nothing spreads its rank
    evenly, as a random reader would jump anywhere from it."""
    size = len(graph)
    totals = [sum(links.values()) for links in graph]
    ranks = [1.0 / size] * size
    for _ in range(_MAX_ITERATIONS):
        stranded = sum(rank for rank, total in zip(ranks, totals, strict=True) if not total)
        base = (1.0 - _DAMPING) / size + _DAMPING * stranded / size
        updated = [base] * size
        for node, links in enumerate(graph):
            if not totals[node]:
                continue
            share = _DAMPING * ranks[node] / totals[node]
            for other, weight in links.items():
                updated[other] += share * weight
        change = sum(abs(new - old) for new, old in zip(updated, ranks, strict=True))
        ranks = updated
        if change < _TOLERANCE:
            break
    return ranks
