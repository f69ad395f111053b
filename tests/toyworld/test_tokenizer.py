"""The word-level CLIP tokenizer built from a word list."""

from transformers import PreTrainedTokenizerFast

from spm_train.toyworld.model import toyworld_words
from spm_train.toyworld.tokenizer import build_word_tokenizer, word_merges


def test_every_word_is_one_token_and_round_trips(tmp_path):
    words = toyworld_words()
    tok = build_word_tokenizer(words, tmp_path / "tok")
    reloaded = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert len(reloaded) == len(tok) > 512
    for w in words:
        ids = reloaded(w).input_ids
        assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert reloaded.decode(ids[1:-1]).strip() == w


def test_caption_encodes_one_token_per_word(tmp_path):
    tok = build_word_tokenizer(toyworld_words(), tmp_path / "tok", model_max_length=16)
    text = "a striped blue star on a white background"
    enc = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 16 and tok.model_max_length == 16
    assert ids[0] == tok.bos_token_id and ids[9] == tok.eos_token_id  # 8 words between BOS and EOS
    assert tok.convert_ids_to_tokens(ids[1:9]) == [w + "</w>" for w in text.split()]
    assert tok.decode(ids, skip_special_tokens=True).strip() == text


def test_words_outside_the_vocabulary_take_no_position(tmp_path):
    """Character pieces of unknown words used to fill the 16 positions: "blue" fell off the end of
    "please render a dotted star in blue colour". Unknown words are dropped, plurals read as the word."""
    tok = build_word_tokenizer(toyworld_words(), tmp_path / "tok", model_max_length=16)

    def words(text):
        ids = tok(text, padding="max_length", max_length=16, truncation=True).input_ids
        return [t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(ids) if t != "<|endoftext|>"][1:]

    assert words("please render a dotted star in blue colour") == "a dotted star in blue colour".split()
    assert words("Two RED Crosses and three circles") == ["red", "cross", "and", "circle"]
    assert words("a red-ish zebra, 2 stars!") == ["a", "red", "-", ",", "2", "star", "!"]
    caption = "a striped blue star on a white background"
    assert words(caption) == caption.split()
    assert words("zebra") == []
    # a listed word inside a longer unknown word is not read as the word
    assert words("starfish squarely") == []


def test_shipped_tokenizer_is_the_word_level_one():
    """The ToyWorld assets load the fast tokenizer with the vocabulary normalizer (diffusers' loader path)."""
    from spm_train.toyworld import base_model_path

    tok = PreTrainedTokenizerFast.from_pretrained(str(base_model_path() / "tokenizer"))
    ids = tok("please render a dotted star in blue colour").input_ids
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["blue</w>", "colour</w>", "<|endoftext|>"]


def test_merges_for_words_sharing_pieces(tmp_path):
    words = ["star", "striped", "start", "tar", "art", "rat"]
    tok = build_word_tokenizer(words, tmp_path / "tok")
    assert all(tok.tokenize(w) == [w + "</w>"] for w in words)
    assert len(word_merges(words)) == len(set(word_merges(words)))


def test_merges_do_not_depend_on_string_hashing():
    """A rebuilt tokenizer must equal the shipped one: the merge order may not follow set iteration order."""
    import os
    import subprocess
    import sys

    code = ("from spm_train.toyworld.tokenizer import word_merges;"
            "print(word_merges(['circle', 'square', 'triangle', 'star', 'cross', 'striped', 'dotted', 'outline']))")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outputs) == 1


def test_the_wide_world_words_and_synonyms_are_one_token_each(tmp_path):
    from spm_train.toyworld.render import WIDE

    words = toyworld_words(WIDE)
    assert {"crimson", "disc", "valentine", "which", "this", "is", "gradient"} <= set(words)
    assert set(toyworld_words()) < set(words)
    tok = build_word_tokenizer(words, tmp_path / "tok", model_max_length=16)
    text = "this is a checked crimson valentine"
    assert tok.convert_ids_to_tokens(tok(text).input_ids[1:-1]) == [w + "</w>" for w in text.split()]
