"""Text plumbing shared by the tagger and the summarizer: sentences, words, stopwords.

Pure and deterministic, standard library only, tuned for the two kinds of text the service
ingests: edited articles, and spoken transcripts that arrive as one lowercase paragraph.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

__all__ = [
    "STOPWORDS",
    "is_content_word",
    "list_singulars",
    "map_plurals",
    "split_phrases",
    "split_sentences",
    "tokenize",
]

_FUNCTION_WORDS = """
a about above across after afterwards again against all almost alone along already also
although always am among amongst an and another any anyhow anyone anything anyway anywhere are
around as at be became because become becomes becoming been before beforehand behind being
below beside besides between beyond both but by can cannot could did do does doing done down
during each either else elsewhere enough etc even ever every everyone everything everywhere
except few for former formerly from further furthermore had has have having he hence her here
hereafter hereby herein hers herself him himself his how however i if in indeed into is it its
itself just last latter latterly least less many may me meanwhile might mine more moreover most
mostly much must my myself namely neither never nevertheless next no nobody none noone nor not
nothing now nowhere of off often on once only onto or other others otherwise ought our ours
ourselves out over own per perhaps please quite rather same several shall she should since so
some somehow someone something sometime sometimes somewhere still such than that the their
theirs them themselves then thence there thereafter thereby therefore therein thereupon these
they this those though through throughout thru thus to together too toward towards under unless
until up upon us very via was we well were what whatever when whence whenever where whereafter
whereas whereby wherein whereupon wherever whether which while whither who whoever whole whom
whose why will with within without would yet you your yours yourself yourselves
"""

_CONTRACTIONS = """
ain't aren't can't couldn't didn't doesn't don't hadn't hasn't haven't he'd he'll i'd i'll i'm
i've isn't let's mustn't needn't shan't she'd she'll shouldn't they'd they'll they're they've
wasn't we'd we'll we're we've weren't won't wouldn't y'all you'd you'll you're you've
"""

# Verbs, adverbs and adjectives so general that they are never what a text is about.
_GENERIC_WORDS = """
able actually again ago almost already anyway back basically call called calls came certain
come comes coming completely definitely did different done easy especially exactly fact get
gets getting give given gives go goes going gone good got gotten great had important
instead kind kinds knew know known knows less let lets literally look looked looking looks lot
lots made make makes making maybe mean might new nice obviously often possible pretty probably
put puts quite real really said saw say saying says see seeing seem seemed seems seen simply so
sort sorts stuff sure take takes taking thing things think thinking thought today tomorrow took
totally truly try trying use used uses using usually want wanted wants way went yesterday
"""

_NUMBER_WORDS = """
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
hundred hundreds thousand thousands million millions billion billions once twice first firstly
secondly third thirdly fourth fourthly fifth sixth seventh eighth ninth tenth eleventh twelfth
thirteenth
"""

# Spoken fillers and back-channels: a transcript repeats them dozens of times, while written
# documents in the corpus almost never do, so TF-IDF would otherwise rank them as keywords.
# "like" is kept as a stopword on purpose: in speech it is mostly a filler ("it's like, huge")
# or a preposition ("like a beehive"), and the verb is almost never what a text is about; the
# rare topic where it is ("like button") loses one word, every transcript gains a cleaner list.
_SPOKEN_FILLERS = """
ah aha alright bye cause dunno eh er erm gonna gotta guess guys hello hey hi hmm huh kinda like
mhm mm mmm nah oh ok okay oops right sorta uh uhm um umm wanna well whoa wow yeah yep yes yup
"""

# Honorifics and Latin abbreviations, and the single letters left over from initials ("C.
# Lyell") and dotted acronyms ("U.S.") once the dots are gone.
_ABBREVIATIONS = """
al cf dr eg ie jr mr mrs ms mt prof rev sir sr st viz vs
"""

STOPWORDS: frozenset[str] = frozenset(
    " ".join(
        (
            _FUNCTION_WORDS,
            _CONTRACTIONS,
            _GENERIC_WORDS,
            _NUMBER_WORDS,
            _SPOKEN_FILLERS,
            _ABBREVIATIONS,
            " ".join("abcdefghijklmnopqrstuvwxyz"),
        )
    ).split()
)

# A word: letters and digits joined by inner apostrophes ("don't", "d'Ouessant"); hyphens and
# other punctuation split words, so "compressed-air" gives "compressed" and "air".
_WORD_OR_MARK = re.compile(r"(?P<word>[^\W_]+(?:'[^\W_]+)*)|(?P<mark>[^\w\s-])")
# Caption cues such as "[Music]" or "[train doors closing]" are not part of what was said.
_CAPTION_CUE = re.compile(r"\[[^\]\n]{1,40}\]")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'", "\u2018": "'"})

# Periods after these, as after initials and dotted acronyms, end a sentence only when a
# capitalised function word follows.
_ABBREVIATION_SET = frozenset(
    (
        _ABBREVIATIONS
        + "approx ca capt ch col co corp dept est etc fig gen gov inc lt ltd no nos op pp sgt vol"
    ).split()
)
_ABBREVIATION_WINDOW = 40

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# Western terminators end a sentence only before whitespace ("3.5", "e.g.,"); the ideographic
# ones are written without a space after them.
_SENTENCE_END = re.compile(
    r"[.!?\u2026\u203d]+[\"'\u201d\u2019\u00bb)\]]*(?=\s)|[\u3002\uff01\uff1f]+[\u300d\u300f\uff09]*"
)
_NEXT_WORD = re.compile(r"\s+(\S+)")
_OPENING = "\"'\u201c\u2018\u00ab([-\u2014\u2013"
_TERMINAL = ".!?\u2026\u203d:;\u3002\uff01\uff1f"
_MAX_HEADING_WORDS = 8

# Sentences this long on average mean a text is hardly punctuated (a raw transcript); it is
# cut into chunks instead, so that a summary is still possible.
_UNPUNCTUATED_WORDS_PER_SENTENCE = 60
_CHUNK_WORDS = 25
_CHUNK_MIN = 15
_CHUNK_MAX = 35
# Words that usually open a new clause in speech, with how strongly they mark a pause.
_PAUSE_WORDS: dict[str, int] = {
    **dict.fromkeys(("so", "now", "okay", "ok", "alright", "anyway", "um", "uh", "but"), 2),
    **dict.fromkeys(("because", "well", "then", "and", "which", "when", "if", "or"), 1),
}
_PAUSE_BONUS = 4

# Words ending in "s" that are not plurals of a shorter word in the same text.
_INVARIANT_ENDINGS = ("ss", "us", "is", "ics")
_INVARIANT_WORDS = frozenset({"news", "series", "species", "means", "lens", "gas", "bus"})


def tokenize(text: str) -> list[str]:
    """Lowercase words in reading order: unicode letters, inner apostrophes kept ("don't"),
    possessive "'s" removed, anything containing a digit dropped."""
    return [word for phrase in split_phrases(text) for word in phrase]


def split_phrases(text: str) -> list[list[str]]:
    """The words of :func:`tokenize`, grouped into runs that punctuation or a number does
    not interrupt: "fog, signal" are two runs, "compressed-air horn" is one."""
    text = unicodedata.normalize("NFC", text).translate(_APOSTROPHES)
    text = _CAPTION_CUE.sub(" . ", text)
    phrases: list[list[str]] = [[]]
    for match in _WORD_OR_MARK.finditer(text):
        word = match.group().lower()
        if match.lastgroup == "mark" or any(char.isdigit() for char in word):
            if phrases[-1]:
                phrases.append([])
            continue
        if word.endswith("'s"):
            word = word[:-2]
        phrases[-1].append(word)
    return [phrase for phrase in phrases if phrase]


def split_sentences(text: str) -> list[str]:
    """Sentences in order, each on one line with its whitespace collapsed.

    Periods after abbreviations, initials and dotted acronyms ("Dr.", "C. Lyell", "U.S.") and
    inside numbers ("3.5") do not end a sentence; closing quotes stay with their sentence;
    paragraph breaks and short heading lines always end one. A text with hardly any
    terminators, such as a raw transcript, is cut into chunks of about 25 words at natural
    pauses ("so", "now", "because", commas) instead.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        for unit in _split_headings(paragraph):
            sentences.extend(_split_punctuated(unit))
    word_count = sum(len(sentence.split()) for sentence in sentences)
    if sentences and word_count / len(sentences) > _UNPUNCTUATED_WORDS_PER_SENTENCE:
        chunked: list[str] = []
        for sentence in sentences:
            chunked.extend(_chunk_words(sentence.split()))
        return chunked
    return sentences


def is_content_word(word: str) -> bool:
    """Whether a word from :func:`tokenize` can carry meaning on its own."""
    return len(word) > 1 and word not in STOPWORDS


def map_plurals(words: Iterable[str]) -> dict[str, str]:
    """Map each word to the singular it shares a meaning with, when that singular is itself
    among ``words`` ("lighthouses" -> "lighthouse", "varieties" -> "variety"); other words
    map to themselves.

    Requiring the singular to be present keeps the suffix rule from inventing stems: "species"
    stays "species", "lenses" becomes "lens" only if "lens" was used too.
    """
    vocabulary = set(words)
    mapping: dict[str, str] = {}
    for word in vocabulary:
        mapping[word] = next((form for form in list_singulars(word) if form in vocabulary), word)
    return mapping


def list_singulars(word: str) -> list[str]:
    """Candidate singulars of a possible plural, most likely first (may be empty)."""
    if (
        len(word) <= 3
        or not word.endswith("s")
        or word.endswith(_INVARIANT_ENDINGS)
        or word in _INVARIANT_WORDS
    ):
        return []
    if word.endswith("ies"):
        return [word[:-3] + "y", word[:-1]]
    if word.endswith("es"):
        return [word[:-2], word[:-1]]
    return [word[:-1]]


def _split_headings(paragraph: str) -> list[str]:
    """Split off short lines without final punctuation (headings, list items) that precede a
    capitalised line; other line breaks inside a paragraph are just wrapping."""
    lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
    if not lines:
        return []
    units: list[list[str]] = [[]]
    for line, following in zip(lines, [*lines[1:], ""], strict=True):
        units[-1].append(line)
        if (
            following
            and len(line.split()) <= _MAX_HEADING_WORDS
            and line[-1] not in _TERMINAL
            and _starts_capitalised(following)
        ):
            units.append([])
    return [" ".join(unit) for unit in units if unit]


def _split_punctuated(unit: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(unit):
        if _ends_sentence(unit, match):
            _append_sentence(sentences, unit[start : match.end()])
            start = match.end()
    _append_sentence(sentences, unit[start:])
    return sentences


def _append_sentence(sentences: list[str], text: str) -> None:
    sentence = " ".join(text.split())
    if any(char.isalnum() for char in sentence):
        sentences.append(sentence)


def _ends_sentence(unit: str, match: re.Match[str]) -> bool:
    following = _NEXT_WORD.match(unit, match.end())
    if following is None:
        return True
    next_word = following.group(1)
    terminator = match.group().rstrip("\"'\u201d\u2019\u00bb)]")
    if terminator != ".":
        # '"Help!" he cried.' and "wait... what" carry on after the mark.
        return _starts_capitalised(next_word)
    # A bounded look back: an abbreviation is short, and the text may be one long paragraph.
    previous = unit[max(0, match.start() - _ABBREVIATION_WINDOW) : match.start()].split()
    if not previous or not _is_abbreviation(previous[-1].lstrip(_OPENING)):
        return True
    # After "Dr." or "U.S." a name or noun usually follows; a capitalised function word
    # ("U.S. The ...") means the abbreviation ended the sentence.
    return _starts_capitalised(next_word) and (
        next_word.lstrip(_OPENING).rstrip(",;:").lower() in STOPWORDS
    )


def _is_abbreviation(word: str) -> bool:
    if not word:
        return False
    if len(word) == 1 and word.isalpha():
        return True
    if "." in word and all(part.isalpha() and len(part) <= 3 for part in word.split(".")):
        return True
    return word.lower() in _ABBREVIATION_SET


def _starts_capitalised(word: str) -> bool:
    stripped = word.lstrip(_OPENING)
    return bool(stripped) and (stripped[0].isupper() or not stripped[0].isalpha())


def _chunk_words(words: list[str]) -> list[str]:
    chunks: list[str] = []
    start = 0
    while len(words) - start > _CHUNK_MAX:
        end = _choose_cut(words, start)
        chunks.append(" ".join(words[start:end]))
        start = end
    if start < len(words):
        chunks.append(" ".join(words[start:]))
    return chunks


def _choose_cut(words: list[str], start: int) -> int:
    """Where the chunk starting at ``start`` should end: the strongest pause near the target
    length, never leaving a tail shorter than the minimum chunk."""
    high = min(start + _CHUNK_MAX, len(words) - _CHUNK_MIN)
    target = min(start + _CHUNK_WORDS, high)
    best, best_score = target, None
    for index in range(start + _CHUNK_MIN, high + 1):
        strength = _measure_pause(words[index - 1], words[index])
        if not strength:
            continue
        score = strength * _PAUSE_BONUS - abs(index - target)
        if best_score is None or score > best_score:
            best, best_score = index, score
    return best


def _measure_pause(before: str, word: str) -> int:
    if before.endswith((",", ";", ":", "\u2014", "\u2013")):
        return 3
    if _bare(before) in _PAUSE_WORDS:
        # Inside a run such as "okay so now": the pause is before the run, not within it.
        return 0
    return _PAUSE_WORDS.get(_bare(word), 0)


def _bare(word: str) -> str:
    return word.lower().strip(".,;:!?\"'")
