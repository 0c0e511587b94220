"""Sentences, words and stopwords: the plumbing both text agents stand on."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.agents.text import (
    STOPWORDS,
    is_content_word,
    map_plurals,
    split_phrases,
    split_sentences,
    tokenize,
)

TEXTS = Path(__file__).parent.parent / "fixtures" / "texts"
DARWIN = (TEXTS / "darwin_origin_introduction.txt").read_text(encoding="utf-8")
TRANSCRIPT = (TEXTS / "lighthouse_lecture_transcript.txt").read_text(encoding="utf-8")


def test_abbreviations_initials_and_dotted_acronyms_do_not_end_a_sentence() -> None:
    text = (
        "Mr. Wallace sent a memoir to Sir C. Lyell, who read it. Dr. Hooker had seen the "
        "sketch, e.g. in 1844, and the U.S. Navy kept a copy, etc. in its library. It was short."
    )

    assert split_sentences(text) == [
        "Mr. Wallace sent a memoir to Sir C. Lyell, who read it.",
        "Dr. Hooker had seen the sketch, e.g. in 1844, and the U.S. Navy kept a copy, etc. in "
        "its library.",
        "It was short.",
    ]


def test_an_abbreviation_followed_by_a_capitalised_function_word_ends_the_sentence() -> None:
    assert split_sentences("He moved to the U.S. The weather was better. So did I. It was.") == [
        "He moved to the U.S.",
        "The weather was better.",
        "So did I.",
        "It was.",
    ]


def test_decimals_do_not_end_a_sentence() -> None:
    assert split_sentences("The lens weighs 3.5 tons. It floats on 0.25 tons of mercury.") == [
        "The lens weighs 3.5 tons.",
        "It floats on 0.25 tons of mercury.",
    ]


def test_closing_quotes_stay_with_their_sentence() -> None:
    text = (
        "\u201cYou learn the sound of your own horn the way you learn a voice,\u201d one keeper "
        "wrote in 1931. \u201cOn a thick night it comes back to you off the cliffs.\u201d "
        "'Was it lifting?' he asked. \"Fog!\" she shouted. Everyone ran."
    )

    assert split_sentences(text) == [
        "\u201cYou learn the sound of your own horn the way you learn a voice,\u201d one keeper "
        "wrote in 1931.",
        "\u201cOn a thick night it comes back to you off the cliffs.\u201d",
        "'Was it lifting?' he asked.",
        '"Fog!" she shouted.',
        "Everyone ran.",
    ]


def test_question_marks_exclamations_and_ellipses() -> None:
    assert split_sentences(
        "Who can explain it? Nobody! Wait... what then. It ends\u2026 Here."
    ) == [
        "Who can explain it?",
        "Nobody!",
        "Wait... what then.",
        "It ends\u2026",
        "Here.",
    ]


def test_paragraphs_and_headings_end_sentences_but_wrapped_lines_do_not() -> None:
    text = (
        "An accidental archive\n"
        "Nobody at the time thought of the logs as science, and Sir C.\n"
        "Lyell never read\n"
        "them.\n"
        "\n"
        "Reading the handwriting\n"
        "Transcribing the logs is slow work\n"
        "\n"
        "The detectors took over"
    )

    assert split_sentences(text) == [
        "An accidental archive",
        "Nobody at the time thought of the logs as science, and Sir C. Lyell never read them.",
        "Reading the handwriting",
        "Transcribing the logs is slow work",
        "The detectors took over",
    ]


def test_the_darwin_introduction_splits_into_its_sentences() -> None:
    sentences = split_sentences(DARWIN)

    assert sentences[0] == "INTRODUCTION."
    assert sentences[1].startswith("When on board H.M.S. 'Beagle,' as naturalist, I was")
    assert sentences[-1] == (
        "Furthermore, I am convinced that Natural Selection has been the main but not "
        "exclusive means of modification."
    )
    assert any(sentence.startswith("Sir C. Lyell and Dr. Hooker, who") for sentence in sentences)
    assert any("such as climate, food, etc., as the only" in sentence for sentence in sentences)
    for sentence in sentences[1:]:
        assert sentence[0].isupper(), sentence
        assert sentence.endswith((".", "?")), sentence
    assert len(sentences) == 49


def test_a_transcript_without_punctuation_is_cut_into_chunks_at_pauses() -> None:
    chunks = split_sentences(TRANSCRIPT)

    assert " ".join(chunks).split() == TRANSCRIPT.split()
    assert 25 <= len(chunks) <= 40
    assert all(15 <= len(chunk.split()) <= 35 for chunk in chunks)
    pauses = {"so", "now", "okay", "um", "uh", "but", "because", "and", "then", "or", "which"}
    started_at_pause = [chunk for chunk in chunks if chunk.split()[0] in pauses]
    assert len(started_at_pause) >= 0.9 * len(chunks)


def test_long_punctuated_sentences_are_not_chunked() -> None:
    longest = max(split_sentences(DARWIN), key=lambda sentence: len(sentence.split()))

    assert longest.startswith("In the case of the misseltoe")
    assert len(longest.split()) > 35


def test_a_short_text_without_punctuation_is_one_sentence() -> None:
    assert split_sentences("hello world this is a test") == ["hello world this is a test"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n", "...", "\u2014 !"])
def test_text_without_words_has_no_sentences(text: str) -> None:
    assert split_sentences(text) == []


def test_unicode_sentences() -> None:
    text = (
        "Le phare d\u2019Ouessant \u00e9claire la mer. \u00c7a marche. "
        "\u6771\u4eac\u3067\u3059\u3002 Die Stra\u00dfe endet."
    )

    assert split_sentences(text) == [
        "Le phare d\u2019Ouessant \u00e9claire la mer.",
        "\u00c7a marche.",
        "\u6771\u4eac\u3067\u3059\u3002",
        "Die Stra\u00dfe endet.",
    ]


def test_ideographic_full_stops_end_sentences_without_a_space() -> None:
    assert split_sentences(
        "\u6771\u4eac\u3067\u3059\u3002\u5927\u962a\u3067\u3059\uff01\u300c\u306f\u3044\u3002\u300d"
    ) == [
        "\u6771\u4eac\u3067\u3059\u3002",
        "\u5927\u962a\u3067\u3059\uff01",
        "\u300c\u306f\u3044\u3002\u300d",
    ]


def count_words(text: str) -> list[str]:
    return [word for word in text.split() if any(char.isalnum() for char in word)]


@given(st.text(alphabet=st.sampled_from("ab C.!?\"'\u201d\n \u2026,3"), max_size=300))
def test_splitting_keeps_every_character_run_in_order(text: str) -> None:
    assert count_words(" ".join(split_sentences(text))) == count_words(text)


WORDS = ["Dr.", "U.S.", "The", "fog.", "so", "and", "now", "e.g.", '"Help!"', "3.5", "C.", "horn"]


@given(st.lists(st.sampled_from([*WORDS, "\n", "\n\n"]), max_size=400))
def test_splitting_keeps_every_word_in_order(words: list[str]) -> None:
    text = " ".join(words)

    sentences = split_sentences(text)

    assert count_words(" ".join(sentences)) == count_words(text)
    assert all(sentence == " ".join(sentence.split()) for sentence in sentences)


def test_tokenize_lowercases_and_keeps_inner_apostrophes() -> None:
    assert tokenize("Don't STOP believin' \u2014 it\u2019s Darwin's book, isn\u2019t it?") == [
        "don't",
        "stop",
        "believin",
        "it",
        "darwin",
        "book",
        "isn't",
        "it",
    ]


def test_tokenize_drops_numbers_and_caption_cues() -> None:
    assert tokenize("[Music] In 1859, 3.5 tons, mp3 files and covid-19 [Applause] ended") == [
        "in",
        "tons",
        "files",
        "and",
        "covid",
        "ended",
    ]


def test_tokenize_is_unicode_aware() -> None:
    text = (
        "Caf\u00e9 na\u00efve Stra\u00dfe \u00cele d\u2019Ouessant "
        "\u6771\u4eac \u0391\u03b8\u03ae\u03bd\u03b1"
    )
    expected = [
        "caf\u00e9",
        "na\u00efve",
        "stra\u00dfe",
        "\u00eele",
        "d'ouessant",
        "\u6771\u4eac",
        "\u03b1\u03b8\u03ae\u03bd\u03b1",
    ]

    assert tokenize(text) == expected
    assert tokenize(unicodedata.normalize("NFD", text)) == expected


def test_tokenize_splits_hyphenated_words() -> None:
    assert tokenize("compressed-air horns, well-known") == [
        "compressed",
        "air",
        "horns",
        "well",
        "known",
    ]


def test_punctuation_and_numbers_break_phrases() -> None:
    assert split_phrases("The fog, signal and compressed-air horn of 1901 stations; done") == [
        ["the", "fog"],
        ["signal", "and", "compressed", "air", "horn", "of"],
        ["stations"],
        ["done"],
    ]


@pytest.mark.parametrize(
    "word",
    ["the", "also", "one", "um", "uh", "yeah", "gonna", "like", "okay", "don't", "mr", "shall"],
)
def test_stopwords_include_function_words_and_spoken_fillers(word: str) -> None:
    assert word in STOPWORDS
    assert not is_content_word(word)


@pytest.mark.parametrize(
    "word", ["fog", "lighthouse", "species", "selection", "light", "lens", "variety", "rights"]
)
def test_stopwords_leave_content_words(word: str) -> None:
    assert word not in STOPWORDS
    assert is_content_word(word)


def test_plurals_map_to_a_singular_used_in_the_same_text() -> None:
    words = [
        "lighthouses",
        "lighthouse",
        "varieties",
        "variety",
        "lenses",
        "lens",
        "glasses",
        "glass",
        "species",
        "horses",
        "horse",
        "keepers",
        "news",
        "new",
        "boxes",
    ]

    assert map_plurals(words) == {
        "lighthouses": "lighthouse",
        "lighthouse": "lighthouse",
        "varieties": "variety",
        "variety": "variety",
        "lenses": "lens",
        "lens": "lens",
        "glasses": "glass",
        "glass": "glass",
        "species": "species",
        "horses": "horse",
        "horse": "horse",
        "keepers": "keepers",
        "news": "news",
        "new": "new",
        "boxes": "boxes",
    }
