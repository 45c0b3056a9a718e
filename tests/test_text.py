"""Text encoders: umT5 parity with diffusers' WanPipeline, the original Wan key map, the
packaged MiniLM (against sentence-transformers), the prompt cache and the factory."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from kinema.io.checkpoint import CheckpointError
from kinema.io.umt5_keys import (
    config_from_original,
    original_to_transformers,
    transformers_to_original,
)
from kinema.models.text import (
    CachedTextEncoder,
    MiniLMTextEncoder,
    TextEncoder,
    UMT5TextEncoder,
    clean_prompt,
    load_text_encoder,
    minilm_path,
)

PROMPTS = [
    "a red ball bounces on the floor",
    "  the   cat &amp;amp; the\tdog \n moves  left ",  # messy whitespace, double-escaped HTML
    "a small blue square moves left while the red ball bounces on the floor and the cat watches",
    "",  # the default negative prompt
]
CORPUS = [
    "a red ball bounces on the floor",
    "the cat & the dog move left",
    "a small blue square moves left while the cat watches",
    "amp; spaces   tabs\tand newlines",
]


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny umT5 in a diffusers-like folder, built without any download
# ---------------------------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A sentencepiece-like (Unigram + Metaspace) tokenizer that keeps runs of spaces and ends
    every sequence with ``</s>``, like umT5's; <pad> = 0 as in T5."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_umt5(vocab_size: int, seed: int = 0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64
    )
    return UMT5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wan")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    tiny_umt5(len(tokenizer)).save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def diffusers_embeds(folder: Path, prompts: list[str], max_length: int) -> torch.Tensor:
    """The reference: diffusers' WanPipeline.encode_prompt on the same folder."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder"),
        vae=None,
        scheduler=None,
    )
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=torch.device("cpu"),
        )
    return embeds


# ---------------------------------------------------------------------------------------------
# umT5: parity with diffusers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [16, 512])
def test_umt5_matches_diffusers_encode_prompt(wan_folder: Path, max_length: int) -> None:
    encoder = UMT5TextEncoder.from_pretrained(wan_folder, max_length=max_length)
    tokens, mask = encoder.encode(PROMPTS)
    reference = diffusers_embeds(wan_folder, PROMPTS, max_length)
    assert tokens.shape == reference.shape == (len(PROMPTS), max_length, 32)
    assert (tokens - reference).abs().max().item() <= 1e-5
    assert mask.dtype == torch.bool and mask.shape == (len(PROMPTS), max_length)
    assert (tokens[~mask] == 0).all() and (tokens[mask].abs().sum(-1) > 0).all()
    assert mask.sum().item() > len(PROMPTS)  # not just end tokens
    assert isinstance(encoder, TextEncoder) and encoder.dim == 32


def test_umt5_separate_paths_and_truncation(wan_folder: Path) -> None:
    encoder = UMT5TextEncoder.from_pretrained(
        wan_folder / "text_encoder", wan_folder / "tokenizer", max_length=4
    )
    _, mask = encoder.encode([PROMPTS[2], ""])
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]  # truncated; "</s>" only


def test_prompt_cleaning_matches_diffusers_and_matters(wan_folder: Path) -> None:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    texts = [*PROMPTS, "caf\u00c3\u00a9 &lt;b&gt;", "a\x1cb", "x\u3000\u00a0y "]
    assert [clean_prompt(t) for t in texts] == [prompt_clean(t) for t in texts]
    assert clean_prompt(PROMPTS[1]) == "the cat & the dog moves left"
    # The tiny tokenizer sees the difference, so the parity test would catch a missing clean.
    tokenizer = AutoTokenizer.from_pretrained(wan_folder / "tokenizer")
    assert tokenizer(PROMPTS[1]).input_ids != tokenizer(clean_prompt(PROMPTS[1])).input_ids


def test_umt5_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="text_encoder"):
        UMT5TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        UMT5TextEncoder(tiny_umt5(8), None, max_length=0)


# ---------------------------------------------------------------------------------------------
# umT5: the original Wan key map
# ---------------------------------------------------------------------------------------------


def test_original_key_names_known_answers() -> None:
    """Names from Wan's wan/modules/t5.py (T5Encoder with shared_pos=False)."""
    model = tiny_umt5(50)
    original = transformers_to_original(model.state_dict(), num_layers=2)
    expected = {"token_embedding.weight", "norm.weight"} | {
        f"blocks.{n}.{name}.weight"
        for n in range(2)
        for name in [
            "norm1", "attn.q", "attn.k", "attn.v", "attn.o", "pos_embedding.embedding",
            "norm2", "ffn.gate.0", "ffn.fc1", "ffn.fc2",
        ]
    }  # fmt: skip
    assert set(original) == expected
    block = model.encoder.block[1].layer[1].DenseReluDense
    assert torch.equal(original["blocks.1.ffn.gate.0.weight"], block.wi_0.weight)
    assert torch.equal(original["blocks.1.ffn.fc2.weight"], block.wo.weight)
    config = config_from_original(original)
    assert (config["vocab_size"], config["d_model"], config["num_heads"], config["d_kv"]) == (
        50, 32, 4, 8,
    )  # fmt: skip
    assert (config["d_ff"], config["num_layers"], config["relative_attention_num_buckets"]) == (
        64, 2, 32,
    )  # fmt: skip


def test_original_ffn_semantics_match_transformers() -> None:
    """Wan's T5FeedForward is fc2(fc1(x) * gelu_tanh(gate.0(x))): check the map keeps that."""
    model = tiny_umt5(50)
    sd = transformers_to_original(model.state_dict(), num_layers=2)
    x = torch.randn(3, 32)
    gate = F.gelu(x @ sd["blocks.0.ffn.gate.0.weight"].T, approximate="tanh")
    wan = (x @ sd["blocks.0.ffn.fc1.weight"].T * gate) @ sd["blocks.0.ffn.fc2.weight"].T
    with torch.no_grad():
        ours = model.encoder.block[0].layer[1].DenseReluDense(x)
    assert torch.allclose(wan, ours, atol=1e-6)
    swapped = (x @ sd["blocks.0.ffn.gate.0.weight"].T) * F.gelu(
        x @ sd["blocks.0.ffn.fc1.weight"].T, approximate="tanh"
    )
    assert not torch.allclose(swapped @ sd["blocks.0.ffn.fc2.weight"].T, ours, atol=1e-4)


def test_original_round_trip_loads_strictly_same_outputs() -> None:
    model = tiny_umt5(50)
    back = original_to_transformers(transformers_to_original(model.state_dict(), 2), 2)
    fresh = tiny_umt5(50, seed=1)
    fresh.load_state_dict(back, strict=True)
    ids = torch.randint(0, 50, (2, 7))
    attention = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        want = model(ids, attention).last_hidden_state
        got = fresh(ids, attention).last_hidden_state
    assert torch.equal(want, got)
    with pytest.raises(ValueError, match="block 2"):
        original_to_transformers({"blocks.2.norm1.weight": torch.ones(1)}, num_layers=2)
    with pytest.raises(ValueError, match="unknown umT5"):
        original_to_transformers({"blocks.0.attn.q.bias": torch.ones(1)}, num_layers=2)


def test_from_original_pth_equals_from_pretrained(wan_folder: Path, tmp_path: Path) -> None:
    model = UMT5EncoderModel.from_pretrained(wan_folder / "text_encoder")
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(transformers_to_original(model.state_dict(), 2), pth)
    original = UMT5TextEncoder.from_original(pth, wan_folder / "tokenizer", max_length=16)
    pretrained = UMT5TextEncoder.from_pretrained(wan_folder, max_length=16)
    assert torch.equal(original.encode(PROMPTS)[0], pretrained.encode(PROMPTS)[0])
    bf16 = UMT5TextEncoder.from_original(pth, wan_folder / "tokenizer", dtype=torch.bfloat16)
    assert bf16.encode(PROMPTS[:1])[0].dtype == torch.bfloat16
    torch.save({"blocks.0.nope.weight": torch.ones(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth"):
        UMT5TextEncoder.from_original(tmp_path / "bad.pth", wan_folder / "tokenizer")


# ---------------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------------


def test_minilm_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    encoder = MiniLMTextEncoder(max_length=8)
    tokens, mask = encoder.encode(["a red ball"])
    assert tokens.shape == (1, 8, 384) and mask.sum().item() == 5  # [CLS] a red ball [SEP]


def test_minilm_tokens(minilm: MiniLMTextEncoder) -> None:
    prompts = ["A red ball bounces", "a red ball bounces", "a blue square moves left", "hi"]
    tokens, mask = minilm.encode(prompts)
    assert tokens.shape == (4, 32, 384) and tokens.dtype == torch.float32
    assert mask.sum(1).tolist() == [7, 7, 7, 3]  # "bounces" is two word pieces
    assert (tokens[~mask] == 0).all() and (tokens[mask].abs().sum(-1) > 0).all()
    assert torch.equal(tokens[0], tokens[1])  # lower-cased by the tokenizer
    assert (tokens[1] - tokens[2]).abs().max() > 0.1
    assert torch.equal(minilm.encode(["hi"])[0][0], tokens[3])
    assert not any(p.requires_grad for p in minilm.model.parameters())
    assert not minilm.model.training and minilm.dim == 384


def test_minilm_equals_sentence_transformers(minilm: MiniLMTextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    prompts = ["A red ball bounces on the floor", "a cat"]
    st = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)
    reference = st.encode(prompts, output_value="token_embeddings", convert_to_tensor=False)
    sentence = st.encode(prompts, convert_to_tensor=True)  # mean pooled, then normalised
    tokens, mask = minilm.encode(prompts)
    for row, ref, m in zip(tokens, reference, mask, strict=True):
        assert torch.allclose(row[m], ref, atol=1e-5)
    pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(F.normalize(pooled, dim=-1), sentence, atol=1e-5)


@pytest.mark.parametrize("kind", ["umt5", "minilm"])
def test_cut_prompts_names_what_a_long_prompt_keeps(wan_folder: Path, kind: str) -> None:
    """Growing prompts fit up to some length and are cut from then on; what a cut prompt keeps
    is itself a prompt that fits and gives the very tokens the long one gave."""
    if kind == "umt5":
        encoder = UMT5TextEncoder.from_pretrained(wan_folder, max_length=8)
    else:
        encoder = MiniLMTextEncoder(max_length=8)
    text = "a red ball moves left now and then it goes up and down"
    prompts = [text.rsplit(" ", k)[0] for k in range(text.count(" "), -1, -1)]  # 1 word, 2, ...
    cuts = encoder.cut_prompts(prompts)
    over = [kept is not None for kept in cuts]
    assert not over[0] and over[-1] and over == sorted(over)  # None..None, then cut
    tokens, _ = encoder.encode(prompts)
    for i in (over.index(True), len(prompts) - 1):
        assert encoder.cut_prompts([cuts[i]]) == [None]
        assert torch.equal(encoder.encode([cuts[i]])[0][0], tokens[i])
    assert CachedTextEncoder(encoder).cut_prompts(prompts) == cuts


def test_minilm_bad_max_length() -> None:
    with pytest.raises(ValueError, match="max_length 513 exceeds .* 512"):
        MiniLMTextEncoder(max_length=513)


# ---------------------------------------------------------------------------------------------
# Cache and factory
# ---------------------------------------------------------------------------------------------


def test_cache_encodes_each_prompt_once(wan_folder: Path) -> None:
    encoder = UMT5TextEncoder.from_pretrained(wan_folder, max_length=16)
    cached = CachedTextEncoder(encoder, maxsize=3)
    batch = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    tokens, mask = cached.encode(batch)
    assert (cached.calls, cached.encoded) == (1, 2)
    want_tokens, want_mask = encoder.encode(batch)
    assert torch.equal(tokens, want_tokens) and torch.equal(mask, want_mask)
    again, _ = cached.encode([PROMPTS[1], PROMPTS[0]])
    assert (cached.calls, cached.encoded) == (1, 2)
    assert torch.equal(again, want_tokens[[1, 0]])
    cached.encode([PROMPTS[2], PROMPTS[3], PROMPTS[1]])  # evicts the least recent: PROMPTS[0]
    assert (cached.calls, cached.encoded) == (2, 4)
    assert list(cached.entries) == [PROMPTS[2], PROMPTS[3], PROMPTS[1]]
    cached.encode([PROMPTS[0]])
    assert (cached.calls, cached.encoded) == (3, 5)
    assert isinstance(cached, TextEncoder) and cached.max_length == 16


def test_bad_inputs_raise_value_error(wan_folder: Path) -> None:
    encoder = UMT5TextEncoder.from_pretrained(wan_folder, max_length=8)
    for bad in ([], "a prompt", [1]):
        with pytest.raises(ValueError, match="prompts"):
            encoder.encode(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxsize"):
        CachedTextEncoder(encoder, maxsize=0)


def test_load_text_encoder(wan_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"'bert'.*\('umt5', 'minilm'\)"):
        load_text_encoder("bert")
    with pytest.raises(ValueError, match="umt5"):
        load_text_encoder("umt5", None)
    umt5 = load_text_encoder("umt5", str(wan_folder), "cpu", torch.float32, max_length=8)
    assert isinstance(umt5, UMT5TextEncoder) and umt5.max_length == 8
    mini = load_text_encoder("minilm", None, "cpu", torch.bfloat16, max_length=12)
    assert isinstance(mini, MiniLMTextEncoder) and mini.max_length == 12
    assert mini.encode(["a"])[0].dtype == torch.float32


def test_native_minilm_equals_transformers_bert():
    """kinema's own BERT (no transformers import at run time) equals transformers.BertModel."""
    from transformers import AutoModel, AutoTokenizer

    from kinema.models.text import MiniLMTextEncoder, minilm_path

    prompts = ["a red circle moving right", "A Crimson DISC drifts left, then up!", ""]
    ours, mask = MiniLMTextEncoder(max_length=16).encode(prompts)
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    batch = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    with torch.no_grad():
        want = ref(**batch).last_hidden_state * batch.attention_mask[..., None]
    assert torch.equal(mask, batch.attention_mask.bool())
    assert (ours - want).abs().max() <= 1e-5
