"""VQA accuracy with VQAv2-style answer normalisation (our own implementation of the published rules).

Normalisation: lower case; commas inside numbers dropped ("1,000" -> "1000"); a period survives only as a
decimal point between digits; an apostrophe survives only inside a word; every other punctuation mark becomes
a space; number words become digits; articles go; apostrophe-less contractions get their apostrophe back
("dont" -> "don't", so "dont" and "don't" match); whitespace collapses.

Accuracy of a prediction against the human answers: min(#answers equal to it / 3, 1). With the 10 answers
of VQAv2 this is averaged over the 10 leave-one-out subsets of 9 (as the official evaluation does). With
fewer references (hand-made eval sets) there is no subset averaging and the denominator is min(3, #refs), so a
single reference that matches scores 1.
"""
from __future__ import annotations

import re
from itertools import combinations
from typing import Sequence

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# Apostrophe-less spelling -> the usual contraction. Both spellings then normalise to the same word.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "hows": "how's", "im": "i'm",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_NON_WORD_APOSTROPHE = re.compile(r"(?<![a-z0-9])'|'(?![a-z0-9])")
_OTHER_PUNCT = re.compile(r"[^\w\s.']|_")


def normalise_vqa(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    text = _THOUSANDS_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub(" ", text)
    text = _NON_WORD_APOSTROPHE.sub(" ", text)
    text = _OTHER_PUNCT.sub(" ", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _agreement(prediction: str, refs: Sequence[str], denominator: int) -> float:
    return min(sum(r == prediction for r in refs) / denominator, 1.0)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Score in [0, 1] of one prediction against its reference answers (see the module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalise_vqa(prediction)
    refs = [normalise_vqa(a) for a in answers]
    if len(refs) < 10:
        return _agreement(pred, refs, min(3, len(refs)))
    subsets = list(combinations(range(len(refs)), len(refs) - 1))
    return sum(_agreement(pred, [refs[i] for i in s], 3) for s in subsets) / len(subsets)
