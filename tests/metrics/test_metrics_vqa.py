"""VQAv2 normalisation and accuracy against the rules of the official evaluation script."""

import pytest

from narrowgate.metrics import normalize_vqa_answer, vqa_accuracy
from narrowgate.metrics.vqa import CONTRACTIONS, NUMBER_WORDS, PUNCTUATION


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("  RED\n", "red"),
        ("two\tdogs", "2 dogs"),
        ("fire hydrant", "fire hydrant"),
    ],
)
def test_lowercase_and_whitespace(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        # No punctuation touches a space: each mark becomes a space.
        ("red,white", "red white"),
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),
        ("yes!", "yes"),
        ("(left)", "left"),
        # "p + ' '" rule: ', ' occurs, so ',' is deleted; '-' touches no space, so it is spaced.
        ("t-shirt, red", "t shirt red"),
        # "' ' + p" rule: ' -' occurs, so '-' is deleted (no space inserted).
        ("well -known", "well known"),
        # Comma between digits: it is removed without a space ...
        ("100,978", "100978"),
        # ... and, as in the official script, then every listed mark is deleted, not spaced.
        ("1,000 t-shirts", "1000 tshirts"),
        # Apostrophes and colons are kept.
        ("man's", "man's"),
        ("10:30", "10:30"),
    ],
)
def test_punctuation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes.", "yes"),
        ("dr. who", "dr who"),
        ("3.5", "3.5"),
        (".5", ".5"),
        ("5.", "5"),
        ("1.5 m.", "1.5 m"),
    ],
)
def test_periods_removed_except_before_digits(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_number_words_table_is_the_official_one():
    assert NUMBER_WORDS == {
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


@pytest.mark.parametrize(
    "raw, expected",
    [("None", "0"), ("zero", "0"), ("one", "1"), ("Ten", "10"), ("eleven", "eleven"), ("twenty", "twenty")],
)
def test_number_words(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("a dog", "dog"), ("An apple", "apple"), ("the cat on the mat", "cat on mat"), ("theater", "theater")],
)
def test_articles_dropped(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("oclock", "o'clock"),
        ("yall", "y'all"),
        ("Whats", "what's"),
        # The official keys "Im"/"Ive" are capitalised and never match lowercased text.
        ("Im", "im"),
        # Official quirk: this entry removes the apostrophe.
        ("somebody'd", "somebodyd"),
    ],
)
def test_contractions(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_tables_sizes():
    assert len(CONTRACTIONS) == 120
    assert set(PUNCTUATION) == set(';/[]"{}()=+\\_-><@`,?!')


def test_combined_rules():
    assert normalize_vqa_answer("The Two dogs, dont.") == "2 dogs don't"


def _answers(n_match, match="2", other="3"):
    return [match] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    "n_match, expected",
    [
        # 0 matches: every subset has 0 -> 0.
        (0, 0.0),
        # 1 match: leaving it out gives 0, the other 9 subsets give 1/3 -> 9 * (1/3) / 10 = 0.3.
        (1, 0.3),
        # 2 matches: 2 subsets keep 1 match (1/3), 8 keep 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6.
        (2, 0.6),
        # 3 matches: 3 subsets keep 2 (2/3), 7 keep 3 (1) -> (2 + 7) / 10 = 0.9.
        (3, 0.9),
        # 4 or more: every subset keeps >= 3 -> 1.
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(n_match, expected):
    assert vqa_accuracy("2", _answers(n_match)) == pytest.approx(expected, abs=1e-12)


def test_accuracy_normalises_prediction_and_answers():
    answers = ["2", "Two", "two.", "2", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("The two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("three!", answers) == pytest.approx(1.0)
    assert vqa_accuracy("four", answers) == 0.0


def test_fewer_than_ten_answers():
    # 3 identical answers: each leave-one-out subset has 2 matches -> 2/3.
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)
    # A single answer: its only subset is empty -> 0.
    assert vqa_accuracy("yes", ["yes"]) == 0.0


def test_no_answers_raises():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")
