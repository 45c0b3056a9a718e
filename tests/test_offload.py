"""Offload policies keep outputs equal and put every weight back where it was."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from kinema.configs import DiTConfig
from kinema.models.dit import VideoDiT
from kinema.offload import BlockOffload, ModelOffload

CONFIG = DiTConfig(num_heads=2, head_dim=8, text_dim=12, freq_dim=16, ffn_dim=24, num_layers=3)


def tiny():
    torch.manual_seed(0)
    dit = VideoDiT(CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    args = torch.randn(2, 16, 2, 4, 4, generator=g), torch.tensor([10.0, 900.0])
    return dit, (*args, torch.randn(2, 5, 12, generator=g))


def test_block_offload_streams_each_block_and_matches():
    dit, args = tiny()
    with torch.no_grad():
        want = dit(*args)
    homes = [b.attn1.to_q.weight.data_ptr() for b in dit.blocks]
    seen = []
    probe = lambda i: lambda m, a: seen.append(m.attn1.to_q.weight.data_ptr() != homes[i])
    with BlockOffload(dit, "cpu") as policy:
        handles = [b.register_forward_pre_hook(probe(i)) for i, b in enumerate(dit.blocks)]
        with torch.no_grad():
            got = dit(*args)
        for h in handles:
            h.remove()
        # between forwards every block points at its home (CPU) weights again
        assert [b.attn1.to_q.weight.data_ptr() for b in dit.blocks] == homes
        assert len(policy.hooks) == 2 * CONFIG.num_layers
    assert seen == [True] * CONFIG.num_layers  # each block ran on a streamed-in copy
    assert torch.equal(got, want)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in dit.blocks)
    assert [b.attn1.to_q.weight.data_ptr() for b in dit.blocks] == homes


def test_block_offload_with_fused_projections_matches():
    dit, args = tiny()
    with torch.no_grad():
        want = dit(*args)
    dit.fuse_projections()
    with BlockOffload(dit, "cpu"), torch.no_grad():
        got = dit(*args)
    assert (got - want).abs().max().item() <= 1e-5


def test_model_offload_moves_for_the_block_only():
    dit, args = tiny()
    policy = ModelOffload("cpu", home="cpu")
    with torch.no_grad(), policy.use(dit) as on_device:
        out = on_device(*args)
    assert out.shape == args[0].shape
    assert next(dit.parameters()).device.type == "cpu"


def test_bad_device_and_empty_blocks_are_refused():
    dit, _ = tiny()
    with pytest.raises(ValueError, match="unknown device"):
        ModelOffload("gpu0")
    with pytest.raises(ValueError, match="at least one block"):
        BlockOffload(dit, "cpu", blocks=[])


@pytest.mark.parametrize("policy", ["model", "block"])
def test_pipeline_offload_gives_the_same_video(tmp_path, policy):
    """load(..., offload=...) runs text encoder, DiT (whole or block by block) and VAE under
    the policy -- with the step cache's probe too -- and makes the same video as no offload."""
    from kinema.loading import load
    from tests.serve_helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    plain = load(model, device="cpu").generate("a red circle", seed=3, steps=4, cache=0.1)
    with pytest.warns(UserWarning, match="on a CPU they are in host memory already, so it"):
        pipe = load(model, device="cpu", offload=policy)  # said: it was silent, exit 0
    assert pipe.placement.policy == policy and pipe.device == torch.device("cpu")
    streamed = []  # block offload hooks every block while the sampler runs, and only then
    tick = lambda i, n: streamed.append(bool(pipe.dit.blocks[0]._forward_pre_hooks))
    video = pipe.generate("a red circle", seed=3, steps=4, cache=0.1, progress=tick)
    assert streamed and all(s == (policy == "block") for s in streamed)
    assert not pipe.dit.blocks[0]._forward_pre_hooks
    assert np.array_equal(video.frames, plain.frames)
    assert (video.info["offload"], plain.info["offload"]) == (policy, "none")  # the sidecar's
    said = [w for w in video.info["warnings"] if "changes nothing" in w]  # load's, kept too
    assert len(said) == 1 and not any("changes nothing" in w for w in plain.info["warnings"])


class FakeEncoder:
    """The shape of kinema's text encoders: ``.model``, ``.device``, ``encode``."""

    dim, max_length = 2, 4

    def __init__(self) -> None:
        self.model, self.device = torch.nn.Linear(2, 2), torch.device("cpu")
        self.seen: list[torch.device] = []  # the device it was told to use at each encode

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(self.device)
        tokens = torch.zeros(len(prompts), self.max_length, self.dim)
        return tokens, torch.ones(len(prompts), self.max_length, dtype=torch.bool)


def test_encoders_live_in_host_memory_beside_a_gpu():
    """A GPU run loads the text and image encoders into host memory under every policy (they
    visit the GPU to encode); a CPU or MPS run keeps them where it computes."""
    from kinema.offload import Placement

    cases = [("none", "cuda", "cpu"), ("none", "cuda:1", "cpu"), ("none", "cpu", "cpu"),
             ("none", "mps", "mps"), ("model", "mps", "cpu"), ("block", "cuda", "cpu")]  # fmt: skip
    for policy, device, encoders in cases:
        placement = Placement(policy, device)
        assert placement.encoder_home == torch.device(encoders), (policy, device)
    assert Placement("none", "cuda").home == torch.device("cuda")  # the DiT and VAE stay


def test_visit_points_the_module_back_at_its_own_tensors():
    from kinema.offload import visit

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    moved = {"0.weight": torch.randn(3, 3)}  # as if copied to the device during the visit
    with visit(model, torch.device("cpu")) as inside:
        assert inside is model  # already on the device: used as it is, no copy
        assert all(v.data_ptr() == before[k][0] for k, v in model.state_dict().items())
        model[0].weight.data = moved["0.weight"]
    after = model.state_dict()
    for key, (ptr, value) in before.items():  # the very tensors, not copies brought back
        assert after[key].data_ptr() == ptr and torch.equal(after[key], value), key


@pytest.fixture
def visits(monkeypatch):
    """The devices ``Placement`` sends encoders to (this machine has no GPU to copy them to;
    tests/test_offload.py's visit test and benchmarks/gpu_checks.py cover the copy itself)."""
    import contextlib

    from kinema import offload

    seen: list[torch.device] = []

    @contextlib.contextmanager
    def record(module: torch.nn.Module, device: torch.device):
        seen.append(device)
        yield module

    monkeypatch.setattr(offload, "visit", record)
    return seen


def test_a_text_encoder_visits_the_gpu_only_for_prompts_its_cache_lacks(visits):
    from kinema.models.text import CachedTextEncoder
    from kinema.offload import Placement

    fake = FakeEncoder()
    cached = CachedTextEncoder(fake)
    gpu = Placement("none", "cuda")
    for _ in range(2):  # the second time the prompt is cached: no visit
        with gpu.text(cached, ["a red circle"]) as inside:
            assert inside is cached
            cached.encode(["a red circle"])
        assert fake.device == torch.device("cpu")  # back home
    assert visits == [torch.device("cuda")] and fake.seen == [torch.device("cuda")]
    with gpu.text(cached, ["a red circle", "a blue square"]):
        assert fake.device == torch.device("cuda")  # one prompt to encode: it visits
    with gpu.encoder(fake.model):  # an image encoder: every time
        pass
    wrapped = types.SimpleNamespace(encoder=cached)  # as a distributed run's rank 0 holds it
    with gpu.text(wrapped, ["a green square"]):
        assert fake.device == torch.device("cuda")
    with Placement("none", "cpu").text(cached, ["a green square"]):
        pass  # on a CPU nothing moves
    assert visits == [torch.device("cuda")] * 4


def test_unknown_offload_policies_are_refused():
    from kinema.offload import Placement

    with pytest.raises(ValueError, match="offload 'disk'; valid: none, model, block"):
        Placement("disk", "cpu")


def test_cli_rejects_an_unknown_offload_policy(tmp_path, capsys):
    from kinema.cli import main
    from tests.serve_helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "x.mp4"
    with pytest.raises(SystemExit) as exit_:
        main(
            ["generate", "a red circle", "--model", str(model), "--offload", "gpu", "-o", str(out)]
        )
    assert exit_.value.code == 2 and not out.exists()
    assert "offload 'gpu'; valid: none, model, block" in capsys.readouterr().err
