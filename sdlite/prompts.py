"""Long and weighted prompts in the syntax of the common Stable Diffusion web UIs (AUTOMATIC1111).

Off by default (`from_pretrained(..., long_prompts=True)`, `--long-prompts`): without it a prompt
is tokenized and encoded exactly as diffusers does. With it:

- Emphasis: `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1,
  `(text:1.3)` multiplies it by 1.3; brackets nest (weights multiply); `\\(`, `\\)`, `\\[`, `\\]`
  are literal brackets; a bracket left open applies to the rest of the prompt; a stray closing one
  is kept as text. `BREAK` (capitals, as a word) ends the current chunk, inside brackets too (the
  web UI reads it there as a word). Prompt editing and alternation (`[a:b:0.5]`, `[a|b]`) are not
  implemented: they warn, and are read as emphasis and text.
- Length: the prompt's tokens are cut into chunks of 75 (the context of 77 less bos and eos); each
  chunk is encoded on its own as bos + tokens + eos + padding, exactly like a short prompt, and
  the chunks' states are concatenated along the sequence (77 states per chunk). The prompts of a
  batch (prompt and negative prompt) are padded with empty-prompt chunks to the same count (the
  web UI does that only with its "pad prompt/negative prompt" option, and otherwise runs them
  apart). No comma backtracking: chunks break at exactly 75 tokens (the web UI goes back to the
  last comma within 20 tokens).
- Weights scale each token's output state (bos, eos and padding keep 1); then each chunk's states
  are rescaled so their mean is the unweighted mean (the web UI's "mean restore").
- SDXL: both encoders are chunked alike; the pooled output is the second encoder's for the first
  chunk.

A prompt without brackets and within 75 tokens gives the same ids and weights 1, so the same
conditioning as with the option off.
"""

import re
import warnings

import torch

ROUND_BRACKETS = 1.1
SQUARE_BRACKETS = 1 / 1.1
BREAK = object()  # a fragment that ends the current chunk

# AUTOMATIC1111's prompt_parser.re_attention: escapes, brackets, ":weight)", text runs.
ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
# The web UI's prompt editing [a:b:0.5] / [a:0.5] and alternation [a|b] (not (a:1.2) inside [ ]).
EDITING = re.compile(r"(?<!\\)\[[^\[\]()]*:\s*[+-]?[.\d]+\s*\]|(?<!\\)\[[^\[\]]*\|[^\[\]]*\]")


def parse_weights(text: str) -> list[tuple]:
    """`text` as (fragment, weight) pairs, neighbours of equal weight merged; BREAK as (BREAK, 1)."""
    fragments: list[list] = []
    round_open, square_open = [], []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[0] is not BREAK:
                fragment[1] *= factor

    if EDITING.search(text):
        warnings.warn("prompt editing and alternation ([a:b:0.5], [a|b]) are not supported: the brackets "
                      "are read as emphasis and the rest as text")
    for match in ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):  # an escaped character; a lone backslash is dropped, as the web UI does
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} in {token.strip()!r} is not a number") from None
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_BRACKETS)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_BRACKETS)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    fragments.append([BREAK, 1.0])
                fragments.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_BRACKETS)
    for start in square_open:
        multiply(start, SQUARE_BRACKETS)
    merged: list[list] = []
    for fragment in fragments:
        if merged and fragment[0] is not BREAK and merged[-1][0] is not BREAK and merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        elif fragment[0] == "":
            continue
        else:
            merged.append(fragment)
    return [tuple(f) for f in merged]


def weighted_chunks(tokenizer, text: str) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and weights of `text`, in chunks of tokenizer.max_length (77) each."""
    size = tokenizer.max_length - 2
    chunks, tokens, weights = [], [], []

    def close() -> None:
        pad = size - len(tokens)
        ids = [tokenizer.bos_id, *tokens, tokenizer.eos_id] + [tokenizer.pad_id] * pad
        chunks.append((ids, [1.0, *weights, 1.0] + [1.0] * pad))
        tokens.clear()
        weights.clear()

    for fragment, weight in parse_weights(text):
        if fragment is BREAK:
            close()
            continue
        for token in tokenizer.encode(fragment):
            if len(tokens) == size:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return [ids for ids, _ in chunks], [w for _, w in chunks]


def batch_chunks(tokenizer, prompts: list[str]) -> tuple[list[list[int]], list[list[float]], int]:
    """Chunks of every prompt, padded with empty-prompt chunks to the same count k; returns the
    (P*k) id rows, their weights and k."""
    per_prompt = [weighted_chunks(tokenizer, p) for p in prompts]
    k = max(len(ids) for ids, _ in per_prompt)
    empty_ids, empty_weights = weighted_chunks(tokenizer, "")
    rows, weights = [], []
    for ids, w in per_prompt:
        rows += ids + empty_ids * (k - len(ids))
        weights += w + empty_weights * (k - len(w))
    return rows, weights, k


def reweight(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """states (N, T, D) scaled by weights (N, T), each row then rescaled to its original mean."""
    original = states.mean(dim=(1, 2), keepdim=True)
    weighted = states * weights[:, :, None]
    return weighted * (original / weighted.mean(dim=(1, 2), keepdim=True))
