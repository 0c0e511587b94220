"""The summarizer's extractive summaries on real text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.agents.summarizer import summarize
from app.agents.text import split_sentences

TEXTS = Path(__file__).parent.parent / "fixtures" / "texts"
DARWIN = (TEXTS / "darwin_origin_introduction.txt").read_text(encoding="utf-8")
TRANSCRIPT = (TEXTS / "lighthouse_lecture_transcript.txt").read_text(encoding="utf-8")

CENTRAL = (
    "In considering the Origin of Species, it is quite conceivable that a naturalist, "
    "reflecting on the mutual affinities of organic beings, on their embryological relations, "
    "their geographical distribution, geological succession, and other such facts, might come "
    "to the conclusion that each species had not been independently created, but had "
    "descended, like varieties, from other species."
)
OFF_TOPIC = "The bakery on the corner sells warm croissants every Tuesday morning."
OFF_TOPIC_SPOKEN = (
    "so anyway my cousin bakes sourdough bread every sunday with rye flour and honey and the "
    "whole kitchen smells wonderful for hours"
)


def assert_extracted(summary: list[str], text: str) -> None:
    """Every summary sentence is a sentence of the text, in the text's order."""
    sentences = split_sentences(text)
    positions = [sentences.index(sentence) for sentence in summary]
    assert positions == sorted(set(positions))


def with_planted_paragraph(text: str, paragraph: str, after: int) -> str:
    paragraphs = text.split("\n\n")
    return "\n\n".join([*paragraphs[:after], paragraph, *paragraphs[after:]])


def test_darwin_summary_picks_the_central_sentence() -> None:
    summary = summarize(DARWIN)

    assert len(summary) == 3
    assert_extracted(summary, DARWIN)
    assert CENTRAL in summary
    assert summarize(DARWIN, max_sentences=1) == [CENTRAL]


def test_darwin_summary_is_not_the_opening() -> None:
    summary = summarize(DARWIN)

    opening = [sentence for sentence in split_sentences(DARWIN) if len(sentence.split()) >= 5]
    assert summary != opening[:3]
    assert not any("H.M.S. 'Beagle,'" in sentence for sentence in summary)


@pytest.mark.parametrize("max_sentences", [1, 2, 3, 5, 8])
def test_an_off_topic_sentence_is_never_chosen(max_sentences: int) -> None:
    for after in (1, 5, 12):
        text = with_planted_paragraph(DARWIN, OFF_TOPIC, after)

        summary = summarize(text, max_sentences=max_sentences)

        assert len(summary) == max_sentences
        assert OFF_TOPIC not in summary
        assert_extracted(summary, text)


def test_transcript_summary_is_made_of_chunks_about_the_subject() -> None:
    summary = summarize(TRANSCRIPT)

    assert len(summary) == 3
    assert_extracted(summary, TRANSCRIPT)
    assert summary != split_sentences(TRANSCRIPT)[:3]
    for chunk in summary:
        assert {"lighthouse", "lighthouses", "fog", "lens", "light"} & set(chunk.split()), chunk
    assert any("fog signal" in chunk for chunk in summary)


@pytest.mark.parametrize("max_sentences", [1, 3, 5])
def test_an_off_topic_passage_in_a_transcript_is_never_chosen(max_sentences: int) -> None:
    text = TRANSCRIPT.replace(
        "switched on and off so you get", f"switched on and off {OFF_TOPIC_SPOKEN} so you get"
    )
    assert text != TRANSCRIPT

    summary = summarize(text, max_sentences=max_sentences)

    assert len(summary) == max_sentences
    assert not any("sourdough" in chunk for chunk in summary)
    assert_extracted(summary, text)


def test_short_sentences_are_not_candidates() -> None:
    text = (
        "Fog signals warned ships away from the rocks. Fog! Fog signals! "
        "The keepers sounded the fog signals for hours. Ships listened for the fog signals. "
        "A fog signal has its own pattern of blasts."
    )

    summary = summarize(text, max_sentences=2)

    assert len(summary) == 2
    assert not {"Fog!", "Fog signals!"} & set(summary)


def test_a_text_with_few_candidates_returns_them_all_in_order() -> None:
    text = "The lens gathers the light into a beam. Yes. The beam can be seen for twenty miles."

    assert summarize(text) == [
        "The lens gathers the light into a beam.",
        "The beam can be seen for twenty miles.",
    ]


def test_a_text_of_short_sentences_returns_them() -> None:
    assert summarize("Fog came in. The horn sounded. Ships waited.") == [
        "Fog came in.",
        "The horn sounded.",
        "Ships waited.",
    ]


def test_one_sentence() -> None:
    assert summarize("  The keeper wound the clockwork by hand  ") == [
        "The keeper wound the clockwork by hand"
    ]


@pytest.mark.parametrize("text", ["", "   \n\n  ", "...", "1859"])
def test_empty_text_has_an_empty_summary(text: str) -> None:
    assert summarize(text) == []


def test_unicode_text() -> None:
    text = (
        "Der Leuchtturm von Ouessant steht auf einer Insel im Meer. "
        "Die Stra\u00dfe zum Leuchtturm f\u00fchrt \u00fcber die Insel. "
        "Im Caf\u00e9 am Hafen trinkt man Kaffee und isst Kuchen. "
        "Der Leuchtturm leuchtet jede Nacht \u00fcber das Meer und die Insel. "
        "Ein Leuchtturm auf einer Insel warnt die Schiffe im Meer."
    )

    summary = summarize(text, max_sentences=2)

    assert_extracted(summary, text)
    assert all("Leuchtturm" in sentence for sentence in summary)


def test_a_transcript_without_punctuation_still_gets_a_summary() -> None:
    words = TRANSCRIPT.split()[:200]

    summary = summarize(" ".join(words), max_sentences=2)

    assert len(summary) == 2
    assert all(15 <= len(chunk.split()) <= 35 for chunk in summary)


def test_max_sentences_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        summarize(DARWIN, max_sentences=0)


def test_the_same_input_gives_the_same_summary() -> None:
    assert summarize(DARWIN) == summarize(DARWIN)
    assert summarize(TRANSCRIPT, max_sentences=5) == summarize(TRANSCRIPT, max_sentences=5)


def test_summaries_do_not_depend_on_string_hashing() -> None:
    script = (
        "import json, sys\n"
        "from app.agents.summarizer import summarize\n"
        "texts = json.load(sys.stdin)\n"
        "print(json.dumps([summarize(text, max_sentences=5) for text in texts]))\n"
    )

    results = {
        subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps([DARWIN, TRANSCRIPT]),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).parent.parent.parent,
        ).stdout
        for seed in ("1", "2", "3")
    }

    assert len(results) == 1
    expected = [summarize(DARWIN, max_sentences=5), summarize(TRANSCRIPT, max_sentences=5)]
    assert json.loads(results.pop()) == expected
