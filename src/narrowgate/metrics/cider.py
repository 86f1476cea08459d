"""CIDEr-D captioning score as computed by coco-caption, without Java.

Scoring is delegated to ``pycocoevalcap.cider.cider.Cider``, which in
pycocoevalcap 1.2 is CIDEr-D (Gaussian length penalty with sigma = 6, clipped
n-gram counts, x10 factor, document frequencies from the evaluated
references). coco-caption first runs the Stanford PTBTokenizer (Java) and drops
punctuation tokens; :func:`ptb_tokenize` approximates that step in pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from pycocoevalcap.cider.cider import Cider

__all__ = ["cider", "ptb_tokenize"]

#: An example's key (its id): the candidates' and the references' keys are the same kind.
K = TypeVar("K", bound=Hashable)

# Tokens coco-caption removes after PTB tokenisation.
COCO_PUNCTUATION: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Raw characters PTB turns into tokens of that list (quotes and brackets);
# square brackets are dropped with the others.
_DROPPED = COCO_PUNCTUATION | {'"', "(", ")", "[", "]", "{", "}"}

_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "jr",
        "sr",
        "prof",
        "vs",
        "etc",
        "inc",
        "ltd",
        "co",
        "corp",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
    ]
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "gimme": ("gim", "me"),
    "lemme": ("lem", "me"),
}
_LEADING_CLITICS = frozenset({"'s", "'m", "'d", "'ll", "'re", "'ve", "'em", "'tis", "'twas", "'n"})


def _split_word(tok: str) -> list[str]:
    """PTB treatment of one whitespace-free chunk: quotes, clitics, final period, $ and %."""
    out: list[str] = []
    while tok.startswith("$") and len(tok) > 1:
        out.append("$")
        tok = tok[1:]
    if tok.startswith("'") and len(tok) > 1 and tok not in _LEADING_CLITICS:
        out.append("`")
        tok = tok[1:]
    tail: list[str] = []
    if tok.endswith("...") and len(tok) > 3:
        tail.insert(0, "...")
        tok = tok[:-3]
    if tok.endswith(".") and len(tok) > 1:
        stem = tok[:-1]
        is_initials = re.fullmatch(r"(?:[a-z]\.)+[a-z]", stem) is not None
        if not (is_initials or stem in _ABBREVIATIONS):
            tail.insert(0, ".")
            tok = stem
    if tok.endswith("%") and len(tok) > 1:
        tail.insert(0, "%")
        tok = tok[:-1]
    if tok.endswith("'") and len(tok) > 1 and not tok.endswith("''"):
        tail.insert(0, "'")
        tok = tok[:-1]
    if tok in _SPLIT_WORDS:
        out.extend(_SPLIT_WORDS[tok])
    else:
        m = _CLITIC.match(tok)
        if m and m.group(2) == "n't" and m.group(1) in ("ca", "wo", "sha", "ai"):
            out.extend([m.group(1), "n't"])
        elif m and m.group(1) not in ("", "'"):
            out.extend([m.group(1), m.group(2)])
        elif tok:
            out.append(tok)
    return out + tail


def ptb_tokenize(text: str) -> str:
    """Lowercase and PTB-tokenise a caption, then drop coco-caption's punctuation tokens.

    An approximation of ``PTBTokenizer -preserveLines -lowerCase`` followed by
    coco-caption's filter: clitics are split ("don't" -> "do n't", "dog's" ->
    "dog 's"), punctuation, quotes and brackets are separated and removed,
    hyphenated words, decimals, "1,000" and "10:30" stay whole, a final period
    is kept on common abbreviations and initials ("mr.", "u.s.").
    """
    s = text.replace("\n", " ").lower()
    s = re.sub(r"[\"()\[\]{};?!]", lambda m: f" {m.group(0)} ", s)
    s = s.replace("``", " `` ").replace("--", " -- ")
    s = re.sub(r"(?<!\d)[,:]|[,:](?!\d)", lambda m: f" {m.group(0)} ", s)
    tokens: list[str] = []
    for chunk in s.split():
        tokens.extend(_split_word(chunk) if chunk not in _DROPPED else [chunk])
    return " ".join(t for t in tokens if t not in _DROPPED)


def _raw(text: str) -> str:
    return " ".join(text.split())


#: Caption preparation before CIDEr-D: coco-caption's PTB tokenisation, or the raw strings.
TOKENIZERS = {"ptb": ptb_tokenize, "raw": _raw}


def cider(
    candidates: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    *,
    tokenize: str = "ptb",
) -> tuple[float, dict[Hashable, float]]:
    """Corpus CIDEr-D and per-key scores of candidate captions against their references.

    ``candidates`` maps each key (e.g. an image id) to one generated caption,
    ``references`` maps the same keys to their human captions. Raw text is
    tokenised with :func:`ptb_tokenize`. IDF statistics come from the
    references passed in, so the score depends on the evaluated set (as in
    coco-caption; a set with a single key always scores 0).

    ``tokenize="ptb"`` (default) is coco-caption's official step; ``"raw"`` feeds the strings as they
    are (split on white space, case and punctuation kept), as the paper's authors' code did.
    """
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize must be one of {', '.join(TOKENIZERS)}, got {tokenize!r}")
    prep = TOKENIZERS[tokenize]
    if set(candidates) != set(references):
        missing = [k for k in candidates if k not in references][:5]
        extra = [k for k in references if k not in candidates][:5]
        raise ValueError(
            "candidates and references must have the same keys; "
            f"without references: {missing}, without candidate: {extra}"
        )
    if not candidates:
        raise ValueError("cider needs at least one caption")
    keys = list(candidates)
    res: dict[Hashable, list[str]] = {}
    gts: dict[Hashable, list[str]] = {}
    for key in keys:
        cand, refs = candidates[key], references[key]
        if not isinstance(cand, str):
            raise TypeError(f"candidate for {key!r} must be a string")
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references for {key!r} must be a non-empty list of strings")
        res[key] = [prep(cand)]
        gts[key] = [prep(r) for r in refs]
    score, scores = Cider().compute_score(gts, res)
    return float(score), {k: float(s) for k, s in zip(keys, scores)}
