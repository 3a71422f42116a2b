"""sdlite's CLIP tokenizer against transformers' CLIPTokenizer (5.x, backed by HF tokenizers).

The parity tests run over >1,000 seeded random prompts that mix plain words with punctuation,
digits, accents, CJK, Cyrillic, combining marks, emoji, odd whitespace, contractions, URLs, case
changes, special-token text, and prompts far over 77 tokens; for SD 1's pad token and SD 2's "!".
"""

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
from reference_models import CLIP_VOCAB, write_tokenizer

from sdlite.tokenizer import CLIPTokenizer

WORDS = (
    "a photo of an astronaut riding horse on mars highly detailed portrait by greg rutkowski "
    "trending artstation digital painting concept art sharp focus illustration cinematic lighting "
    "the cat dog sitting in garden beautiful landscape sunset over mountains oil canvas octane render "
    "unreal engine masterpiece best quality ultra realistic cyberpunk city night rain neon"
).split()
PUNCTUATION = list(",.!?;:-_/\\|@#$%^&*+=~`\"'<>()[]{}")
PUNCTUATION += ["!!", "...", "((", "))", ":1.2", "--", "?!", "—", "…", "«»"]
NUMBERS = ["8k", "4K", "1024x768", "3.14", "2023", "1st", "0", "007", "50mm", "f/1.8", "100%", "#1"]
UNICODE = [
    "café", "naïve", "Zürich", "Ångström", "façade", "Straße", "ΟΔΟΣ", "Σίσυφος", "İstanbul", "Москва",
    "Привет", "ЁЖИК", "東京", "日本語の文章", "中文字符", "한국어", "العربية", "עברית", "हिन्दी", "ไทย",
    "e\u0301te\u0301", "A\u030a", "Z\u0327\u0301", "n\u0303o", "\u0301alone", "ﬁne", "Ⅻ", "½", "x²", "٣٤",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ＡＢＣ１２３", "ǅungla", "ß", "ΐ", "Ⓐ", "\U00031350new", "\U00010d50\U00010d40",
]
EMOJI = ["😀", "🎨", "👩\u200d🚀", "👍🏽", "🇯🇵", "❤️", "🐱\u200d👤", "⭐", "™", "©", "🔥🔥", "🙂x", "\u200b"]
CONTRACTIONS = [
    "it's", "don't", "we're", "you've", "I'm", "they'll", "he'd", "IT'S", "'s", "'tis", "rock'n'roll",
    "o'clock", "it’s", "'ll've", "''s", "!'s", "the'rest",
]
URLS = ["https://example.com/path?q=1&x=y#frag", "www.Example.ORG", "user@mail.com", "http://a.b/c_d-e.png"]
SPECIAL_TEXT = [
    "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|", "<|", "x<|endoftext|>y", "!<|endoftext|>!",
]
SEPARATORS = [" "] * 12 + ["", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x1c", "\u2028", " \t "]
POOLS = [WORDS] * 8 + [PUNCTUATION] * 2 + [NUMBERS, UNICODE, UNICODE, EMOJI, CONTRACTIONS, URLS, SPECIAL_TEXT]


def random_prompt(rng: random.Random) -> str:
    length = rng.choice([rng.randint(1, 12), rng.randint(10, 40), rng.randint(60, 140)])
    prompt = rng.choice(["", "", " ", "\n", "\t "])
    for _ in range(length):
        word = rng.choice(rng.choice(POOLS))
        case = rng.random()
        if case < 0.1:
            word = word.upper()
        elif case < 0.2:
            word = word.title()
        elif case < 0.25:
            word = "".join(c.upper() if rng.random() < 0.5 else c for c in word)
        prompt += word + rng.choice(SEPARATORS)
    return prompt


def random_codepoints(rng: random.Random) -> str:
    """Characters from all over Unicode, including unassigned and newer-than-Python ones."""
    ranges = [
        (0x20, 0x2FF), (0x300, 0x36F), (0x370, 0x52F), (0x1E00, 0x2BFF), (0x3000, 0x9FFF),
        (0x10000, 0x1FAFF), (0x20000, 0x323AF),
    ]
    chars = []
    for _ in range(rng.randint(1, 30)):
        low, high = rng.choice(ranges)
        code = rng.randint(low, high)
        chars.append(chr(code) * rng.choice([1, 1, 2]) + rng.choice(["", "", " ", "a"]))
    return "".join(chars)


def prompts(count: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_prompt(rng) if rng.random() < 0.85 else random_codepoints(rng) for _ in range(count)]


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    """(sdlite's, the reference's) tokenizer loaded from the same folder."""
    from transformers import CLIPTokenizer as ReferenceTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder, request.param)
    return CLIPTokenizer.from_folder(folder), ReferenceTokenizer.from_pretrained(folder)


def reference_ids(reference, texts: list[str]) -> list[list[int]]:
    return reference(texts, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.filterwarnings("ignore:The prompt was truncated")
def test_matches_reference_on_random_prompts(pair):
    ours, reference = pair
    texts = prompts()
    assert sum(len(ours.encode(t)) > 75 for t in texts) > 100  # many are truncated
    assert ours(texts) == reference_ids(reference, texts)
    # Without truncation too, so the whole of every prompt is compared.
    assert [ours.encode(t) for t in texts] == reference(texts, add_special_tokens=False).input_ids


def test_known_ids_and_properties(pair):
    ours, reference = pair
    assert ours.encode("a photo of") == [320, 1125, 539]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.max_length) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, 77,
    )
    # The reference cuts every special token, the pad token "!" included, out of the raw text.
    text = "Wow!! <|endoftext|>x <|startoftext|>"
    assert ours([text]) == reference_ids(reference, [text])


@pytest.mark.filterwarnings("ignore:The prompt was truncated")
def test_decode_matches_reference(pair):
    ours, reference = pair
    for text in prompts(100, seed=1):
        ids = ours(text)[0] if text else [ours.bos_id]
        for start, stop in ((0, None), (1, 9), (3, 40), (7, None)):
            assert ours.decode(ids[start:stop]) == reference.decode(ids[start:stop])


def test_truncation_warns_and_keeps_eos(pair):
    ours, reference = pair
    text = " ".join(["cat"] * 100) + " dog"
    with pytest.warns(UserWarning, match=r"26 tokens were dropped: 'cat cat .* dog'"):
        (ids,) = ours(text)
    assert len(ids) == 77 and ids[-1] == ours.eos_id and ids[-2] != ours.eos_id
    assert [ids] == reference_ids(reference, [text])
    with pytest.warns(UserWarning, match="1 tokens were dropped: 'dog'"):
        ours(" ".join(["cat"] * 75) + " dog")


def test_short_prompts_do_not_warn(pair):
    ours, _ = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = ours(["a photo of a cat", "", " ".join(["cat"] * 75)])
    assert [len(ids) for ids in batch] == [77, 77, 77]
    assert batch[1] == [ours.bos_id, ours.eos_id] + [ours.pad_id] * 75


def write_small_vocab(folder: Path, merges: list[tuple[str, str]]) -> None:
    """A project-style vocabulary in CLIP's format: specials first, then the 256 byte symbols with
    and without "</w>", then one token per merge."""
    clip_vocab = json.loads((CLIP_VOCAB / "vocab.json").read_text(encoding="utf-8"))
    byte_symbols = sorted((t for t, i in clip_vocab.items() if i < 256), key=clip_vocab.get)
    tokens = ["<|startoftext|>", "<|endoftext|>", *byte_symbols, *(s + "</w>" for s in byte_symbols)]
    tokens += [left + right for left, right in merges if left + right not in tokens]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                  pad_token="<|endoftext|>", model_max_length=16)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_small_custom_vocabulary_matches_reference(tmp_path):
    from transformers import CLIPTokenizer as ReferenceTokenizer

    merges = [
        ("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("i", "n"), ("in", "g</w>"), ("a", "n"),
        ("an", "d</w>"), ("Ã", "©"), ("e", "s"),
        # Out of order on purpose ("aa a" ranks before "a a"), and two pairs making the same token:
        # this checks that merges follow the reference's heap order, not a simpler loop.
        ("aa", "a"), ("a", "a"), ("a", "bc"), ("b", "c"), ("ab", "c</w>"), ("a", "b"),
    ]
    write_small_vocab(tmp_path, merges)
    ours, reference = CLIPTokenizer.from_folder(tmp_path), ReferenceTokenizer.from_pretrained(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.max_length) == (0, 1, 1, 16)
    texts = ["the cat and the singing", "aaaa aaaaa aaaaaa aaa", "abc abcabc aabcc", "Café é"]
    texts += prompts(300, seed=2)
    assert [ours.encode(t) for t in texts] == reference(texts, add_special_tokens=False).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours(texts) == reference(texts, padding="max_length", max_length=16, truncation=True).input_ids


def test_packaged_vocabulary(tmp_path):
    config = {"pad_token": {"content": "!"}, "model_max_length": 20}  # an AddedToken as a dict
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    expected = {None: (49407, 77), tmp_path: (0, 20)}
    for folder, (pad_id, length) in expected.items():
        tokenizer = CLIPTokenizer.from_folder(folder)
        assert tokenizer.encode("a photo of") == [320, 1125, 539]
        assert (tokenizer.pad_id, tokenizer.max_length) == (pad_id, length)


@pytest.mark.parametrize("setting, positions, length", [
    (None, None, 77), (None, 16, 16), (1000000000000000019884624838656, 16, 16),  # transformers' placeholder
    (1000000000000000019884624838656, None, 77), (12, 16, 12), (16, 16, 16)])
def test_length_fits_the_text_encoders_positions(tmp_path, setting, positions, length):
    if setting is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": setting}))
    assert CLIPTokenizer.from_folder(tmp_path, positions).max_length == length


def test_a_length_past_the_text_encoders_positions_is_an_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    with pytest.raises(ValueError, match="model_max_length 32 is more than the 16 positions"):
        CLIPTokenizer.from_folder(tmp_path, 16)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    shutil.copy(CLIP_VOCAB / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree parts here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt, line 3"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\n", encoding="utf-8")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="'<pad>' is not in the vocabulary"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json is not valid JSON"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="'zz'"):
        CLIPTokenizer({"<|startoftext|>": 0, "<|endoftext|>": 1, "z": 2}, [("z", "z")])
    with pytest.raises(ValueError, match="Token id 99"):
        CLIPTokenizer.from_folder(None).decode([99999])
