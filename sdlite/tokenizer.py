"""CLIP's byte-level BPE tokenizer in pure Python (stdlib only: no torch, no `regex`).

Matches `transformers.CLIPTokenizer` 5.x, which is backed by HF `tokenizers`, id for id:

1. Special tokens (bos, eos and the pad token) are cut out of the raw text, before any cleanup,
   and map straight to their ids. With SD 2's pad token "!" this means every "!" in a prompt
   becomes the pad id 0 rather than the BPE token "!</w>" (256): the reference does exactly that.
2. Each remaining segment is cleaned: Unicode NFC, then per-character lower-casing (so "Σ" is
   always "σ", never the final "ς"). Whitespace only separates words. There is no ftfy and no
   HTML unescaping.
3. The segment is split into words as CLIP's regex does: the contractions 's 't 're 've 'm 'll 'd,
   runs of letters, single digits, runs of anything else that is not whitespace. Text that reads
   "<|startoftext|>" or "<|endoftext|>" only after cleanup ("<|ENDOFTEXT|>") is not a special
   token: it becomes the three words "<|", "endoftext", "|>".
4. Each word's UTF-8 bytes map to printable characters (GPT-2's byte-to-unicode table), "</w>"
   marks its last symbol, and the merges apply lowest rank first, leftmost first among equals
   (the BPE of Sennrich et al. 2016, as GPT-2 and CLIP use it). Any text therefore encodes.

"Letter", "number", "whitespace" and lower-casing follow the reference (tokenizers 0.23: Oniguruma
with Unicode 16, Rust's char::to_lowercase), not Python's `unicodedata` (Unicode 14 on Python
3.11); the differences are spelled out below. Checked against the reference for every code point.
"""

import bisect
import functools
import heapq
import json
import re
import unicodedata
import warnings
from collections.abc import Iterable
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
PACKAGED_VOCAB = Path(__file__).parent / "data" / "clip"
# transformers writes `model_max_length` int(1e30) for a tokenizer that sets no length; no CLIP
# has a million positions, so larger values are read as no length.
PLACEHOLDER_LENGTH = 10**6

CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# The literal names CLIP's split regex keeps whole (hard-coded there, whatever the bos/eos tokens).
SPECIAL_TEXT = ("<|startoftext|>", "<|endoftext|>")
# Oniguruma's \s: Unicode White_Space. Python's str.isspace() also counts \x1c-\x1f; CLIP does not.
WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# Letters and numbers of Unicode 15.0-16.0, which Python 3.11's unicodedata (Unicode 14) reports
# as unassigned. Inclusive code point ranges.
NEW_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3), (0x10D4A, 0x10D65),
    (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240), (0x11380, 0x11389),
    (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113B7),
    (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11BC0, 0x11BE0), (0x11F02, 0x11F02),
    (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F), (0x13441, 0x13446),
    (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C), (0x18CFF, 0x18CFF),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D),
    (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0), (0x2B739, 0x2B739),
    (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
NEW_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59),
    (0x16130, 0x16139), (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3),
    (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
# Lower-case mappings of newer Unicode that the reference (Rust's char::to_lowercase) applies:
# (first, last, lower-case of first), consecutive code points mapping to consecutive ones.
NEW_LOWERCASE = (
    (0x1C89, 0x1C89, 0x1C8A), (0xA7CB, 0xA7CB, 0x0264), (0xA7CC, 0xA7CC, 0xA7CD),
    (0xA7CE, 0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2, 0xA7D3), (0xA7D4, 0xA7D4, 0xA7D5),
    (0xA7DA, 0xA7DA, 0xA7DB), (0xA7DC, 0xA7DC, 0x019B), (0x10D50, 0x10D65, 0x10D70),
    (0x16EA0, 0x16EB8, 0x16EBB),
)
_LOWERCASE_TABLE = {
    c: lower + c - first for first, last, lower in NEW_LOWERCASE for c in range(first, last + 1)
}


def _in_ranges(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    i = bisect.bisect_right(ranges, (code, 0x10FFFF)) - 1
    return i >= 0 and ranges[i][0] <= code <= ranges[i][1]


def char_kind(c: str) -> str:
    """"L" letter, "N" number, " " whitespace, or "P" for anything else (punctuation, symbols,
    combining marks, emoji, controls)."""
    category = unicodedata.category(c)
    if category[0] in "LN":
        return category[0]
    if c in WHITESPACE:
        return " "
    if category == "Cn":
        if _in_ranges(ord(c), NEW_LETTERS):
            return "L"
        if _in_ranges(ord(c), NEW_NUMBERS):
            return "N"
    return "P"


def clean(text: str) -> str:
    """NFC, then lower-case each character on its own (Python's str.lower alone would turn a
    word-final "Σ" into "ς")."""
    text = unicodedata.normalize("NFC", text).replace("Σ", "σ")
    return text.lower().translate(_LOWERCASE_TABLE)


def split_words(text: str) -> list[str]:
    """Split cleaned text into the words that BPE encodes one at a time (see module docstring)."""
    words = []
    i = 0
    while i < len(text):
        kind = char_kind(text[i])
        if kind == " ":
            i += 1
            continue
        if text[i] == "<" and text.startswith(SPECIAL_TEXT, i):
            name = next(s for s in SPECIAL_TEXT if text.startswith(s, i))
            words += ["<|", name[2:-2], "|>"]
            i += len(name)
            continue
        if text[i] == "'" and text.startswith(CONTRACTIONS, i):
            contraction = next(s for s in CONTRACTIONS if text.startswith(s, i))
            words.append(contraction)
            i += len(contraction)
            continue
        end = i + 1
        if kind != "N":  # letters and "other" come in runs, digits one by one
            while end < len(text) and char_kind(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: printable Latin-1
    bytes stand for themselves, the other 68 take the code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


class CLIPTokenizer:
    """Prompt text -> CLIP token ids, padded and truncated as Stable Diffusion's pipelines do."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        max_length: int = 77,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
    ):
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"The {name} token {token!r} is not in the vocabulary.")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for bos and eos, got {max_length}.")
        self.vocab = dict(vocab)
        self.tokens = {i: token for token, i in self.vocab.items()}
        # (left, right) -> (rank, merged). As in the reference, a repeated pair keeps its last rank.
        self.merges = {}
        for rank, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in self.vocab:
                    raise ValueError(f"Merge {rank} ({left} {right}) needs {part!r}, not in the vocabulary.")
            self.merges[(left, right)] = (rank, left + right)
        self.special_ids = {token: self.vocab[token] for token in (bos_token, eos_token, pad_token)}
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self._bos_id, self._eos_id, self._pad_id = (self.vocab[t] for t in (bos_token, eos_token, pad_token))
        self._max_length = max_length
        self.byte_chars = bytes_to_unicode()
        self.char_bytes = {c: b for b, c in self.byte_chars.items()}
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._bpe)  # per-word cache

    @classmethod
    def from_folder(cls, folder: Path | None, positions: int | None = None) -> "CLIPTokenizer":
        """Load a diffusers `tokenizer/` folder: vocab.json and merges.txt, and the special tokens
        and `model_max_length` from tokenizer_config.json, overridden by special_tokens_map.json
        (the order transformers reads them in). A folder without vocab.json and merges.txt, or
        None, uses the CLIP vocabulary packaged with sdlite.

        `positions` is the text encoder's `max_position_embeddings`: the length when the folder
        sets none (or transformers' placeholder), and a longer one is an error, since the encoder
        has no position embedding for the tokens past it. Without it the default length is 77."""
        settings = {}
        vocab_folder = PACKAGED_VOCAB
        if folder is not None:
            folder = Path(folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"Tokenizer folder {folder} does not exist.")
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (folder / name).is_file():
                    settings.update(_read_json(folder / name, dict))
            if (folder / "vocab.json").exists() or (folder / "merges.txt").exists():
                vocab_folder = folder
        for path in (vocab_folder / "vocab.json", vocab_folder / "merges.txt"):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (CLIP needs vocab.json and merges.txt).")
        vocab = _read_json(vocab_folder / "vocab.json", dict)
        if not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{vocab_folder / 'vocab.json'} must map tokens to integer ids.")
        merges = read_merges(vocab_folder / "merges.txt")
        tokens = {}
        for key, default in (("pad_token", EOS_TOKEN), ("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
            value = settings.get(key, default)
            tokens[key] = value["content"] if isinstance(value, dict) else value  # an AddedToken dict
        try:
            length = int(settings.get("model_max_length", PLACEHOLDER_LENGTH))
            if length >= PLACEHOLDER_LENGTH:
                length = 77 if positions is None else positions
            if positions is not None and length > positions:
                raise ValueError(f"model_max_length {length} is more than the {positions} positions of the "
                                 "text encoder")
            return cls(vocab, merges, max_length=length, **tokens)
        except ValueError as error:
            raise ValueError(f"Tokenizer {folder if folder is not None else vocab_folder}: {error}") from None

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def encode(self, text: str) -> list[int]:
        """The BPE ids of `text`, without bos/eos and without truncation."""
        ids = []
        for segment in self._split_special(text):
            if segment in self.special_ids:
                ids.append(self.special_ids[segment])
                continue
            for word in split_words(clean(segment)):
                ids += self._word_ids("".join(self.byte_chars[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, prompts: str | list[str]) -> list[list[int]]:
        """bos + ids + eos for each prompt, cut to max_length (eos kept last) and padded with the
        pad id to max_length. Warns once per prompt that had to be cut, as diffusers does."""
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = []
        for prompt in prompts:
            ids = self.encode(prompt)
            keep = self.max_length - 2
            if len(ids) > keep:
                warnings.warn(
                    f"The prompt was truncated because CLIP can only handle sequences up to "
                    f"{self.max_length} tokens; {len(ids) - keep} tokens were dropped: "
                    f"{self.decode(ids[keep:])!r}",
                    UserWarning,
                    stacklevel=2,
                )
            ids = [self.bos_id, *ids[:keep], self.eos_id]
            batch.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text: bytes joined, "</w>" read as a space, special tokens kept as text."""
        data = bytearray()
        for i in ids:
            if i not in self.tokens:
                raise ValueError(f"Token id {i} is not in the vocabulary (size {len(self.vocab)}).")
            token = self.tokens[i]
            if all(c in self.char_bytes for c in token):
                data += bytes(self.char_bytes[c] for c in token)
            else:  # a special token outside the byte alphabet stands for itself
                data += token.encode("utf-8")
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def _split_special(self, text: str) -> list[str]:
        """Cut the special tokens out of the raw text (leftmost match, the longest on a tie)."""
        return [segment for segment in self.special_pattern.split(text) if segment]

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge one byte-mapped word into token ids, as HF tokenizers' `Word::merge_all` does: a
        heap of candidate pairs, lowest rank first and leftmost among equal ranks; a popped pair
        that no longer stands at its place is skipped."""
        symbols: list[str | None] = list(word)
        symbols[-1] += END_OF_WORD
        after = list(range(1, len(symbols) + 1))  # index of the next live symbol (len: none)
        before = list(range(-1, len(symbols) - 1))  # index of the previous live symbol (-1: none)
        heap = []

        def push(left: int) -> None:
            if 0 <= left and after[left] < len(symbols):
                merge = self.merges.get((symbols[left], symbols[after[left]]))
                if merge is not None:
                    heapq.heappush(heap, (merge[0], left, merge[1]))

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, left, merged = heapq.heappop(heap)
            right = after[left] if symbols[left] is not None else len(symbols)
            current = self.merges.get((symbols[left], symbols[right])) if right < len(symbols) else None
            if current is None or current[1] != merged:
                continue  # stale: the pair at `left` has changed since it was pushed
            symbols[left], symbols[right] = merged, None
            after[left] = after[right]
            if after[left] < len(symbols):
                before[after[left]] = left
            push(before[left])
            push(left)
        # A symbol outside the vocabulary becomes the unk token, which CLIP sets to eos.
        return tuple(self.vocab.get(s, self.eos_id) for s in symbols if s is not None)


def read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" line, then one "left right" pair per line, by rank."""
    lines = path.read_text(encoding="utf-8").splitlines()
    merges = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: expected 'left right', got {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


def _read_json(path: Path, kind: type):
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} should hold a JSON {kind.__name__}, not {type(value).__name__}.")
    return value
