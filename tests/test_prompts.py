"""A1111 prompt syntax: attention parsing, extra-network tags, chunking, emphasis, token counter."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

import mlsd
from mlsd.errors import UsageError
from mlsd.prompts import (
    BREAK,
    CHUNK_LEN,
    ExtraNetworkTag,
    LoraTag,
    apply_emphasis,
    chunks_to_tensors,
    count_tokens,
    equalize_chunk_counts,
    extract_extra_networks,
    extract_lora_tags,
    parse_prompt_attention,
    tokenize_weighted,
)

TOK_DIR = Path(mlsd.__file__).parent / "data" / "clip_tokenizer"


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer(str(TOK_DIR / "vocab.json"), str(TOK_DIR / "merges.txt"))


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# The examples from the docstring of A1111's parse_prompt_attention, with its expected outputs.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_a1111_docstring_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),  # escaped backslash is literal
        ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes, as in A1111
        ("a:1.3) b", [("a:1.3) b", 1.0)]),  # explicit weight with no open bracket is text
        ("a) b]", [("a) b]", 1.0)]),
        ("(a:0.5)", [("a", 0.5)]),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
        ("a break b, aBREAK", [("a break b, aBREAK", 1.0)]),  # lowercase or glued: plain text
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # deviation: A1111 weights the marker
        ("(a:.)", [("a:.", 1.1)]),  # deviation: A1111 raises ValueError
    ],
)
def test_attention_edge_cases(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_absurd_weights_stay_finite():
    ((text, w),) = parse_prompt_attention("(a:" + "9" * 400 + ")")
    assert text == "a" and w == 1e3
    assert 0 < parse_prompt_attention("[" * 9000 + "a")[0][1] < 1e-5


def test_lora_tags():
    clean, loras = extract_lora_tags(
        "a cat <lora:add_detail:0.5>, <lora:plain> <lora:split:0.3:0.7><lyco:ly:0.2> "
        "<lora:named:te=0.4:unet=0.9> <hypernet:h:1>"
    )
    assert loras == [
        LoraTag("add_detail", 0.5, 0.5),
        LoraTag("plain", 1.0, 1.0),
        LoraTag("split", 0.3, 0.7),
        LoraTag("ly", 0.2, 0.2),
        LoraTag("named", 0.4, 0.9),
    ]
    assert clean == "a cat ,    "
    _, tags = extract_extra_networks("x <hypernet:h:1>")
    assert tags == [ExtraNetworkTag("hypernet", ("h", "1"))]


@pytest.mark.parametrize("tag", ["<lora:x:abc>", "<lora:x:0.5:nan>", "<lora: :1>", "<lora:te=1>"])
def test_bad_lora_tags_raise_usage_error(tag):
    with pytest.raises(UsageError):
        extract_lora_tags(f"cat {tag}")


def test_tokenize_simple_and_weighted(tok):
    (chunk,) = tokenize_weighted("a photo of a (cat:1.5)", tok)
    expected = ids(tok, "a photo of a ") + ids(tok, "cat")
    assert chunk.length == len(expected) and list(chunk.ids[: chunk.length]) == expected
    assert chunk.ids[chunk.length :] == (49407,) * (CHUNK_LEN - chunk.length)
    assert chunk.weights[: chunk.length] == (1.0,) * (chunk.length - 1) + (1.5,)
    assert set(chunk.weights[chunk.length :]) == {1.0}


def test_empty_prompt_is_one_empty_chunk(tok):
    (chunk,) = tokenize_weighted("", tok)
    assert chunk.length == 0 and chunk.ids == (49407,) * CHUNK_LEN
    assert count_tokens("", tok) == (0, 75)


def test_long_prompt_splits_at_75(tok):
    chunks = tokenize_weighted("cat " * 100, tok)
    assert [c.length for c in chunks] == [75, 25]
    assert count_tokens("cat " * 100, tok) == (100, 150)


def test_comma_backtrack_moves_last_words(tok):
    cat, dog = ids(tok, "cat")[0], ids(tok, "dog")[0]
    prompt = "cat " * 70 + ", " + "dog " * 10
    chunks = tokenize_weighted(prompt, tok)
    assert [c.length for c in chunks] == [71, 10]  # the 4 dogs before the limit moved along
    assert chunks[1].ids[:10] == (dog,) * 10 and chunks[0].ids[69] == cat
    assert [c.length for c in tokenize_weighted(prompt, tok, comma_backtrack=0)] == [75, 6]
    # a comma further back than 20 tokens is not used
    assert [c.length for c in tokenize_weighted("cat " * 10 + ", " + "dog " * 70, tok)] == [75, 6]


def test_break_forces_new_chunk(tok):
    assert [c.length for c in tokenize_weighted("a cat BREAK a dog", tok)] == [2, 2]
    assert [c.length for c in tokenize_weighted("BREAK cat", tok)] == [0, 1]
    assert [c.length for c in tokenize_weighted("cat BREAK", tok)] == [1]
    assert count_tokens("cat BREAK dog", tok) == (76, 150)  # A1111 counts a broken chunk as full


def test_extra_network_tags_never_reach_clip(tok):
    assert tokenize_weighted("cat <lora:x:1> dog", tok) == tokenize_weighted("cat  dog", tok)
    assert count_tokens("cat <lora:detail:0.5>", tok) == (1, 75)


def test_tensor_layout_sd1_and_sd2(tok):
    sd1 = tokenize_weighted("a cat", tok)
    sd2 = tokenize_weighted("a cat", tok, pad_id=0)
    a_cat = ids(tok, "a cat")
    i1, w1 = chunks_to_tensors(sd1)
    i2, w2 = chunks_to_tensors(sd2)
    assert i1.shape == i2.shape == w1.shape == (1, 77) and i1.dtype == torch.long
    assert i1[0].tolist() == [49406, *a_cat] + [49407] * 74
    assert i2[0].tolist() == [49406, *a_cat, 49407] + [0] * 73  # EOS, then SD2's "!" padding
    assert torch.all(w1 == 1)


def test_tokenizer_pad_token_is_default(tok):
    sd2_tok = CLIPTokenizer(str(TOK_DIR / "vocab.json"), str(TOK_DIR / "merges.txt"), pad_token="!")
    assert tokenize_weighted("cat", sd2_tok)[0].ids[1:] == (0,) * 74


def test_equalize_chunk_counts(tok):
    cond = tokenize_weighted("cat " * 100, tok)
    uncond = tokenize_weighted("", tok)
    c, u = equalize_chunk_counts(cond, uncond, pad_id=49407)
    assert len(c) == len(u) == 2 and c == cond
    assert u[1].length == 0 and u[1].ids == (49407,) * 75 and u[1].weights == (1.0,) * 75


def test_apply_emphasis_matches_a1111_formula():
    torch.manual_seed(0)
    hidden = torch.randn(2, 77, 8) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 5:9] = 0.7
    out = apply_emphasis(hidden, weights)
    for i in range(2):
        z = hidden[i] * weights[i][:, None]
        expected = z * (hidden[i].mean() / z.mean())
        assert torch.allclose(out[i], expected, atol=1e-6)
        assert torch.allclose(out[i].mean(), hidden[i].mean(), atol=1e-6)
    assert torch.equal(apply_emphasis(hidden, torch.ones(2, 77)), hidden)
    assert torch.isfinite(apply_emphasis(hidden, torch.zeros(2, 77))).all()


FRAGMENTS = ["(", ")", "[", "]", ":", "\\", "1.3", ":0.5)", "BREAK", " ", "cat", ",", "é", "日本", "<lora:x:0.5>"]  # fmt: skip
prompts = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=150).map("".join),
)


def explicit_weights_positive(text):
    for w in re.findall(r":([+-]?[.\d]+)\)", text):
        try:
            if float(w) <= 0:
                return False
        except ValueError:
            pass
    return True


@settings(max_examples=80, deadline=None)
@given(prompts)
def test_parse_never_crashes_and_weights_are_sane(text):
    for seg, w in parse_prompt_attention(text):
        if (seg, w) == BREAK:
            continue
        assert math.isfinite(w)
        if explicit_weights_positive(text):
            assert w > 0


@settings(max_examples=40, deadline=None)
@given(prompts)
def test_tokenize_never_crashes_and_chunks_are_75(tok, text):
    chunks = tokenize_weighted(text, tok)
    assert chunks
    for c in chunks:
        assert len(c.ids) == len(c.weights) == CHUNK_LEN and 0 <= c.length <= CHUNK_LEN
        assert all(math.isfinite(w) for w in c.weights)
    ids_t, w_t = chunks_to_tensors(chunks)
    assert ids_t.shape == w_t.shape == (len(chunks), 77)
    used, capacity = count_tokens(text, tok)
    assert capacity % 75 == 0 and capacity >= used
