"""Loading DiT components from diffusers, kinema and original-Wan folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kinema.io.checkpoint import CheckpointError, load_dit
from kinema.io.wan_keys import kinema_to_original
from kinema.models.dit import VideoDiT
from tests.test_dit import tiny_reference


def forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([400.0]), ctx)


def test_sharded_diffusers_folder_loads_and_matches(tmp_path):
    ref = tiny_reference(tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = VideoDiT.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
        want = ref(x, torch.tensor([400.0]), ctx, return_dict=False)[0]
    assert (forward(ours) - want).abs().max() <= 1e-4


def test_kinema_folder_round_trip_and_bf16(tmp_path):
    tiny_reference(tmp_path)
    ours = VideoDiT.from_pretrained(tmp_path / "transformer")
    ours.save_pretrained(tmp_path / "kinema")
    config = json.loads((tmp_path / "kinema" / "config.json").read_text())
    assert config["_class"] == "VideoDiT" and config["num_heads"] == 2
    again = VideoDiT.from_pretrained(tmp_path / "kinema")
    assert torch.equal(forward(ours), forward(again))
    half = VideoDiT.from_pretrained(tmp_path / "kinema", dtype=torch.bfloat16)
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert half.blocks[0].scale_shift_table.dtype == torch.float32


def test_original_wan_folder_loads(tmp_path):
    ref = tiny_reference(tmp_path)
    folder = tmp_path / "original"
    folder.mkdir()
    weights = str(folder / "diffusion_pytorch_model.safetensors")
    save_file(kinema_to_original(ref.state_dict()), weights)
    cfg = ref.config
    (folder / "config.json").write_text(
        json.dumps(
            {"_class_name": "WanModel", "model_type": "t2v", "dim": 24, "num_heads": 2,
             "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers, "text_dim": 32,
             "freq_dim": 32, "in_dim": 16, "out_dim": 16, "eps": 1e-6}
        )
    )  # fmt: skip
    ours = load_dit(folder)
    twin = VideoDiT.from_pretrained(tmp_path / "transformer")
    assert (forward(ours) - forward(twin)).abs().max() <= 1e-5  # same weights, other layout


def test_truncated_and_mismatched_files_name_the_problem(tmp_path):
    tiny_reference(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_dit(tmp_path / "transformer")
    weights.write_bytes(data)
    from safetensors.torch import load_file

    sd = load_file(str(weights))
    sd.pop("proj_out.weight")
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError, match="missing keys \\['proj_out.weight'\\]"):
        load_dit(tmp_path / "transformer")
    with pytest.raises(CheckpointError, match="config.json"):
        load_dit(tmp_path / "nowhere")


def test_wan_vae_preset_statistics_equal_diffusers_defaults():
    import inspect

    from diffusers import AutoencoderKLWan

    from kinema.configs import WAN21_VAE

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert list(WAN21_VAE.latents_mean) == params["latents_mean"].default
    assert list(WAN21_VAE.latents_std) == params["latents_std"].default


def test_original_wan_release_folder_loads_and_matches_diffusers(tmp_path):
    """kinema.load on the original release layout (DiT safetensors with original names,
    Wan2.1_VAE.pth, the umT5 .pth and its tokenizer) gives the diffusers folder's video."""
    import kinema
    from kinema.io.umt5_keys import transformers_to_original
    from kinema.io.wan_vae_keys import diffusers_to_original
    from tests.wan_tiny import build_wan_folder

    wan = build_wan_folder(tmp_path / "diffusers", wan_stats=True)
    orig = tmp_path / "original"
    (orig / "google").mkdir(parents=True)
    dit = VideoDiT.from_pretrained(wan / "transformer")
    save_file(
        kinema_to_original(dit.state_dict()), str(orig / "diffusion_pytorch_model.safetensors")
    )
    c = dit.config
    (orig / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "num_heads": c.num_heads,
        "ffn_dim": c.ffn_dim, "num_layers": c.num_layers, "text_dim": c.text_dim,
        "freq_dim": c.freq_dim, "in_dim": 16, "out_dim": 16}))  # fmt: skip
    from safetensors.torch import load_file

    vae = load_file(str(wan / "vae" / "diffusion_pytorch_model.safetensors"))
    torch.save(diffusers_to_original(vae), orig / "Wan2.1_VAE.pth")
    t5 = load_file(str(wan / "text_encoder" / "model.safetensors"))
    layers = json.loads((wan / "text_encoder" / "config.json").read_text())["num_layers"]
    torch.save(transformers_to_original(t5, layers), orig / "models_t5_umt5-xxl-enc-bf16.pth")
    import shutil

    shutil.copytree(wan / "tokenizer", orig / "google" / "umt5-xxl")
    settings = dict(width=32, height=32, frames=5, steps=2, guidance=3.0, seed=4)
    want = kinema.load(wan, device="cpu").generate("a red circle", **settings).frames
    got = kinema.load(orig, device="cpu").generate("a red circle", **settings).frames
    assert abs(got.astype(int) - want.astype(int)).max() <= 1


def test_loading_a_model_builds_it_without_init_or_compiler_imports(tmp_path):
    """Weights about to be assigned are not initialised: a meta ``normal_`` (an embedding's
    init) or an out-of-place op on meta tensors would import torch's compiler stack, seconds of
    every ``kinema generate``, and a meta ``randn`` (a modulation table's init) imports
    torch's symbolic shapes and sympy, half a second. Checked in a fresh process on the
    shipped model."""
    import subprocess
    import sys

    code = ("import sys, kinema; kinema.load(); "
            "print(*(m in sys.modules for m in ('torch._dynamo', 'sympy')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def _edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


@pytest.mark.parametrize(
    "model, edit, message",
    [
        (
            "tiny",
            ("transformer/config.json", lambda d: {**d, "num_heads": "two"}),
            "transformer/config.json: DiTConfig.num_heads: expected int, got str 'two'",
        ),
        (
            "tiny",
            ("kinema.json", lambda d: {**d, "sampling": {**d["sampling"], "width": "big"}}),
            "kinema.json: SamplingDefaults.width: expected int, got str 'big'",
        ),
        ("tiny", ("kinema.json", lambda d: [1, 2]), "kinema.json holds a JSON list, not an object"),
        ("tiny", ("kinema.json", "{bad"), "kinema.json is not valid JSON: Expecting property"),
        ("tiny", ("step_cache.json", "[]"), "step_cache.json holds a JSON list, not an object"),
        (
            "tiny",
            ("step_cache.json", '{"coefficients": "abc"}'),
            "step_cache.json is not a step-cache calibration: could not convert",
        ),
        ("wan", ("scheduler/scheduler_config.json", "{x"), "scheduler_config.json is not valid"),
        ("wan", ("text_encoder/config.json", "{"), "text_encoder/config.json is not valid JSON"),
    ],
)
def test_a_broken_file_in_a_model_folder_is_named(tmp_path, capsys, model, edit, message):
    """Each was a traceback, or a JSON error naming no file."""
    from kinema.cli import main
    from tests.serve_helpers import build_tiny_model
    from tests.wan_tiny import build_wan_folder

    build = build_tiny_model if model == "tiny" else build_wan_folder
    folder = build(tmp_path / "m")
    name, change = edit
    if name == "step_cache.json":
        (folder / name).write_text("{}")
    if callable(change):
        _edit_json(folder / name, change)
    else:
        (folder / name).write_text(change)
    capsys.readouterr()  # building the folder's own output
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(folder)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


def test_broken_checkpoint_folders_are_one_line_naming_the_file(tmp_path):
    """Each was a traceback (KeyError, AttributeError, TypeError, RuntimeError) or a silent
    load before a QA pass over users' Wan folders."""
    import shutil

    from kinema.io.checkpoint import read_torch_file, weight_files
    from kinema.loading import check_pipeline
    from tests.wan_tiny import build_wan_folder

    weights = {"w": torch.ones(2)}
    torch.save({"model": weights, "epoch": 3}, tmp_path / "wrapped.pth")  # a training save
    assert read_torch_file(tmp_path / "wrapped.pth").keys() == {"w"}
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth holds a list, not a state dict"):
        read_torch_file(tmp_path / "list.pth")
    (tmp_path / "sharded").mkdir()
    (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="index.json has no weight_map"):
        weight_files(tmp_path / "sharded")
    with pytest.raises(CheckpointError, match="'CogVideoXPipeline' folder; kinema reads Wan"):
        check_pipeline({"_class_name": "CogVideoXPipeline"}, tmp_path / "model_index.json")
    with pytest.raises(CheckpointError, match="Wan 2.2 two-expert model"):  # loaded one of two
        check_pipeline({"_class_name": "WanPipeline", "transformer_2": ["diffusers", "X"]},
                       tmp_path / "model_index.json")  # fmt: skip
    check_pipeline({"_class_name": "WanPipeline", "transformer_2": [None, None]}, tmp_path)

    wan = build_wan_folder(tmp_path / "wan")
    config = wan / "transformer" / "config.json"
    good = config.read_text()
    config.write_text(good.replace('"num_layers": 2', '"num_layers": "two"'))
    with pytest.raises(CheckpointError, match="num_layers: expected int, got str 'two'"):
        load_dit(wan / "transformer")
    config.write_text(good)
    dit = wan / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(dit))
    key = next(k for k in state if k.endswith("to_q.weight"))
    save_file({**state, key: state[key].to(torch.int8)}, str(dit))
    with pytest.raises(CheckpointError, match=f"{key} is int8; kinema reads float weights"):
        load_dit(wan / "transformer")
    tokenizer = shutil.copytree(wan / "tokenizer", tmp_path / "tokenizer")
    (tokenizer / "tokenizer_config.json").write_text("{broken")
    from kinema.models.text import _tokenizer

    with pytest.raises(CheckpointError, match="tokenizer_config.json is not valid JSON"):
        _tokenizer(tokenizer)
