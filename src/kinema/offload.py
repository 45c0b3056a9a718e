"""Offload policies for GPUs too small to hold every weight: explicit objects, no global state.

* :class:`ModelOffload` -- whole-model: a module lives on its ``home`` device (the CPU) and
  visits the compute device only inside ``with policy.use(module):`` (text encoder for the
  prompt, DiT for the sampling loop, VAE for the decode). Peak weight memory is the largest
  single component instead of their sum.
* :class:`BlockOffload` -- block-level: the model's small parts (embeddings, head) move to the
  compute device for good, while its transformer blocks stay in (pinned) CPU memory and are
  streamed in one at a time by forward hooks. On CUDA the copy of block ``i + 1`` runs on a
  side stream while block ``i`` computes (overlapping transfer with compute), so at most two
  blocks are resident. Detaching restores the model exactly as it was.

Neither changes what the model computes: outputs equal the plain model's.

:class:`Placement` is how a :class:`~kinema.pipeline.Pipeline` uses them: one policy for all of
its parts (``kinema.load(..., offload="model")``, ``kinema generate --offload model``). Under
every policy a GPU run keeps the text and image encoders in host memory and lets them
:func:`visit` the GPU only while they encode, so umT5-XXL's 11 GB are not beside the DiT while
it samples and the VAE decodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N") from err


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ModelOffload:
    """Whole-model offload between ``home`` (default CPU) and ``device``."""

    def __init__(self, device: str | torch.device, home: str | torch.device = "cpu") -> None:
        self.device, self.home = _device(device), _device(home)

    @contextlib.contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        """Move ``module`` to the compute device for the enclosed code, then back home."""
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(self.home)
            _empty_cache(self.device)


def encoders_visit(device: str | torch.device) -> bool:
    """Whether encoders computing on ``device`` live in host memory between encodes: on a GPU
    (its memory is separate), not on a CPU or Apple's MPS (one memory)."""
    return torch.device(device).type not in ("cpu", "mps")


def pin(module: nn.Module) -> nn.Module:
    """Page-lock a module's host-memory weights in place, tensor by tensor, so copies to a CUDA
    device run at the bus's full speed; where that fails (no CUDA, a limit on locked memory)
    they stay as they were. Returns the module."""
    if not torch.cuda.is_available():
        return module
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu" and not t.is_pinned():
            try:
                t.data = t.data.pin_memory()
            except RuntimeError:
                return module
    return module


@contextlib.contextmanager
def visit(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` on ``device`` for the enclosed inference, its weights kept where they are:
    each tensor elsewhere is copied in on entry, and on exit the module points at the very
    tensors it had and the copies are dropped. Nothing is copied back (inference leaves weights
    unchanged); the tensors' values and identities are as before. Tensors already on
    ``device`` are used as they are."""
    tensors = [*module.parameters(), *module.buffers()]
    homes = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(device, non_blocking=True)
        yield module
    finally:
        for t, home in zip(tensors, homes, strict=True):
            t.data = home
        _empty_cache(device)


def text_model(encoder: Any) -> tuple[Any, nn.Module | None]:
    """A kinema text encoder behind caches and wrappers (each holding the next as ``.encoder``:
    :class:`~kinema.models.text.CachedTextEncoder`, a distributed run's broadcasting one) ->
    (the innermost encoder, its ``.model``; None where it has none)."""
    while not isinstance(getattr(encoder, "model", None), nn.Module):
        if getattr(encoder, "encoder", None) is None:
            return encoder, None
        encoder = encoder.encoder
    return encoder, encoder.model


class _Resident:
    """One block's weights: CPU originals (pinned on CUDA) and, while loaded, device copies."""

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        self.tensors = [*block.parameters(), *block.buffers()]
        pin = device.type == "cuda"
        self.home = [t.data.pin_memory() if pin else t.data for t in self.tensors]
        self.originals = [t.data for t in self.tensors]
        self.ready: torch.cuda.Event | None = None

    def load(self, device: torch.device, stream: Any) -> None:
        """Start copying to ``device`` (on ``stream`` when given) and point the block at it.

        Copies made on the side stream are marked as used by the compute stream, so the
        allocator does not hand their memory to the next prefetch while compute still reads it.
        """
        if stream is None:
            copies = [h.to(device, non_blocking=True, copy=True) for h in self.home]
        else:
            compute = torch.cuda.current_stream(device)
            with torch.cuda.stream(stream):
                copies = [h.to(device, non_blocking=True, copy=True) for h in self.home]
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
            for c in copies:
                c.record_stream(compute)
        for t, c in zip(self.tensors, copies, strict=True):
            t.data = c

    def wait(self) -> None:
        """Make the compute stream wait for this block's copy."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            self.ready = None

    def unload(self) -> None:
        """Point the block back at its CPU weights (the device copies are freed)."""
        for t, h in zip(self.tensors, self.home, strict=True):
            t.data = h

    def restore(self) -> None:
        for t, o in zip(self.tensors, self.originals, strict=True):
            t.data = o


class BlockOffload:
    """Block-level offload with prefetch; use as ``with BlockOffload(dit, "cuda"): ...``.

    ``blocks`` defaults to ``model.blocks``; every other parameter moves to ``device`` while
    attached. ``prefetch``: copy the next block during the current one (CUDA side stream).
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device,
        blocks: Sequence[nn.Module] | None = None,
        prefetch: bool = True,
    ) -> None:
        self.model, self.device, self.prefetch = model, _device(device), prefetch
        self.blocks = list(model.blocks if blocks is None else blocks)
        if not self.blocks:
            raise ValueError("BlockOffload needs at least one block to stream")
        self.residents: list[_Resident] = []
        self.hooks: list[Any] = []
        self.others: list[tuple[Tensor, Tensor]] = []
        cuda = self.device.type == "cuda" and prefetch
        self.stream = torch.cuda.Stream(self.device) if cuda else None

    def attach(self) -> BlockOffload:
        """Move the non-block weights to the device and hook the blocks; returns self."""
        in_blocks = {id(t) for b in self.blocks for t in (*b.parameters(), *b.buffers())}
        for t in (*self.model.parameters(), *self.model.buffers()):
            if id(t) not in in_blocks:
                self.others.append((t, t.data))
                t.data = t.data.to(self.device)
        self.residents = [_Resident(b, self.device) for b in self.blocks]
        for i, block in enumerate(self.blocks):
            self.hooks.append(block.register_forward_pre_hook(self._before(i)))
            self.hooks.append(block.register_forward_hook(self._after(i)))
        return self

    def _before(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            resident = self.residents[i]
            if resident.ready is None and not self._loaded(i):
                resident.load(self.device, None)
            resident.wait()
            nxt = i + 1
            if self.stream is not None and nxt < len(self.residents):
                self.residents[nxt].load(self.device, self.stream)

        return hook

    def _after(self, i: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.residents[i].unload()

        return hook

    def _loaded(self, i: int) -> bool:
        tensors = self.residents[i].tensors
        return bool(tensors) and tensors[0].device == self.device and self.device.type != "cpu"

    def detach(self) -> None:
        """Remove the hooks and put every weight back where it was before :meth:`attach`."""
        for h in self.hooks:
            h.remove()
        for r in self.residents:
            r.restore()
        for t, original in self.others:
            t.data = original
        self.hooks, self.residents, self.others = [], [], []
        _empty_cache(self.device)

    def __enter__(self) -> BlockOffload:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


OFFLOAD_POLICIES = ("none", "model", "block")


def check_policy(policy: str, name: str = "offload") -> None:
    """Raise ValueError naming ``policy`` and the valid ones unless it is one of them."""
    if policy not in OFFLOAD_POLICIES:
        raise ValueError(f"{name} {policy!r}; valid: {', '.join(OFFLOAD_POLICIES)}")


class Placement:
    """Where a pipeline's parts compute, under one offload policy.

    ``none``: every part lives on ``device``. ``model``: the parts live on the CPU and each
    visits ``device`` while it works (text encoder, then DiT, then VAE; :class:`ModelOffload`).
    ``block``: as ``model``, but the DiT's blocks are streamed one at a time with prefetch
    (:class:`BlockOffload`), so the GPU holds the largest block instead of the whole DiT.
    """

    def __init__(self, policy: str, device: str | torch.device) -> None:
        check_policy(policy)
        self.policy, self.device = policy, _device(device)
        self.models = ModelOffload(self.device)
        # Where the text and image encoders are loaded: the CPU when offloading or computing
        # on a GPU (:func:`encoders_visit`), else ``device``. Elsewhere, they visit ``device``.
        self.encoder_home = self.device
        if policy != "none" or encoders_visit(self.device):
            self.encoder_home = torch.device("cpu")

    @property
    def home(self) -> torch.device:
        """Where the weights are loaded: the CPU when offloading, else ``device``."""
        return self.device if self.policy == "none" else torch.device("cpu")

    def settle(self, module: nn.Module) -> nn.Module:
        """An encoder loaded at :attr:`encoder_home`, made ready to visit a CUDA device
        (:func:`pin`). Returns it."""
        return pin(module) if self.device.type == "cuda" else module

    @contextlib.contextmanager
    def encoder(self, module: nn.Module) -> Iterator[nn.Module]:
        """A text or image encoder's module on ``device`` for the block, where it lives
        elsewhere (:func:`visit`)."""
        if self.encoder_home == self.device:
            yield module
            return
        with visit(module, self.device):
            yield module

    @contextlib.contextmanager
    def part(self, module: nn.Module) -> Iterator[nn.Module]:
        """A text encoder's, image encoder's or VAE's module on ``device`` for the block."""
        if self.policy == "none":
            yield module
            return
        with self.models.use(module):
            yield module

    @contextlib.contextmanager
    def dit(self, dit: nn.Module) -> Iterator[nn.Module]:
        """The DiT on ``device`` (whole, or block by block) for the enclosed sampling loop."""
        if self.policy != "block":
            with self.part(dit):
                yield dit
            return
        with BlockOffload(dit, self.device):
            yield dit

    @contextlib.contextmanager
    def text(self, encoder: Any, prompts: Sequence[str] = ()) -> Iterator[Any]:
        """A kinema text encoder (``.model`` and ``.device``; maybe behind a cache) on
        ``device`` for the block, to encode ``prompts``; it stays where it is when its cache
        holds them all (:meth:`~kinema.models.text.CachedTextEncoder.missing`)."""
        inner, model = text_model(encoder)
        missing = getattr(encoder, "missing", None)
        cached = missing is not None and bool(prompts) and not missing(prompts)
        if cached or model is None:
            yield encoder
            return
        home, inner.device = inner.device, self.device
        try:
            with self.encoder(model):  # a visit where it lives elsewhere
                yield encoder
        finally:
            inner.device = home


__all__ = [
    "OFFLOAD_POLICIES",
    "BlockOffload",
    "ModelOffload",
    "Placement",
    "pin",
    "text_model",
    "visit",
]
