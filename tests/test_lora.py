"""LoRA: merged into kinema's DiT it gives diffusers' (PEFT) output; the original Wan key
layout reads the same; bad files are refused with the reason; ``load(lora=...)`` merges."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from kinema.io.wan_keys import kinema_to_original
from kinema.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    lora_targets,
    merge_lora,
    parse_lora_arg,
    read_lora,
)
from tests.test_dit import kinema_twin, tiny_reference

RANK = 4


def random_lora(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA over every default target, in the PEFT / diffusers layout."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in lora_targets(model, DEFAULT_TARGETS):
        out, inp = model.get_submodule(name).weight.shape
        state[f"transformer.{name}.lora_A.weight"] = 0.2 * torch.randn(RANK, inp, generator=g)
        state[f"transformer.{name}.lora_B.weight"] = 0.2 * torch.randn(out, RANK, generator=g)
    return state


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 16, 3, 4, 4, generator=g),
        torch.tensor([999.0, 400.0]),
        torch.randn(2, 7, 32, generator=g),
    )


def test_merged_lora_matches_diffusers_peft_adapter(tmp_path) -> None:
    ref = tiny_reference(tmp_path)
    ours = kinema_twin(tmp_path, ref)
    state = random_lora(ours)
    assert len(state) == 2 * 2 * len(DEFAULT_TARGETS)  # two blocks, every target
    save_file(state, str(tmp_path / "lora.safetensors"))
    x, t, ctx = inputs()
    with torch.no_grad():
        before = ours(x, t, ctx)
        ref.load_lora_adapter(dict(state), prefix="transformer", adapter_name="test")
        want = ref(x, t, ctx, return_dict=False)[0]
        assert merge_lora(ours, read_lora(tmp_path)) == 2 * len(DEFAULT_TARGETS)
        got = ours(x, t, ctx)
    assert (want - before).abs().max() > 1e-2  # the LoRA changes the output: the test bites
    assert (got - want).abs().max() <= 1e-4


def test_a_trained_lora_export_loads_in_diffusers_as_it_runs_in_kinema(tmp_path) -> None:
    """save_lora folds alpha / r into B: diffusers reads the file (no alpha) and gets the
    output of kinema's unmerged LoRA layers, and of the merged weights."""
    from kinema.lora import add_lora, save_lora

    ref = tiny_reference(tmp_path)
    fused = kinema_twin(tmp_path, ref).fuse_projections()  # add_lora drops the fused copies
    adapted = add_lora(fused, LoRAConfig(rank=RANK, alpha=3.0 * RANK))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:  # the factors: as if trained
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    file = save_lora(adapted, tmp_path / "out" / "lora.safetensors", base="tiny")
    merged = kinema_twin(tmp_path, ref)
    x, t, ctx = inputs()
    with torch.no_grad():
        before = merged(x, t, ctx)
        running = adapted(x, t, ctx)
        merge_lora(merged, read_lora(file))
        ref.load_lora_adapter(str(file), prefix="transformer", adapter_name="kinema")
        want = ref(x, t, ctx, return_dict=False)[0]
        got = merged(x, t, ctx)
    assert (running - want).abs().max() <= 1e-4 and (got - want).abs().max() <= 1e-4
    assert (want - before).abs().max() > 1e-2  # the LoRA matters: the test bites


def test_original_wan_and_kohya_names_with_alpha_read_the_same(tmp_path) -> None:
    ref = tiny_reference(tmp_path)
    peft = kinema_twin(tmp_path, ref)
    state = random_lora(peft)
    doubled = {k: v * (2 if "lora_B" in k else 1) for k, v in state.items()}
    original = {}
    for key, value in state.items():  # alpha 8 at rank 4: scale 2
        layer = key.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        name = next(iter(kinema_to_original({layer + ".weight": 0}))).removesuffix(".weight")
        part = "lora_down" if ".lora_A." in key else "lora_up"
        original[f"diffusion_model.{name}.{part}.weight"] = value
        original[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0 * RANK)
    assert any(".self_attn.q." in k for k in original) and any(".ffn.0." in k for k in original)
    kohya = {
        k.replace("diffusion_model.", "lora_unet_")
        .replace(".", "_", 4)
        .replace("_lora_", ".lora_")
        .replace("_alpha", ".alpha"): v
        for k, v in original.items()
    }
    assert "lora_unet_blocks_1_cross_attn_o.lora_up.weight" in kohya
    save_file(doubled, str(tmp_path / "peft.safetensors"))
    save_file(original, str(tmp_path / "wan.safetensors"))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    merge_lora(peft, read_lora(tmp_path / "peft.safetensors"))
    for file in ("wan", "kohya"):
        wan = kinema_twin(tmp_path, ref)
        merge_lora(wan, read_lora(tmp_path / f"{file}.safetensors"))
        for (name, a), b in zip(peft.state_dict().items(), wan.state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=1e-6), (file, name)


def test_bad_lora_files_are_refused_with_the_reason(tmp_path) -> None:
    ref = tiny_reference(tmp_path)
    ours = kinema_twin(tmp_path, ref)
    state = random_lora(ours)
    with pytest.raises(ValueError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a safetensors LoRA file"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({**state, "transformer.blocks.0.attn1.to_q.diff_b": torch.zeros(24)},
              str(tmp_path / "extra.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="unrecognised LoRA key.*diff_b"):
        read_lora(tmp_path / "extra.safetensors")
    save_file(
        {k: v for k, v in state.items() if "lora_B" not in k}, str(tmp_path / "half.safetensors")
    )
    with pytest.raises(ValueError, match="has no matching .*lora_B"):
        read_lora(tmp_path / "half.safetensors")
    other = {k.replace("blocks.1.", "blocks.7."): v for k, v in state.items()}
    save_file(other, str(tmp_path / "deep.safetensors"))
    with pytest.raises(ValueError, match="blocks.7.* does not have"):
        merge_lora(ours, read_lora(tmp_path / "deep.safetensors"))
    wide = {k: torch.cat([v, v], 1) if "lora_A" in k else v for k, v in state.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="this model's weight there is"):
        merge_lora(ours, read_lora(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)
    a_key = next(k for k in state if "lora_A" in k)
    for name, change, message in (
        ("nan", lambda v: v.fill_(math.nan), "holds nan or inf values"),  # a black video
        ("cube", lambda v: v[..., None], r"are \(4, \d+, 1\) and .* LoRA factors are matrices"),
    ):  # fmt: skip
        save_file({**state, a_key: change(state[a_key].clone())}, str(tmp_path / f"{name}.st"))
        with pytest.raises(ValueError, match=message):
            read_lora(tmp_path / f"{name}.st")
    for text in ("x.safetensors:nan", "x.safetensors:inf"):
        with pytest.raises(ValueError, match="the strength must be a finite number"):
            parse_lora_arg(text)


def test_a_lora_that_does_not_fit_is_named_among_several(tmp_path) -> None:
    from kinema.loading import load
    from tests.serve_helpers import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny")
    pipe = load(str(folder), device="cpu")
    state = random_lora(pipe.dit)
    save_file(state, str(tmp_path / "fits.safetensors"))
    wide = {k: torch.cat([v, v], 1) if "lora_A" in k else v for k, v in state.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    loras = [str(tmp_path / "fits.safetensors"), str(tmp_path / "wide.safetensors")]
    with pytest.raises(ValueError, match=r"wide.safetensors: the LoRA's .* weight there is"):
        load(str(folder), device="cpu", lora=loras)


def test_train_config_reads_a_lora_block() -> None:
    from kinema.train.config import TrainConfig, parse_config

    data = {"init_from": "models/base", "lora": {"rank": 8, "targets": ["attn1.to_q"]}}
    config = parse_config(TrainConfig, data)
    assert config.lora == LoRAConfig(rank=8, targets=("attn1.to_q",)) and config.lora.scale == 1
    with pytest.raises(
        ValueError, match=r"TrainConfig.lora: LoRAConfig: unknown key\(s\) \['rnk'\]"
    ):
        parse_config(TrainConfig, {**data, "lora": {"rnk": 8}})


def test_load_merges_loras_with_their_strengths(tmp_path) -> None:
    from kinema.loading import load

    base = load(None, device="cpu", dtype="fp32").dit
    state = random_lora(base, seed=3)
    save_file(state, str(tmp_path / "lora.safetensors"))
    pipe = load(None, device="cpu", dtype="fp32", lora=[(tmp_path / "lora.safetensors", 0.5)])
    name = "blocks.3.attn2.to_v"
    a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
    want = base.get_submodule(name).weight + 0.5 * b @ a
    assert torch.allclose(pipe.dit.get_submodule(name).weight, want, atol=1e-6)
    assert pipe.loras == [(str(tmp_path / "lora.safetensors"), 0.5)]
    untouched = "blocks.3.norm2.weight"
    assert torch.equal(pipe.dit.state_dict()[untouched], base.state_dict()[untouched])
