"""One ``generate`` for every task.

A :class:`Request` says what to make (prompt, size, frames, sampler settings, seed; later the
image, video or context frames it is conditioned on). :meth:`Pipeline.run` turns it into a
:class:`Video`:

    text encoder -> context (1, L, D)      seed -> noise (1, C, F, H/8, W/8) on a CPU generator
    schedule(steps, shift) -> sigmas  ->  sampler(cfg(DiT), noise, sigmas)  ->  VAE.decode

``run`` writes no files and moves no weights: saving is :meth:`Video.save`, device placement
happens once in :func:`kinema.loading.load`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

import kinema
from kinema import notes, timeline
from kinema.conditioning import FrameCondition, condition_frames
from kinema.configs import SamplingDefaults
from kinema.i2v import ImageCondition, build_condition, image_conditioned
from kinema.offload import Placement
from kinema.sampling import SAMPLERS, cfg, contrast_cfg, count_calls, flow_schedule

if TYPE_CHECKING:
    from kinema.media import RestyleSource
    from kinema.models.vae import TileSpec

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Request:
    """Everything that decides the output. ``None`` fields take the model's defaults.

    Conditioning (one pipeline for every task): ``image`` starts the clip from a picture
    (``last_image`` also ends it, on first-last-frame image-to-video checkpoints);
    ``video`` + ``strength`` restyle a source clip (SDEdit); ``extend`` continues a clip (the
    output is the source followed by ``frames`` new frames); ``prompts`` change the prompt at
    given seconds, each switch as ``switch`` says (:mod:`kinema.timeline`: ``blend`` or
    ``cut``). Images and videos are paths or uint8 arrays ((H, W, 3) / (T, H, W, 3)).
    """

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: float | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    seed: int = 0
    prompts: tuple[tuple[float, str], ...] = ()
    switch: str = "blend"
    image: Any = None
    last_image: Any = None
    video: Any = None
    strength: float | None = None
    extend: Any = None
    cache: float | None = None  # step-cache threshold (kinema.sampling.cache); 0: off
    contrast: float | None = None  # blended timed prompts: guidance away from the next prompt

    def __post_init__(self) -> None:
        """Refuse a value of the wrong type by name (a float seed, a "128" width); timed
        prompts may come as JSON gives them, ``[[seconds, prompt], ...]``."""
        for name in INTEGER_FIELDS:
            if (v := getattr(self, name)) is not None and not is_integer(v):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v is None and name == "seed":  # the only one a model does not fill in
                raise ValueError("seed must be an integer (0 when not given), got None")
            if isinstance(v, np.integer):  # numpy scalars become Python's (torch's seeds)
                object.__setattr__(self, name, int(v))
        for name in NUMBER_FIELDS:
            if (v := getattr(self, name)) is not None and not is_number(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
            if isinstance(v, np.number):
                object.__setattr__(self, name, v.item())
        for name in TEXT_FIELDS:
            if (v := getattr(self, name)) is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be a string, got {type(v).__name__}")
        if self.prompts is None:  # None: the default, one prompt throughout
            object.__setattr__(self, "prompts", ())
        if isinstance(self.prompts, str | bytes | dict) or not isinstance(self.prompts, Sequence):
            raise ValueError(f"prompts must be a list of (seconds, prompt) pairs, e.g. "
                             f"[(1.0, 'a dog')]; got {type(self.prompts).__name__}")  # fmt: skip
        timed = tuple(_timed_pair(item) for item in self.prompts)
        object.__setattr__(self, "prompts", timed)
        for name in MEDIA_NAMES:  # "~/clip.mp4" is in the home folder, as an output's is
            if isinstance(v := getattr(self, name), str | Path):  # (~nosuchuser: as it is)
                object.__setattr__(self, name, type(v)(os.path.expanduser(v)))

    def resolved(self, defaults: SamplingDefaults) -> Request:
        """This request with every ``None`` replaced by the model's default."""
        fill = {
            f.name: getattr(defaults, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and hasattr(defaults, f.name)
        }
        return dataclasses.replace(self, **fill)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (media given as arrays are summarised by shape)."""
        media = lambda v: v if v is None or isinstance(v, str | int | float) else _describe(v)
        return {f.name: media(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _media() -> Any:
    """:mod:`kinema.media` (reads images and videos with PyAV), imported when a request has
    media: text-to-video runs where PyAV is missing (e.g. a GPU box that only benchmarks)."""
    from kinema import media

    return media


class UnknownWordsWarning(UserWarning):
    """A prompt uses words its model never read in training (models that record them)."""


def warn_unknown_words(prompts: list[str], vocabulary: frozenset[str] | None, name: str) -> None:
    """Warn once per request about the prompt words outside ``vocabulary`` (None: any word)."""
    from kinema.data.synthetic import words_of

    unknown = sorted({w for p in prompts for w in words_of(p)} - (vocabulary or set()))
    if vocabulary and unknown:
        notes.warn(
            f"{name} never read {', '.join(map(repr, unknown))} in training; it follows only "
            f"the words of its training captions (`kinema info` lists them)",
            UnknownWordsWarning,
            stacklevel=4,
        )


def warn_cut_prompts(encoder: Any, prompts: list[str]) -> None:
    """A warning for each prompt longer than the text encoder reads, quoting what it reads."""
    cut = getattr(encoder, "cut_prompts", None)  # optional (kinema.models.text.TextEncoder)
    for kept in cut(prompts) if cut else []:
        if kept is not None:
            notes.warn(
                f"a prompt is longer than the {encoder.max_length} tokens this model reads; "
                f"it reads only {kept!r}",
                stacklevel=4,
            )


def _describe(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [list(v) if isinstance(v, tuple) else v for v in value]
    return f"array{tuple(np.shape(value))}"


def check_shape(
    width: int, height: int, frames: int, spatial: int, temporal: int, extension: bool = False
) -> None:
    """Raise ValueError naming a size or frame count the model cannot make, and the nearest
    valid one. An extension's ``frames`` counts new frames (a multiple of ``temporal``); any
    other request's counts the whole clip (``temporal``k+1)."""
    for name, v in (("width", width), ("height", height)):
        if v < spatial or v % spatial:
            near = max(spatial, int(v / spatial + 0.5) * spatial)
            raise ValueError(f"{name} {v} is not a multiple of {spatial}; nearest valid: {near}")
    if extension and (frames < temporal or frames % temporal):
        raise ValueError(f"extension frames {frames} must be a positive multiple of {temporal}")
    if not extension and (frames < 1 or (frames - 1) % temporal):
        near = max(1, round((frames - 1) / temporal)) * temporal + 1
        raise ValueError(
            f"frames {frames} is not {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, "
            f"...); nearest valid: {near}"
        )


def validate(req: Request, spatial: int, temporal: int, extension: bool = False) -> None:
    """Raise ValueError naming the first bad value of a resolved request and its valid range
    (size and frame count as :func:`check_shape` says)."""
    if not isinstance(req.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(req.prompt).__name__}")
    if not req.prompt.strip():
        raise ValueError("prompt is empty; describe the video, e.g. 'a red circle moving right'")
    check_shape(req.width, req.height, req.frames, spatial, temporal, extension)
    if req.steps < 1:
        raise ValueError(f"steps {req.steps} must be >= 1")
    if not math.isfinite(req.guidance) or req.guidance < 0:
        raise ValueError(f"guidance {req.guidance} must be >= 0 (1 disables guidance)")
    if req.seed < 0 or req.seed >= 2**63:
        raise ValueError(f"seed {req.seed} must be in [0, 2**63)")
    if req.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {req.sampler!r}; valid: {sorted(SAMPLERS)}")
    if not math.isfinite(req.shift) or req.shift <= 0:
        raise ValueError(f"shift {req.shift} must be > 0")
    if not math.isfinite(req.fps) or req.fps < 1:
        raise ValueError(f"fps {req.fps} must be >= 1")
    for name, off in (("cache", "the step cache"), ("contrast", "timed-prompt contrast")):
        v = getattr(req, name)
        if not is_number(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} {v!r} must be a number >= 0 (0 turns {off} off)")
    timeline.check_switch(req.switch)
    switches(req, temporal, extension)  # raises on prompt times outside the clip or out of order


INTEGER_FIELDS = ("width", "height", "frames", "steps", "seed")
# The largest request kinema plans (frames: 2**20 + 1, 18 h at 16 fps; made window by window).
LIMITS = {"width": 16384, "height": 16384, "frames": timeline.MAX_FRAMES}
# How messages name the media fields.
MEDIA_NAMES = {"image": "image", "last_image": "last image", "video": "video",
               "extend": "video to extend"}  # fmt: skip
NUMBER_FIELDS = ("fps", "guidance", "shift", "strength")  # fps: 29.97 too; cache, contrast:
# validate() says more (their range and what 0 means)
TEXT_FIELDS = ("negative_prompt", "sampler", "switch")  # prompt: validate() names it


def is_number(v: Any) -> bool:
    """An int or float (numpy's too), not a bool."""
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def is_integer(v: Any) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _timed_pair(item: Any) -> tuple[float, str]:
    """A timed prompt ``(seconds, prompt)``; ValueError naming the valid form otherwise."""
    if (
        not isinstance(item, list | tuple) or len(item) != 2 or not is_number(item[0])
        or not isinstance(item[1], str)
    ):  # fmt: skip
        raise ValueError(
            f"prompts must be (seconds, prompt) pairs, e.g. (1.0, 'a dog'); got {item!r}"
        )
    if not item[1].strip():
        raise ValueError(f"the prompt at {item[0]} s is empty; describe the video from then on")
    return float(item[0]), item[1]


def switches(req: Request, temporal: int, extension: bool = False) -> list[tuple[int, str]]:
    """The request's timed prompts as (first new frame, prompt) (:func:`timeline.switch_frames`);
    an extension's ``frames`` are all new, any other clip's start with its first frame. A
    switch must leave a latent step after it (frame ``frames - temporal``, or one less)."""
    length = req.frames - (0 if extension else 1)
    return timeline.switch_frames(req.prompts, req.fps, length / req.fps, temporal,
                                  latest=length - temporal)  # fmt: skip


@dataclass
class Video:
    """A generated clip: ``frames`` uint8 (T, H, W, 3), ``fps``, and what made it (``info``)."""

    frames: np.ndarray
    fps: float
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:  # not the frames' every value (a notebook shows this)
        t, h, w = (tuple(np.shape(self.frames)) + (0, 0, 0))[:3]
        seconds = f", {t / self.fps:.2f} s" if self.fps else ""
        return f"Video({t} frames, {w}x{h}, {self.fps:g} fps{seconds})"

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[np.ndarray]:
        """The frames (H, W, 3) uint8 in order."""
        return iter(self.frames)

    def save(self, path: str | Path) -> Path:
        """Write the video (format by extension) and a ``.json`` sidecar with ``info``; ``~``
        is the home folder."""
        from kinema.io.paths import check_output_name
        from kinema.io.video import check_sidecar, write_sidecar, write_video

        check_output_name(path)
        path = Path(path).expanduser()
        check_sidecar(path)
        out = write_video(path, self.frames, self.fps, metadata=file_metadata(self.info))
        write_sidecar(out, self.info)
        return out


@dataclass(frozen=True)
class SavedVideo:
    """A clip written straight to a file (:meth:`Pipeline.save`): where, how many frames,
    and what made it (``info``, also in the ``.json`` sidecar)."""

    path: Path
    frames: int
    fps: float
    info: dict[str, Any]


class VideoStream:
    """A clip as it is made (:meth:`Pipeline.stream`). Iterating it yields its ``total``
    frames (H, W, 3) uint8 in order, one window's worth at a time; time spent between frames
    (the caller writing them) counts as "write". After the last frame, :meth:`info` is what
    :class:`Video` ``info`` would be."""

    def __init__(
        self, pipe: Pipeline, req: Request, media: dict[str, np.ndarray], said: list[str],
        progress: Progress | None,
    ) -> None:  # fmt: skip
        self.pipe, self.request, self.media, self.said, self.progress = (
            pipe, req, media, said, progress
        )  # fmt: skip
        self.fps = float(req.fps)
        self.total = req.frames + len(media.get("extend", ()))  # an extension's source too
        self.metadata = file_metadata({"prompt": req.prompt, "seed": req.seed})
        self.clock, self.made, self.evaluations, self.started = Clock(), 0, 0, False

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.started:
            raise RuntimeError("a VideoStream runs once; call Pipeline.stream again for more")
        self.started = True
        for piece, n in self.pipe.pieces(self.request, self.media, self.clock, self.progress):
            self.evaluations += n
            for frame in piece:
                self.made += 1
                yield frame
            self.clock.add("write")

    def info(self) -> dict[str, Any]:
        """The sidecar: what :meth:`Pipeline.describe` says, with the warnings given. Ready
        after the last frame (RuntimeError before: its evaluations and timings are not)."""
        if self.made < self.total:
            raise RuntimeError(f"info() is ready after the last frame; {self.made} of "
                               f"{self.total} made so far")  # fmt: skip
        self.clock.add("write")
        source = len(self.media.get("extend", ()))
        return {**self.pipe.describe(self.request, self.evaluations, self.clock, source),
                "warnings": self.said}  # fmt: skip

    def save(
        self, path: str | Path, info: dict[str, Any] | None = None,
        tap: Callable[[int, np.ndarray], None] | None = None,
    ) -> SavedVideo:  # fmt: skip
        """Write the frames to ``path`` as they come (format by extension), then the ``.json``
        sidecar (:meth:`info` plus ``info``'s entries). ``tap(index, frame)`` sees each frame
        on its way to the file. Nothing is left at ``path`` if it fails."""
        from kinema.io.video import check_sidecar, write_sidecar, write_video

        check_sidecar(path)

        def frames() -> Iterator[np.ndarray]:
            for i, frame in enumerate(self):
                if tap is not None:
                    tap(i, frame)
                yield frame

        out = write_video(path, frames(), self.fps, metadata=self.metadata)
        made = {**self.info(), **(info or {})}
        write_sidecar(out, made)
        return SavedVideo(out, self.made, self.fps, made)


def file_metadata(info: dict[str, Any]) -> dict[str, str]:
    """What a video file carries of its making: the prompt as title, the seed as comment."""
    return {"title": str(info.get("prompt", "")), "comment": f"seed={info.get('seed')}"}


def initial_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Gaussian noise drawn exactly as diffusers does: CPU generator, float32."""
    return torch.randn(
        shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
    )


def partial_schedule(full: Any, strength: float, num_train_timesteps: int = 1000) -> Any:
    """The tail of a schedule that starts at noise level ``strength`` (SDEdit): ``strength``
    itself, then the schedule's sigmas below it. Strength >= the first sigma keeps it all."""
    if strength >= float(full.sigmas[0]):
        return full
    keep = full.sigmas[:-1] < strength
    first_t = torch.tensor([strength * num_train_timesteps]).to(full.timesteps.dtype)
    sigmas = torch.cat([torch.tensor([strength], dtype=full.sigmas.dtype), full.sigmas[:-1][keep]])
    return dataclasses.replace(
        full,
        sigmas=torch.cat([sigmas, full.sigmas[-1:]]),
        timesteps=torch.cat([first_t, full.timesteps[keep]]),
    )


SEAM_FADE = 8  # frames over which a continuation's first frames take on the decoder's seam error


def carry_seam(new: np.ndarray, last: np.ndarray, decoded_last: np.ndarray,
               fade: int = SEAM_FADE) -> np.ndarray:  # fmt: skip
    """A continuation's new frames (T, H, W, 3) uint8, corrected so they follow on from ``last``
    (the frame already in the video before them) without a jump.

    The window decoded its context frames again from their re-encoding; ``decoded_last`` is its
    version of ``last``, and their difference is the VAE's reconstruction error there. Added to
    the first new frames with a weight falling linearly from 1 to 0 over ``fade`` frames, it
    makes the step across the seam the model's own motion instead of motion plus that error.
    """
    residual = last.astype(np.float32) - decoded_last.astype(np.float32)  # (H, W, 3)
    weights = np.clip(1 - np.arange(1, len(new) + 1) / (fade + 1), 0, None)  # (T,)
    n = int(np.count_nonzero(weights))
    out = new.copy()
    mixed = new[:n].astype(np.float32) + weights[:n, None, None, None] * residual
    out[:n] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    return out


def to_uint8(video: Tensor) -> np.ndarray:
    """Decoded video (1, 3, T, H, W) in [-1, 1] -> frames (T, H, W, 3) uint8."""
    x = ((video[0].float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)  # (T, H, W, 3)
    return (x * 255).round().to(torch.uint8).cpu().numpy()


class Pipeline:
    """A loaded model: DiT, VAE and text encoder on their devices, plus sampling defaults.

    ``image_encoder`` (a :class:`kinema.i2v.CLIPImageEncoder`) comes with Wan 2.1
    image-to-video checkpoints, whose DiT takes CLIP image tokens."""

    context_latents = 2  # latent frames carried from one window (or source clip) to the next

    def __init__(
        self,
        dit: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: Any,
        *,
        name: str,
        defaults: SamplingDefaults,
        load_seconds: float = 0.0,
        image_encoder: Any = None,
        cache_calibration: Any = None,
        placement: Placement | None = None,
        vocabulary: Sequence[str] | None = None,
        loras: Sequence[tuple[str, float]] = (),
    ) -> None:
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.loras = list(loras)  # (file, strength) merged into the DiT, for the sidecar
        self.vocabulary = frozenset(vocabulary) if vocabulary else None  # words it was trained on
        self.image_encoder, self.cache_calibration = image_encoder, cache_calibration
        if getattr(dit.config, "image_dim", None) is not None and image_encoder is None:
            raise ValueError(  # it would run without its image tokens: a different video
                f"{name}: the DiT reads CLIP image tokens (image_dim {dit.config.image_dim}) "
                "but the model has no image encoder (image_encoder/ and image_processor/)"
            )
        self.name, self.defaults, self.load_seconds = name, defaults, load_seconds
        self.placement = placement or Placement("none", next(dit.parameters()).device)
        self.load_warnings: list[str] = []  # said when the model loaded; in every sidecar too
        # Bytes a VAE decode may use; None: the device's free memory (memory.free_bytes).
        # A decode that would not fit is tiled in space (:meth:`decode_tile`).
        self.decode_budget: int | None = None

    def lora_records(self) -> list[dict[str, Any]]:
        """The merged LoRAs as the sidecar and the eval JSON record them."""
        return [{"path": path, "strength": strength} for path, strength in self.loras]

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (the DiT's device, or the offload target)."""
        if self.placement.policy != "none":
            return self.placement.device
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.proj_out.weight.dtype

    @property
    def spatial_factor(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x patch size)."""
        return self.vae.config.spatial_factor * self.dit.config.patch_size[1]

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.temporal_factor * self.dit.config.patch_size[0]

    @property
    def image_channels(self) -> bool:
        """True for an image-to-video DiT (Wan I2V): it takes the condition as extra channels."""
        return self.dit.config.in_channels > self.vae.config.z_dim

    @property
    def context_frames(self) -> int:
        """Pixel frames that make up :attr:`context_latents` latent frames (1 + t(k - 1))."""
        return 1 + self.vae.config.temporal_factor * (self.context_latents - 1)

    # -- entry points ------------------------------------------------------------------------------

    def generate(self, prompt: str, *, progress: Progress | None = None, **settings: Any) -> Video:
        """Make a video. ``settings`` are the :class:`Request` fields (width, frames, seed, ...),
        or ``seconds`` instead of ``frames`` (as the CLI's ``--seconds``)."""
        if isinstance(prompt, Request):
            raise TypeError("generate() takes a prompt; run a Request with run(request)")
        seconds = settings.pop("seconds", None)  # None: the model's frames
        if seconds is not None:
            if settings.get("frames") is not None:
                raise ValueError("give frames or seconds, not both")
            video = settings.get("video")
            settings["frames"], _ = self.frames_for(seconds, settings.get("fps"), video=video)
        return self.run(Request(prompt=prompt, **settings), progress=progress)

    def frames_for(
        self, seconds: float, fps: float | None = None, extend: Any = None, video: Any = None
    ) -> tuple[int, float]:
        """(frames, fps) of ``seconds``: a clip's (tk+1 frames, at ``fps``, else the rate of
        ``video``, the source of a restyle, else the model's), or with ``extend`` (the video
        to continue) the new frames of an extension (tk, at ``fps`` or the source's rate)."""
        if fps is not None and not is_number(fps):
            raise ValueError(f"fps must be a number, got {fps!r}")
        source = extend if extend is not None else video
        if fps is None and source is not None:
            fps = source.fps if isinstance(source, Video) else self._source_fps(source)
        if extend is None:
            fps = self.defaults.fps if fps is None else fps
            return timeline.clip_frames(seconds, fps, self.temporal_factor), fps
        return timeline.new_frames(seconds, fps, self.temporal_factor), fps

    def extend(self, video: Any, seconds: float, prompt: str, **settings: Any) -> Video:
        """Continue ``video`` (path or (T, H, W, 3) uint8) by ``seconds`` under ``prompt``."""
        if "frames" in settings or "extend" in settings:
            given = "frames" if "frames" in settings else "extend"
            raise ValueError(f"extend() takes no {given}=: the video comes first and the "
                             "new frames from seconds")  # fmt: skip
        if video is None:
            raise ValueError("the video to extend must be a path or (T, H, W, 3) uint8 frames, "
                             "got None")  # fmt: skip
        _media().check_source(video, MEDIA_NAMES["extend"])
        frames, fps = self.frames_for(seconds, settings.pop("fps", None), extend=video)
        return self.run(Request(prompt=prompt, extend=video, frames=frames, fps=fps, **settings))

    def run(self, request: Request, progress: Progress | None = None) -> Video:
        """Generate what ``request`` asks for (text-, image-, video-to-video or extension)."""
        req, media, said = self.prepare(request, progress)
        clock = Clock()
        pieces = list(self.pieces(req, media, clock, progress))
        frames = np.concatenate([frames for frames, _ in pieces])
        source = len(media.get("extend", ()))
        info = self.describe(req, sum(n for _, n in pieces), clock, source)
        return Video(frames, float(req.fps), {**info, "warnings": said})

    def stream(self, request: Request, progress: Progress | None = None) -> VideoStream:
        """Generate ``request`` frame by frame: iterate the returned :class:`VideoStream` for
        (H, W, 3) uint8 frames in order, window by window as they are made, so a long video is
        never whole in memory; its ``total`` says how many come before the first. The same
        frames as :meth:`run`."""
        req, media, said = self.prepare(request, progress)
        return VideoStream(self, req, media, said, progress)

    def save(
        self, request: Request, path: str | Path, progress: Progress | None = None,
        info: dict[str, Any] | None = None,
    ) -> SavedVideo:  # fmt: skip
        """Generate ``request`` straight into the video file ``path`` (format by extension) and
        its ``.json`` sidecar (plus ``info``'s entries): each window's frames are written as
        they come (:meth:`stream`), while ``run`` then ``Video.save`` hold it all, twice while
        they join the windows. The same frames as :meth:`run`. Nothing is left at ``path`` if
        it fails."""
        return self.stream(request, progress).save(path, info)

    def pieces(
        self, req: Request, media: dict[str, np.ndarray], clock: Clock, progress: Progress | None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """The output in order, as (frames (T, H, W, 3) uint8, DiT evaluations) pieces: a
        video-to-video clip whole, else window by window (:meth:`windows`)."""
        if req.video is not None:
            yield from self.restyle(req, media["video"], clock, progress)
        else:
            yield from self.windows(req, media, clock, progress)

    # -- request preparation -----------------------------------------------------------------------

    def prepare(
        self, request: Request, progress: Progress | None = None
    ) -> tuple[Request, dict[str, np.ndarray], list[str]]:
        """Read and fit media, resolve defaults, validate; returns the request, media and the
        warnings about it (also given as Python warnings: words the model never read
        (:class:`UnknownWordsWarning`), a prompt longer than its text encoder reads, an image
        or video far smaller than the request)."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a Request, got {type(request).__name__} (for a "
                            "prompt alone use generate(prompt, ...))")  # fmt: skip
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a function (done, total), got {progress!r}")
        with notes.collecting() as said:
            req, media = self._prepare(request)
        return req, media, [*self.load_warnings, *said]

    def _prepare(self, request: Request) -> tuple[Request, dict[str, np.ndarray]]:
        req, media = request, {}
        for name, said in MEDIA_NAMES.items():
            if getattr(req, name) is not None:
                _media().check_source(getattr(req, name), said)
        if req.extend is not None and req.frames is None:  # the model's 33 is no extension's
            t = self.temporal_factor
            raise ValueError(f"an extension needs frames: the new frames, a multiple of {t} "
                             "(or pipe.extend(video, seconds=...))")  # fmt: skip
        for name in ("video", "extend"):  # a Video that generate() returned: its frames
            if isinstance(given := getattr(req, name), Video):
                frames = given.frames
                if req.fps and req.fps != given.fps and name == "video":  # as a file is read
                    from kinema.io.video import resample_frames

                    frames = resample_frames(frames, given.fps, req.fps)
                elif req.fps and req.fps != given.fps:  # an extension keeps its frames
                    _media().warn_relabelled(given.fps, req.fps)
                req = dataclasses.replace(req, **{name: frames}, fps=req.fps or given.fps)
        for name in ("width", "height", "frames", "fps"):  # before they size any media
            value = getattr(req, name)
            if value is not None and value > LIMITS.get(name, math.inf):  # 1e300 s: no memory
                raise ValueError(f"{name} {value} is over {LIMITS[name]}, the most kinema makes")
            if value is not None and value < 1 and name in ("width", "height"):
                check_shape(value, self.spatial_factor, 1, self.spatial_factor, 1)
            if value is not None and not value >= 1:  # nan too
                raise ValueError(f"{name} {value} must be >= 1")
        if req.strength is not None and not 0 < req.strength <= 1:
            raise ValueError(f"strength {req.strength} must be in (0, 1]")
        if req.video is not None and req.extend is not None:
            raise ValueError("give either video (video-to-video) or extend, not both")
        if req.image is not None and (req.video is not None or req.extend is not None):
            other = "video (video-to-video)" if req.video is not None else "extend"
            raise ValueError(f"give either image (image-to-video) or {other}, not both")
        idle_switch = not req.prompts and (req.switch != "blend" or req.contrast is not None)
        idle_contrast = bool(req.prompts) and req.switch == "cut" and req.contrast is not None
        given_negative = req.negative_prompt is not None
        if req.strength is not None and req.video is None:
            what = ("an extension keeps its source and takes none" if req.extend is not None
                    else "give a video to restyle too")  # fmt: skip
            raise ValueError(f"strength {req.strength} is video-to-video's noise level: {what}")
        if req.video is not None:
            size = (self.defaults.width, self.defaults.height)
            req, media["video"] = _media().source_video(req, self.temporal_factor, size)
            req = dataclasses.replace(req, strength=req.strength or 0.7)
            if req.prompts and req.switch == "cut":
                raise ValueError(
                    "switch 'cut' ends windows early; video-to-video restyles the source frame "
                    "for frame, so its timed prompts blend: use blend"
                )
        if req.extend is not None:
            extend = _media().extension_source(req, self.context_frames, self.spatial_factor)
            req, media["extend"] = extend
        req = req.resolved(self.defaults)
        validate(req, self.spatial_factor, self.temporal_factor, extension=req.extend is not None)
        self.check_image_inputs(req)
        given = [name for name in ("image", "last_image") if getattr(req, name) is not None]
        images = {name: _media().read_image_any(getattr(req, name)) for name in given}
        if idle_switch:  # warnings once the request is known to be good
            notes.warn("switch and contrast act on timed prompts (--at, prompts=); this request "
                       "has none, so they change nothing")  # fmt: skip
        if idle_contrast:
            notes.warn("contrast acts on blended switches; with switch 'cut' it changes nothing")
        if given_negative and req.negative_prompt.strip() and req.guidance <= 1:
            notes.warn(f"the negative prompt acts only with guidance > 1; at guidance "
                       f"{req.guidance:g} it changes nothing")  # fmt: skip
        prompts = [req.prompt, *(p for _, p in req.prompts)]
        negative = [req.negative_prompt] if req.guidance > 1 else []
        warn_unknown_words(prompts + negative, self.vocabulary, self.name)
        warn_cut_prompts(self.text_encoder, prompts + negative)
        for name, image in images.items():
            media[name] = _media().fit_image(image, req.width, req.height)
        return req, media

    def check_image_inputs(self, req: Request) -> None:
        """Raise ValueError when the request's images do not fit this checkpoint."""
        first_last = getattr(self.dit.config, "pos_embed_seq_len", None) is not None
        if self.image_channels and req.image is None and req.extend is None and req.video is None:
            raise ValueError(
                f"this model needs --image: {self.name} is an image-to-video checkpoint "
                "(give image=, or a clip to extend / restyle)"
            )
        if req.last_image is not None and (req.image is None or req.video is not None):
            raise ValueError("last_image ends an image-to-video clip: give image too, and no video")
        if req.last_image is not None and not first_last:
            raise ValueError(
                f"last_image needs a first-last-frame image-to-video checkpoint; {self.name} "
                "is not one"
            )
        if first_last and (req.extend is not None or req.video is not None):
            task = "an extension" if req.extend is not None else "a video-to-video restyle"
            raise ValueError(f"{self.name} is a first-last-frame checkpoint: it makes a clip "
                             f"between two images (--image and --last-image), not {task}; "
                             "use its image-to-video or text-to-video sibling")  # fmt: skip
        if first_last and req.last_image is None:
            raise ValueError(f"this model needs --last-image: {self.name} is first-last-frame")

    def _source_fps(self, video: Any) -> float:
        return _media().source_fps(video, self.defaults.fps)

    # -- the generation loop -----------------------------------------------------------------------

    def windows(
        self, req: Request, media: dict[str, np.ndarray], clock: Clock, progress: Progress | None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Text-/image-to-video, extension, long videos and timed prompts, window by window:
        yields the source clip of an extension (0 DiT evaluations), then each window's new
        frames with its DiT evaluations. Only the context frames are kept between windows."""
        source = media.get("extend")  # an array, or a file read as it is written (SourceClip)
        plan = self.plan(req, extension=source is not None)
        tail = source  # the frames the continuation starts from
        if isinstance(source, np.ndarray):
            yield source, 0
        elif source is not None:
            yield from ((piece, 0) for piece in source.pieces())
            tail = source.tail
        steps = Steps(progress, req.steps * len(plan))
        for window in plan:
            cond = self.window_condition(window, tail, media, clock, final=window is plan[-1])
            pixels, n = self.one_window(req, window, cond, clock, steps)
            new = pixels[window.context : window.keep]
            if window.context:  # no jump where it continues what is already there
                new = carry_seam(new, tail[-1], pixels[window.context - 1])  # type: ignore[index]
            tail = new if tail is None else np.concatenate([tail[-self.context_frames :], new])
            yield new, n

    @property
    def window_frames(self) -> int:
        """The most frames made at once: a longer clip is made (or restyled) window by window
        (:meth:`plan`), so this, not the clip's length, sizes the peak memory."""
        return max(self.defaults.frames, self.context_frames + self.temporal_factor)

    def plan(self, req: Request, extension: bool) -> list[timeline.Window]:
        """The windows of a request (one for a plain clip within the model's window)."""
        t = self.temporal_factor
        return timeline.plan(
            req.prompt, switches(req, t, extension), req.frames, self.window_frames,
            self.context_frames, req.seed, has_tail=extension, temporal=t, switch=req.switch,
        )  # fmt: skip

    def window_condition(
        self, window: timeline.Window, tail: np.ndarray | None, media: dict[str, np.ndarray],
        clock: Clock, final: bool = False,
    ) -> FrameCondition | ImageCondition | None:  # fmt: skip
        """Clean latent frames for a window: the previous output's tail, or the first image
        (as extra channels on image-to-video checkpoints, with the last image on ``final``)."""
        image = media.get("image")
        if self.image_channels:
            given = dict(enumerate(tail[-window.context :])) if window.context else {0: image}
            if final and "last_image" in media:
                given[window.frames - 1] = media["last_image"]
            cond = self.image_condition(given, window.frames, media.get("last_image"))
            clock.add("encode")
            return cond
        if window.context:
            given = tail[-window.context :]
        elif image is not None:
            given = image[None]
        else:
            return None
        latents = self.encode(given)  # (1, C, k, h, w)
        clock.add("encode")
        f = (window.frames - 1) // self.vae.config.temporal_factor + 1
        mask = torch.zeros(f, dtype=torch.bool)
        mask[: latents.shape[2]] = True
        padded = torch.zeros(*latents.shape[:2], f, *latents.shape[3:], device=latents.device)
        padded[:, :, : latents.shape[2]] = latents
        return FrameCondition(padded, mask)

    def one_window(
        self, req: Request, window: timeline.Window, cond: FrameCondition | None, clock: Clock,
        steps: Steps, source: np.ndarray | None = None,
    ) -> tuple[np.ndarray, int]:  # fmt: skip
        """Denoise and decode one window; returns its frames (T, H, W, 3) and DiT calls. With
        ``source`` (the window's frames of a video to restyle), start from its latents noised
        to the level ``strength`` (SDEdit) instead of from noise."""
        wreq = dataclasses.replace(
            req, prompt=window.prompt, frames=window.frames, seed=window.seed
        )
        context, uncond, other = self.encode_text(wreq, window.prompts[1:])
        clock.add("text")
        noise = initial_noise(wreq.seed, self.latent_shape(wreq)).to(self.device)
        schedule = flow_schedule(req.steps, req.shift, req.sampler)
        if source is not None:
            schedule = partial_schedule(schedule, req.strength)
            x0 = self.encode(source)
            clock.add("encode")
            s0 = float(schedule.sigmas[0])
            noise = (1 - s0) * x0.float() + s0 * noise
        latents, calls = self.denoise(wreq, noise, schedule, (context, uncond, other), cond, steps)
        clock.add("denoise")
        pixels = to_uint8(self.decode(latents))
        clock.add("decode")
        return pixels, calls

    def restyle(
        self, req: Request, source: RestyleSource, clock: Clock, progress: Progress | None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Video-to-video (SDEdit, Meng et al. 2022): noise the source's latents to the level
        ``strength`` and denoise them under the new prompt (timed prompts: per latent frame).
        A source longer than the model's window is restyled window by window, as a long video
        is made: each window after the first starts from the last frames already restyled
        (given clean) and goes on with the source's next frames, so memory stays one
        window's, and the source is read as it goes. Yields each window's new frames with its
        DiT evaluations."""
        plan = self.plan(req, extension=False)
        schedule = partial_schedule(flow_schedule(req.steps, req.shift, req.sampler), req.strength)
        steps = Steps(progress, len(schedule.timesteps) * len(plan))
        frames = source.frames()
        first: dict[str, np.ndarray] = {}  # I2V checkpoints: conditioned on the first frame
        tail: np.ndarray | None = None
        for window in plan:
            chunk = np.stack(list(itertools.islice(frames, window.new)))  # the source's next
            if self.image_channels and not first:
                first["image"] = chunk[0]
            if window.context:  # the restyled frames so far, not the source's
                chunk = np.concatenate([tail[-window.context :], chunk])  # type: ignore[index]
            cond = self.window_condition(window, tail, first, clock)
            pixels, n = self.one_window(req, window, cond, clock, steps, chunk)
            new = pixels[window.context : window.keep]
            if window.context:
                new = carry_seam(new, tail[-1], pixels[window.context - 1])  # type: ignore[index]
            tail = new if tail is None else np.concatenate([tail[-self.context_frames :], new])
            yield new, n

    # -- building blocks ---------------------------------------------------------------------------

    def encode_text(
        self, req: Request, timed: Sequence[tuple[int, str]] = ()
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Context tokens (1, L, D) for the prompt, for the negative prompt under guidance,
        and None. ``timed`` ((first pixel frame, prompt), ...): prompts that take over within
        the clip; then the contexts are per latent frame, (1, F, L, D), each frame's the tokens
        of the prompt in force at its first pixel frame (the negative prompt's repeated), and
        the third holds each frame's neighbouring prompt (:func:`timeline.neighbour_prompts`)."""
        guided = req.guidance > 1
        prompts = [req.prompt, *(p for _, p in timed)] + ([req.negative_prompt] if guided else [])
        with self.placement.text(self.text_encoder, prompts):
            tokens, _ = self.text_encoder.encode(prompts)
        tokens = tokens.to(self.device, self.dtype)  # (P [+ 1], L, D)
        uncond = tokens[-1:] if guided else None
        f = self.latent_shape(req)[2]
        starts = [0, *(frame for frame, _ in timed)]
        which = timeline.latent_prompts(starts, f, self.temporal_factor)
        neighbours = timeline.neighbour_prompts(which)
        if neighbours is None:
            return tokens[which[0]][None], uncond, None  # (1, L, D)
        # a switch inside the clip: one context per latent frame
        uncond = uncond[:, None].expand(-1, f, -1, -1) if uncond is not None else None
        return tokens[which][None], uncond, tokens[neighbours][None]  # (1, F, L, D)

    def latent_shape(self, req: Request) -> tuple[int, int, int, int, int]:
        s, t = self.vae.config.spatial_factor, self.vae.config.temporal_factor
        f = (req.frames - 1) // t + 1
        return (1, self.vae.config.z_dim, f, req.height // s, req.width // s)

    def image_condition(
        self, given: dict[int, np.ndarray], frames: int, last_image: np.ndarray | None = None
    ) -> ImageCondition:
        """Image-to-video checkpoints: the ``given`` pixel frames {index: (H, W, 3) uint8} of a
        ``frames``-frame clip as mask + latent channels, and CLIP tokens of its first frame
        (and of ``last_image`` on first-last-frame checkpoints)."""
        tokens = None
        if self.image_encoder is not None:
            anchors = [given[0]] + ([last_image] if last_image is not None else [])
            with self.placement.encoder(self.image_encoder.model):
                tokens = self.image_encoder.encode(anchors)  # (N, L, image_dim)
        with self.placement.part(self.vae):
            return build_condition(self.vae, given, frames, tokens, self.device)

    def velocity(
        self, x: Tensor, t: Tensor, context: Tensor, image: Tensor | None = None
    ) -> Tensor:
        """The DiT as a function of (x (B, C, F, H, W), t (), (B,) or (B, F), context), and
        CLIP image tokens (B N, L, image_dim) for image-to-video checkpoints."""
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.ndim <= 1 else t.repeat(b // t.shape[0], 1)
        if image is None:
            return self.dit(x.to(self.dtype), t.to(x.device), context)
        return self.dit(x.to(self.dtype), t.to(x.device), context, image=image.to(self.dtype))

    def denoise(
        self,
        req: Request,
        x: Tensor,
        schedule: Any,
        contexts: tuple[Tensor, Tensor | None, Tensor | None],
        condition: FrameCondition | ImageCondition | None,
        steps: Steps,
    ) -> tuple[Tensor, int]:
        """Run the sampler from ``x`` under ``contexts`` (:meth:`encode_text`'s prompt,
        negative prompt and neighbouring prompts); returns normalised latents and the DiT
        calls made."""
        context, uncond, other = contexts
        velocity = self.velocity
        if isinstance(condition, ImageCondition):  # extra input channels, not clean frames
            velocity, condition = image_conditioned(self.velocity, condition), None
        counted, calls = count_calls(velocity)
        if other is not None:  # timed prompts, blended: see timeline (contrast 0: plain cfg)
            model_fn = contrast_cfg(counted, context, uncond, other, req.guidance, req.contrast)
        elif uncond is None:  # guidance <= 1: one conditional forward per step, as diffusers
            model_fn = cfg(counted, context, context, 1.0)
        else:
            model_fn = cfg(counted, context, uncond, req.guidance)
        model_fn = condition_frames(model_fn, condition)
        if req.cache:  # skip DiT evaluations while its input barely changes (TeaCache family)
            from kinema.sampling.cache import dit_probe, step_cache

            model_fn = step_cache(model_fn, req.cache, self.cache_calibration, dit_probe(self.dit))
        sampler = SAMPLERS[req.sampler]
        with torch.inference_mode(), self.placement.dit(self.dit):
            x = sampler(model_fn, x, schedule.sigmas, schedule.timesteps, callback=steps.tick)
        x = condition.impose(x) if condition is not None else x
        return x, calls()

    def calibrate_cache(self, prompt: str, seed: int = 0, **settings: Any) -> Any:
        """Fit the step cache's :class:`~kinema.sampling.cache.CacheCalibration` on one
        uncached text-to-video run of ``prompt`` (the model's defaults unless ``settings``
        say otherwise), use it from now on and return it (``.save(folder / CALIBRATION_FILE)``
        keeps it with the model)."""
        from kinema.sampling.cache import calibrate, dit_probe

        if self.image_channels:
            raise ValueError(f"{self.name} is an image-to-video checkpoint; the step cache is "
                             "calibrated on text-to-video models")  # fmt: skip
        req = Request(prompt=prompt, seed=seed, **settings).resolved(self.defaults)
        validate(req, self.spatial_factor, self.temporal_factor)
        context, uncond, _ = self.encode_text(req)
        guided = cfg(self.velocity, context, context if uncond is None else uncond,
                     1.0 if uncond is None else req.guidance)  # fmt: skip
        noise = initial_noise(req.seed, self.latent_shape(req)).to(self.device)
        schedule = flow_schedule(req.steps, req.shift, req.sampler)
        sample = lambda fn: SAMPLERS[req.sampler](fn, noise, schedule.sigmas, schedule.timesteps)
        with self.placement.dit(self.dit):
            self.cache_calibration = calibrate(guided, sample, dit_probe(self.dit))
        return self.cache_calibration

    def encode(self, frames: np.ndarray) -> Tensor:
        """Frames (T, H, W, 3) uint8 -> normalised latents (1, C, F, h, w) on the DiT's device,
        with the causal cache in half precision for an fp32 VAE (``LEAN_CACHE``)."""
        from kinema.models.vae import LEAN_CACHE

        vae_dtype = next(self.vae.parameters()).dtype
        frames = np.require(frames, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # copy if not
        video = torch.from_numpy(frames).to(self.device)
        video = video.permute(3, 0, 1, 2)[None].to(vae_dtype) / 127.5 - 1  # (1, 3, T, H, W)
        with torch.inference_mode(), self.placement.part(self.vae):
            latents = self.vae.encode(video, cache_dtype=LEAN_CACHE.get(vae_dtype))
            return self.vae.normalize(latents).float()

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (1, C, F, h, w) -> video (1, 3, T, H, W) in [-1, 1], with the
        causal cache in half precision for an fp32 VAE (``LEAN_CACHE``)."""
        from kinema.models.vae import LEAN_CACHE

        vae_dtype = next(self.vae.parameters()).dtype
        cache_dtype = LEAN_CACHE.get(vae_dtype)
        with torch.inference_mode(), self.placement.part(self.vae):
            z = self.vae.denormalize(latents.to(vae_dtype))
            tile = self.decode_tile(z, (cache_dtype or vae_dtype).itemsize)
            return self.vae.decode(z, tile=tile, cache_dtype=cache_dtype)

    def decode_tile(self, latents: Tensor, cache_nbytes: int) -> TileSpec | None:
        """Spatial tiles for decoding ``latents`` (1, C, F, h, w) when the untiled decode would
        not fit in the decode budget (``decode_budget``, else the device's free memory,
        :func:`kinema.memory.free_bytes`), else None. A tiled decode differs from the untiled
        one at the seams, so it is only the way out of running out of memory; it warns (the
        sidecar keeps the note). A VAE whose decode the ranks split by tiles keeps its own."""
        from kinema.memory import decode_tile, free_bytes, vae_decode_bytes
        from kinema.models.vae import CausalVAE, TileSpec  # noqa: F811 (the annotation's)

        if not isinstance(self.vae, CausalVAE):
            return None
        budget, what = self.decode_budget, "the decode budget is"
        if budget is None:
            budget, what = free_bytes(latents.device), "free memory is"
        if budget is None:
            return None
        v, (f, h, w) = self.vae.config, latents.shape[2:]
        frames, s = 1 + v.temporal_factor * (f - 1), v.spatial_factor
        size = decode_tile(v, w * s, h * s, frames, budget, cache_nbytes)
        if size is None:
            return None
        need = vae_decode_bytes(v, w * s, h * s, frames, cache_nbytes=cache_nbytes)
        notes.warn(f"VAE decode in {size} px tiles: untiled it needs about {need / 2**30:.2f} "
                   f"GiB, {what} {budget / 2**30:.2f} GiB")  # fmt: skip
        return TileSpec(size, size // 4)

    def describe(
        self, req: Request, evaluations: int, clock: Clock, source_frames: int = 0
    ) -> dict[str, Any]:
        """The sidecar: request, model, versions, DiT evaluations and timings in seconds. An
        extension's ``frames`` are its new ones; ``source_frames`` and ``output_frames`` say
        how many came from the source and how many the output holds."""
        timings = {"load": round(self.load_seconds, 4), **clock.rounded()}
        timings["total"] = round(sum(timings.values()), 4)
        loras = {"loras": self.lora_records()} if self.loras else {}
        counts = {}
        if req.extend is not None:
            counts = {"source_frames": source_frames, "output_frames": source_frames + req.frames}
        return {
            **req.summary(),
            **counts,
            "model": self.name,
            **loras,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "offload": self.placement.policy,
            "compile": getattr(self.dit, "compiled", False),  # a ParallelDiT: never
            "transformer_evaluations": evaluations,
            "timings": timings,
            "versions": {
                "kinema": kinema.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }


class Clock:
    """Seconds spent per phase (text, encode, denoise, decode; write, where frames are written
    as they come), summed over windows."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.spent = {"text": 0.0, "denoise": 0.0, "decode": 0.0}

    def add(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[phase] = self.spent.get(phase, 0.0) + now - self.last
        self.last = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.spent.items()}


class Steps:
    """Counts sampler steps over all windows and reports (done, total) to ``progress``."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def tick(self, i: int, n: int, x: Tensor) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
