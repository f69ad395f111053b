"""Prompts as text: function words name nothing, phrasings and unrelated captions from a corpus."""

import pytest

from spm_train.prompts import (PromptCorpus, concept_words, content_words, function_token_ids, mentions,
                               replace_concept)


def test_content_words_leave_out_function_words_and_punctuation():
    assert content_words("a striped red circle, on a white background") == [
        "striped", "red", "circle", "white", "background"]
    assert content_words("a painting by van gogh") == ["painting", "van", "gogh"]
    assert concept_words("the") == ["the"]  # a concept made of function words is still named by them


def test_mentions_matches_whole_words_only():
    assert mentions("a red circle", "a circle")
    assert not mentions("a circles party", "a circle")
    assert not mentions("a square", "a circle")  # sharing "a" is not a mention
    assert mentions("painting by van gogh", "van gogh") and not mentions("a van", "van gogh")


@pytest.mark.parametrize("text, concept, replacement, expected", [
    ("a striped red circle", "red", "", "a striped circle"),
    ("a red circle, striped", "red", "", "a circle, striped"),
    ("a purple cross, red", "red", "", "a purple cross"),
    ("a red circle", "circle", "square", "a red square"),
    ("snoopy on a red doghouse", "snoopy", "a dog", "a dog on a red doghouse"),
])
def test_replace_concept_keeps_the_rest_of_the_prompt(text, concept, replacement, expected):
    assert replace_concept(text, concept, replacement) == expected


def test_function_tokens_of_the_toyworld_tokenizer():
    from transformers import CLIPTokenizer

    from spm_train.toyworld import base_model_path

    tok = CLIPTokenizer.from_pretrained(str(base_model_path() / "tokenizer"))
    ids = function_token_ids(tok)
    (a,), (circle,), (comma,), (on,) = (tok(w, add_special_tokens=False).input_ids for w in ["a", "circle", ",", "on"])
    assert {a, comma, on} <= ids and circle not in ids
    # a piece that starts a longer word is not the function word it spells
    assert tok.convert_tokens_to_ids("do") not in ids


def test_corpus_phrasings_and_unrelated_captions(tmp_path):
    corpus = PromptCorpus.load("toyworld", size=400, seed=3)
    assert corpus == PromptCorpus.load("toyworld", size=400, seed=3)  # deterministic in its seed
    red = corpus.phrasings("red")
    assert red and all("red" in p.split() or "red," in p.split() for p in red)
    assert len(red) == len(set(red))
    unrelated = corpus.unrelated(["red", "a circle"])
    assert unrelated and not any("red" in p or "circle" in p for p in unrelated)
    assert len(corpus.phrasings("red")) + len(corpus.unrelated(["red"])) == len(set(corpus.captions))
    path = tmp_path / "captions.txt"
    path.write_text("# real prompts\na cat on a sofa\n\na dog\n")
    assert PromptCorpus.load(str(path)).captions == ("a cat on a sofa", "a dog")
    with pytest.raises(FileNotFoundError, match="neither 'toyworld' nor a readable file"):
        PromptCorpus.load(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no captions"):
        PromptCorpus.load(str(tmp_path / "empty.txt"))


def test_synonyms_are_phrasings_of_a_concept_and_never_its_anchors():
    corpus = PromptCorpus(("a crimson square", "a red circle", "a blue disc", "a green square, striped",
                           "a crimson disc"), "test", (("red", "crimson"), ("circle", "disc")))
    assert corpus.names("a red circle") == ["a red circle", "a red disc", "a crimson circle",
                                            "a crimson disc"]
    assert corpus.phrasings("red") == ["a crimson square", "a red circle", "a crimson disc"]
    assert corpus.phrasings("a circle") == ["a red circle", "a blue disc", "a crimson disc"]
    # "a crimson square" shows red: no anchor of a pack that erases red
    assert corpus.unrelated(["red"]) == ["a blue disc", "a green square, striped"]
    assert corpus.unrelated(["red", "a circle"]) == ["a green square, striped"]
    # training pushes a phrasing towards the same sentence with the surrogate, whichever name it used
    assert corpus.replace("a crimson square", "red", "green") == "a green square"
    assert corpus.replace("a blue disc", "a circle", "square") == "a blue square"
    assert corpus.replace("a red circle", "red", "green") == "a green circle"
    # without synonyms a concept has one name and phrasings are the captions that use it
    plain = PromptCorpus(corpus.captions, "test")
    assert plain.names("a red circle") == ["a red circle"] and plain.phrasings("red") == ["a red circle"]


def test_the_wide_toyworld_corpus_names_concepts_by_synonyms():
    from spm_train.toyworld.render import WIDE

    corpus = PromptCorpus.load("toyworld", size=10)
    assert corpus.synonyms == ()  # the classic world has none
    wide = PromptCorpus(corpus.captions, "toyworld", WIDE.synonyms)
    assert wide.names("red") == ["red", "crimson"] and wide.names("a heart") == ["a heart", "a valentine"]
