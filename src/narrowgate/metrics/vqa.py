"""VQAv2 answer normalisation and accuracy, following the official evaluation script.

The tables and rules below reproduce ``vqaEval.py`` of the VQA API
(GT-Vision-Lab/VQA), so that accuracies are comparable with published numbers.
One deliberate difference: the official script normalises only when the human
answers disagree, and then applies the digit/article/contraction step only to
the prediction; here prediction and human answers are always fully normalised
(as most re-implementations do), so "Two" matches a unanimous "2".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_vqa_answer", "vqa_accuracy"]

# Keys are as in the official script, including its capitalised entries
# ("Im", "Ive", ...), which never match after lowercasing, and its
# "somebody'd" -> "somebodyd" quirk.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Apostrophes, colons and periods are not in the list: the first two are kept,
# periods are handled by _PERIOD_STRIP.
PUNCTUATION: tuple[str, ...] = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)

# A period is removed unless a digit follows it ("3.5" and ".5" keep theirs).
# The official pattern is "(?!<=\d)(\.)(?!\d)", whose first group is a
# malformed look-behind that never constrains anything; this is its meaning.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official script passes re.UNICODE (= 32) as the ``count`` argument of
# ``sub``, so at most 32 periods are stripped; kept for exact agreement.
_PERIOD_STRIP_COUNT = 32


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space out punctuation, strip periods.

    A punctuation mark is deleted when it touches a space somewhere in the text,
    or when the text contains a comma between digits anywhere ("1,000"); in all
    other cases it becomes a space. The test is on the input text, not on the
    partially processed one.
    """
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer the way the official VQAv2 evaluation does before matching."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (usually 10).

    The mean, over the leave-one-out subsets of the answers, of
    ``min(1, #answers in the subset equal to the prediction / 3)``, after
    normalising everything with :func:`normalize_vqa_answer`. With fewer than
    10 answers the leave-one-out runs over those available.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    return accuracy_of_normalized(normalize_vqa_answer(prediction), [normalize_vqa_answer(a) for a in answers])


def accuracy_of_normalized(prediction: str, answers: Sequence[str]) -> float:
    """`vqa_accuracy` of a prediction and answers already normalised (`normalize_vqa_answer`)."""
    hits = [a == prediction for a in answers]
    total = sum(hits)
    per_subset = [min(1.0, (total - hit) / 3.0) for hit in hits]
    return sum(per_subset) / len(per_subset)
