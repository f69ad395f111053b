"""The word-level CLIP tokenizer built from a word list."""

from transformers import CLIPTokenizer

from spm_train.toyworld.model import toyworld_words
from spm_train.toyworld.tokenizer import build_word_tokenizer, word_merges


def test_every_word_is_one_token_and_round_trips(tmp_path):
    words = toyworld_words()
    tok = build_word_tokenizer(words, tmp_path / "tok")
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
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
    # Words outside the list still tokenize (character pieces), they are not dropped.
    assert len(tok.tokenize("zebra")) == 5


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
