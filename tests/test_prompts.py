"""Long and weighted prompts (sdlite.prompts): parsing rules, chunking, weighting, and that a
plain prompt gives exactly the default encoding."""

import pytest
import torch

from sdlite import StableDiffusion
from sdlite.prompts import BREAK, batch_chunks, parse_weights, reweight, weighted_chunks
from sdlite.tokenizer import CLIPTokenizer

LONG = ", ".join(f"word{i} red circle" for i in range(40))  # well over 75 tokens


@pytest.mark.parametrize("text, expected", [
    ("a cat", [("a cat", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]),
    ("a [red] cat", [("a ", 1.0), ("red", 1 / 1.1), (" cat", 1.0)]),
    ("(red:1.3) cat", [("red", 1.3), (" cat", 1.0)]),
    ("((red)) [[blue]]", [("red", 1.1 * 1.1), (" ", 1.0), ("blue", 1 / 1.1 / 1.1)]),
    ("(a (red:1.5) cat:0.5)", [("a ", 0.5), ("red", 0.75), (" cat", 0.5)]),
    (r"\(literal\) and (open", [("(literal) and ", 1.0), ("open", 1.1)]),
    ("stray) bracket", [("stray) bracket", 1.0)]),
    ("a BREAK b", [("a", 1.0), (BREAK, 1.0), ("b", 1.0)]),
    ("lone \\ backslash, kept \\\\ one", [("lone  backslash, kept \\ one", 1.0)]),  # as the web UI
])
def test_emphasis_rules(text, expected):
    got = parse_weights(text)
    assert [f for f, _ in got] == [f for f, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("text", ["a [cat:dog:0.5]", "a [cat|dog]"])
def test_prompt_editing_and_alternation_warn(text, recwarn):
    with pytest.warns(UserWarning, match="not supported"):
        parse_weights(text)
    for plain in (r"a \[cat:dog:0.5\] and (cat:1.2) [dog]", "[(cat:1.2)]", "[red, (blue:1.3)]"):
        parse_weights(plain)  # escaped brackets and emphasis, weights inside [ ] too: no warning
    assert not [w for w in recwarn if "editing" in str(w.message)]


def test_a_weight_that_is_not_a_number_is_a_clear_error():
    with pytest.raises(ValueError, match=r"prompt weight '1.2.3' in '.*' is not a number"):
        parse_weights("a (red:1.2.3) circle")


def test_chunks_of_75_tokens():
    tokenizer = CLIPTokenizer.from_folder(None)
    tokens = tokenizer.encode(LONG)
    ids, weights = weighted_chunks(tokenizer, LONG)
    assert len(ids) == -(-len(tokens) // 75) and all(len(row) == 77 for row in ids)
    assert ids[0] == [tokenizer.bos_id, *tokens[:75], tokenizer.eos_id]
    assert ids[1][1:1 + len(tokens[75:150])] == tokens[75:150]
    assert weights[0] == [1.0] * 77
    # a short plain prompt: the tokenizer's own ids, all weights 1
    short, short_weights = weighted_chunks(tokenizer, "a red circle")
    assert short == tokenizer(["a red circle"]) and short_weights == [[1.0] * 77]
    rows, _, k = batch_chunks(tokenizer, [LONG, ""])
    assert k == len(ids) and len(rows) == 2 * k  # the negative prompt is padded with empty chunks


def test_reweight_keeps_the_mean():
    states = torch.randn(2, 77, 8)
    weights = torch.ones(2, 77)
    assert torch.equal(reweight(states, weights), states)
    weights[:, 3] = 1.5
    out = reweight(states, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), states.mean(dim=(1, 2)), atol=1e-6)
    assert not torch.allclose(out, states)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_long_prompts_in_the_pipeline(family_model, kind):
    folder, _ = family_model(kind)
    plain = StableDiffusion.from_pretrained(folder)
    long = StableDiffusion.from_pretrained(folder, long_prompts=True)
    args = dict(steps=2, seed=0, height=64, width=64, cfg=5.0, negative_prompt="blurry")
    # a plain short prompt: exactly the default conditioning
    assert plain.text_to_image("a red circle", **args)[0].tobytes() == long.text_to_image("a red circle", **args)[0].tobytes()
    states, _ = long._conditioning(LONG, "blurry", 1, True, (64, 64))
    chunks = len(weighted_chunks(long.tokenizer, LONG)[0])
    assert chunks > 1 and states.shape[:2] == (2, 77 * chunks)
    # each chunk is encoded like a short prompt
    first_chunk = long.tokenizer.decode(long.tokenizer.encode(LONG)[:75])
    reference, _ = plain._conditioning(first_chunk, "blurry", 1, True, (64, 64))
    assert torch.allclose(states[1, :77], reference[1], atol=1e-5)
    emphasised, _ = long._conditioning("a (red:1.4) circle", "", 1, False, (64, 64))
    unweighted, _ = long._conditioning("a red circle", "", 1, False, (64, 64))
    assert not torch.allclose(emphasised, unweighted)
    image = long.text_to_image(LONG, **args)[0]
    assert image.size == (64, 64)
