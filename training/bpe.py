"""Train a small CLIP-format byte-level BPE vocabulary and write it as vocab.json + merges.txt.

The files follow OpenAI CLIP's layout exactly (clip/simple_tokenizer.py): the 256 byte-level base
symbols in `bytes_to_unicode` order, the same 256 with the end-of-word suffix "</w>", one token per
merge in merge order, then "<|startoftext|>" and "<|endoftext|>"; merges.txt starts with a
"#version: 0.2" line. So transformers.CLIPTokenizer and sdlite's tokenizer load it unchanged, while
the embedding table holds a few hundred rows instead of 49,408.
The trainer is the original BPE of Sennrich et al. (2016): repeatedly merge the most frequent
adjacent symbol pair over the word counts of the corpus, ties broken by first occurrence.
"""

import collections
import json
import re
from pathlib import Path

# CLIP's pre-tokenizer regex, restricted to what the `re` module can express (ASCII captions).
WORD_RE = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2 map of the 256 bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(texts: list[str], max_merges: int = 1000, min_count: int = 2) -> list[tuple[str, str]]:
    """Merges learned from `texts` (lower-cased, CLIP pre-tokenized), most frequent pair first."""
    byte_map = bytes_to_unicode()
    counts = collections.Counter(w for t in texts for w in WORD_RE.findall(t.lower().strip()))
    words = {}
    for w, c in counts.items():
        chars = [byte_map[b] for b in w.encode("utf-8")]
        words[tuple(chars[:-1] + [chars[-1] + "</w>"])] = c
    merges = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for sym, c in words.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += c
        if not pairs:
            break
        pair, c = max(pairs.items(), key=lambda kv: kv[1])  # Counter keeps insertion order for ties
        if c < min_count:
            break
        merges.append(pair)
        merged = {}
        for sym, cnt in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            merged[tuple(out)] = cnt
        words = merged
    return merges


def write_clip_vocab(folder: Path, merges: list[tuple[str, str]]) -> dict[str, int]:
    """Write vocab.json and merges.txt in CLIP's format; return the vocabulary."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in the vocabulary"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    return vocab
