"""A word-level CLIP tokenizer for small worlds.

``build_word_tokenizer(words, out_dir)`` writes a ``vocab.json`` and ``merges.txt`` in the CLIP BPE format
whose merges build every listed word into a single token, and loads it with
``CLIPTokenizer.from_pretrained(out_dir)`` (in transformers 5.x the ``vocab_file=``/``merges_file=`` keyword
arguments silently give a 3-token vocabulary, so the folder route is the reliable one), then saves it as a
plain fast tokenizer (``PreTrainedTokenizerFast``) whose normalizer reads only the listed words.

Words outside the list. A byte-level BPE splits an unknown word into characters, one position each: in a
16-position text encoder that never saw those characters, "please render a dotted star in blue" leaves no
room for "blue" (truncated) and the untrained pieces disturb every later word. A real CLIP tokenizer (49,408
tokens, 77 positions) spends one or two positions on such a word. So, after lower-casing, the normalizer reads
the plural of a listed word (``words``, ``crosses``) as the word and drops every other word outside the list;
punctuation and digits pass as before. ``CLIPTokenizer`` rebuilds its own normalizer on load, so the folder
names ``PreTrainedTokenizerFast``, which keeps the one in ``tokenizer.json``.

How the merges guarantee one token per word. BPE repeatedly applies the highest-priority merge among the
adjacent pairs of a word. For each word ``c1 c2 ... cn`` we add the left-to-right chain
``(c1, c2) -> c1c2``, ``(c1c2, c3) -> c1c2c3``, ... All merges with a result of three or more characters come
first, so once a word's first pair has merged its chain runs to the end (no other multi-character token
exists in the word to compete). Among the two-character first pairs we need, for every word, its own first
pair to outrank any other word's first pair that also occurs inside it; that is a topological order,
computed below and verified by encoding every word.
"""

from __future__ import annotations

import graphlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _symbols(word: str) -> list[str]:
    chars = list(word)
    chars[-1] += END_OF_WORD
    return chars


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merge rules (highest priority first) that turn each of ``words`` into one token."""
    words = sorted(set(words))
    long_merges: list[tuple[str, str]] = []
    first_pair: dict[str, tuple[str, str]] = {}
    for word in words:
        syms = _symbols(word)
        if len(syms) < 2:
            continue
        first_pair[word] = (syms[0], syms[1])
        prefix = syms[0] + syms[1]
        for sym in syms[2:]:
            long_merges.append((prefix, sym))
            prefix += sym
    firsts = set(first_pair.values())
    # A word's own first pair must come before every other first pair found inside the word.
    order = graphlib.TopologicalSorter({p: set() for p in sorted(firsts)})  # sorted: the same order every run
    for word, own in first_pair.items():
        syms = _symbols(word)
        for pair in zip(syms[1:], syms[2:]):
            if pair in firsts and pair != own:
                order.add(pair, own)
    try:
        ordered_firsts = list(order.static_order())
    except graphlib.CycleError as err:
        raise ValueError(f"cannot order word merges so that every word is one token: {err.args[1]}") from err
    seen, merges = set(), []
    for m in long_merges + ordered_firsts:
        if m not in seen:
            seen.add(m)
            merges.append(m)
    return merges


def vocabulary_normalizer(words):
    """The normalizer of a word-level tokenizer for ``words``: CLIP's (NFC, whitespace runs to one space,
    lower case), then plurals of listed words (three letters or more) read as the word, then any other word of
    letters outside the list removed."""
    from tokenizers import Regex, normalizers

    letters = sorted({w for w in words if w.isalpha()}, key=lambda w: (-len(w), w))
    plurals = [normalizers.Replace(Regex(rf"\b{w}e?s\b"), w) for w in letters if len(w) >= 3]
    unknown = normalizers.Replace(Regex(r"\b(?!(?:" + "|".join(letters) + r")\b)\p{L}+\b"), "")
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                 normalizers.Lowercase(), *plurals, unknown])


def build_word_tokenizer(words, out_dir, model_max_length: int = 16):
    """Write a word-level CLIP tokenizer for ``words`` into ``out_dir`` and return it loaded from there.

    ``words`` are lower-case strings without spaces (punctuation such as "," can be listed too). Each becomes a
    single token, its plural reads as it, and other words are dropped (module docstring); other characters
    (punctuation, digits) tokenize as in CLIP. ``model_max_length`` is the number of positions, BOS and EOS
    included, and must match the text encoder's ``max_position_embeddings``.
    """
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words})
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"words must be non-empty and contain no whitespace: {bad}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    base = list(_bytes_to_unicode().values())
    vocab_tokens = base + [c + END_OF_WORD for c in base]
    merges = word_merges(words)
    vocab_tokens += ["".join(m) for m in merges]
    vocab_tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in vocab_tokens:
        vocab.setdefault(tok, len(vocab))

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
        "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}, indent=1), encoding="utf-8")

    clip = CLIPTokenizer.from_pretrained(str(out_dir))
    _check_words(clip, words)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        (out_dir / name).unlink()
    tokenizer = save_word_level(clip, words, out_dir)
    log.debug("word tokenizer: %d words, %d tokens, %d merges -> %s", len(words), len(tokenizer), len(merges), out_dir)
    return tokenizer


def save_word_level(clip, words, out_dir):
    """Save the CLIP tokenizer ``clip`` (vocabulary and merges unchanged) into ``out_dir`` as a
    ``PreTrainedTokenizerFast`` with ``vocabulary_normalizer(words)``, and return it loaded from there."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    backend = clip.backend_tokenizer
    backend.normalizer = vocabulary_normalizer(words)
    backend.decoder = decoders.Sequence([decoders.Replace(END_OF_WORD, " "), decoders.ByteLevel()])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=clip.model_max_length)
    fast.save_pretrained(str(out_dir))
    name_fast_class(out_dir / "tokenizer_config.json")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out_dir))
    _check_words(tokenizer, words)
    return tokenizer


def name_fast_class(config_path: Path) -> None:
    """Name ``PreTrainedTokenizerFast`` (transformers 4 and 5) rather than whatever alias saved the folder."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")


def _check_words(tokenizer, words: list[str]) -> None:
    if len(tokenizer) < 512:
        raise RuntimeError(f"tokenizer loaded with only {len(tokenizer)} tokens; the vocabulary was not read")
    broken = {w: tokenizer.tokenize(w) for w in words}
    broken = {w: t for w, t in broken.items() if t != [w + END_OF_WORD]}
    if broken:
        raise RuntimeError(f"these words do not encode to a single token: {broken}")
