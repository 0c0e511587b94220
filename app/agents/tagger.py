"""Keywords for a transcript or article: TF-IDF of its words and two-word phrases against the
stored corpus.

Pure and deterministic: the same text and corpus always give the same keywords, in the same
order.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from app.agents.text import is_content_word, list_singulars, map_plurals, split_phrases

__all__ = ["extract_keywords"]

# A phrase seen once is as likely an accident of word order as a name for something.
_MIN_PHRASE_COUNT = 2
# A phrase replaces one of its words when it accounts for more than half of that word's uses
# and scores at least this fraction of it ("fog signal" over "signal").
_COMPARABLE_SCORE = 0.75
# Agents run in worker threads, so the cache of corpus terms takes a lock.
_CORPUS_CACHE_SIZE = 256
_TERMS_CACHE: OrderedDict[bytes, frozenset[str]] = OrderedDict()
_TERMS_LOCK = threading.Lock()


def extract_keywords(text: str, corpus: Sequence[str], *, limit: int = 10) -> list[str]:
    """The ``limit`` most distinctive words and two-word phrases of ``text``, best first.

    Each term scores ``(1 + ln tf) * (ln((1 + N) / (1 + df)) + 1)``, where ``df`` counts the
    documents of ``corpus`` (plus ``text`` itself when it is not one of them) that use the
    term. Plurals merge into a singular used in the same text and a keyword is reported in
    its most frequent form. Stopwords never start or end a phrase, and a phrase that scores
    comparably to one of its words replaces that word, so "fog signal" does not come with
    "signal" as well. Ties are broken alphabetically.
    """
    if limit <= 0:
        return []
    counts, surfaces = _count_terms(text)
    if not counts:
        return []
    documents = list(corpus)
    if text not in documents:
        documents.append(text)
    frequencies = _count_documents(documents, _map_variants(counts, surfaces))
    weights = {
        term: math.log((1 + len(documents)) / (1 + frequencies[term])) + 1.0 for term in counts
    }
    ranked = _rank_terms(counts, weights)
    return [_choose_surface(surfaces[term]) for term in _select_terms(ranked, limit)]


def _count_terms(text: str) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Counts of the text's terms (singular-folded words and phrases, the phrases seen at
    least twice), and for each term how often each surface form was used."""
    phrases = _blank_stopwords(text)
    plurals = map_plurals(word for phrase in phrases for word in phrase if word)
    surfaces: dict[str, Counter[str]] = {}
    counts: Counter[str] = Counter()
    for surface in _iterate_terms(phrases):
        term = " ".join(plurals[word] for word in surface.split(" "))
        counts[term] += 1
        surfaces.setdefault(term, Counter())[surface] += 1
    for term in [term for term, count in counts.items() if " " in term]:
        if counts[term] < _MIN_PHRASE_COUNT:
            del counts[term]
            del surfaces[term]
    return counts, surfaces


def _iterate_terms(phrases: Iterable[list[str]]) -> Iterator[str]:
    """Content words, then pairs of adjacent content words, as they are written; an empty
    string stands for a stopword, which breaks a pair."""
    for phrase in phrases:
        for index, word in enumerate(phrase):
            if not word:
                continue
            yield word
            if index + 1 < len(phrase) and phrase[index + 1]:
                yield f"{word} {phrase[index + 1]}"


def _collect_terms(document: str) -> frozenset[str]:
    """Every word and phrase a corpus document uses, as written.

    Cached, because the same stored corpus is read again for each document tagged; keyed by
    a digest so that the cache does not keep whole transcripts alive.
    """
    key = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    with _TERMS_LOCK:
        terms = _TERMS_CACHE.get(key)
        if terms is not None:
            _TERMS_CACHE.move_to_end(key)
            return terms
    terms = frozenset(_iterate_terms(_blank_stopwords(document)))
    with _TERMS_LOCK:
        _TERMS_CACHE[key] = terms
        if len(_TERMS_CACHE) > _CORPUS_CACHE_SIZE:
            _TERMS_CACHE.popitem(last=False)
    return terms


def _blank_stopwords(text: str) -> list[list[str]]:
    """The text's runs of words, with an empty string in place of each stopword."""
    return [
        [word if is_content_word(word) else "" for word in phrase] for phrase in split_phrases(text)
    ]


def _map_variants(counts: Counter[str], surfaces: dict[str, Counter[str]]) -> dict[str, str]:
    """Map the forms a corpus document may use for each term back to the term: the forms seen
    in the text, and the term's last word with the plural added or taken away."""
    variants: dict[str, str] = {}
    for term in counts:
        head, _, last = term.rpartition(" ")
        prefix = f"{head} " if head else ""
        for form in (*_list_plurals(last), *list_singulars(last)):
            variants.setdefault(prefix + form, term)
    # Forms actually used in the text win over guessed ones.
    for term in counts:
        for surface in (term, *surfaces[term]):
            variants[surface] = term
    return variants


def _list_plurals(word: str) -> tuple[str, ...]:
    if word.endswith("y") and len(word) > 2:
        return (word + "s", word[:-1] + "ies")
    return (word + "s", word + "es")


def _count_documents(documents: Iterable[str], variants: dict[str, str]) -> Counter[str]:
    frequencies: Counter[str] = Counter()
    forms = variants.keys()
    for document in documents:
        frequencies.update({variants[form] for form in forms & _collect_terms(document)})
    return frequencies


def _rank_terms(counts: Counter[str], weights: dict[str, float]) -> list[str]:
    """Terms best first by sublinear tf times idf. A phrase that replaces one of its words
    takes over that word's other uses too ("selection" alone, after "natural selection"), as
    it names the same thing."""
    uses = dict(counts)
    replaced: set[str] = set()
    for phrase in (term for term in counts if " " in term):
        for word in set(phrase.split(" ")):
            if 2 * counts[phrase] > counts[word] and _score(
                counts[phrase], weights[phrase]
            ) >= _COMPARABLE_SCORE * _score(counts[word], weights[word]):
                replaced.add(word)
                uses[phrase] += counts[word] - counts[phrase]
    scores = {term: _score(uses[term], weights[term]) for term in uses if term not in replaced}
    return sorted(scores, key=lambda term: (-scores[term], term))


def _score(count: int, weight: float) -> float:
    return (1.0 + math.log(count)) * weight


def _select_terms(ranked: Iterable[str], limit: int) -> list[str]:
    """The first ``limit`` terms, never a phrase together with both of its words."""
    selected: list[str] = []
    chosen: set[str] = set()
    for term in ranked:
        if " " in term:
            words = set(term.split(" "))
            if words <= chosen:
                continue
        elif any(
            " " in other and term in other.split(" ") and set(other.split(" ")) - {term} <= chosen
            for other in selected
        ):
            continue
        selected.append(term)
        chosen.add(term)
        if len(selected) == limit:
            break
    return selected


def _choose_surface(forms: Counter[str]) -> str:
    # Counter keeps first-seen order, and max() keeps the first of equals.
    return max(forms.items(), key=lambda item: item[1])[0]
