"""The HTTP server: OpenAI's Videos API over kinema's one pipeline, and a web page at ``/``.

``create_app(settings)`` loads the model, opens the job store in ``settings.data_dir``,
recovers it after a crash, and returns a FastAPI app whose worker thread starts and stops with
the app. Request bodies come as JSON or multipart (the ``openai`` SDK always sends multipart);
both are checked against one pydantic model per endpoint, which is also what the OpenAPI
document shows, so unknown fields are refused and the document stays true.

Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kinema import memory, notes, timeline
from kinema.serve import media
from kinema.serve.jobs import (
    VIDEO_FILE,
    DataDirLock,
    Job,
    JobSpec,
    QueueFull,
    Store,
    Worker,
    new_folder,
)
from kinema.serve.jobs import new_id as new_video_id

log = logging.getLogger("kinema.serve")
WEB = Path(__file__).parent / "web"
BUILTIN = "kinema-tiny"
PUBLIC_PATHS = ("/", "/favicon.ico", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


@dataclass(frozen=True)
class ServeSettings:
    """How ``kinema serve`` runs."""

    data_dir: Path  # jobs.sqlite3 and the job folders
    model: str | None = None  # model folder, or None for the built-in kinema-tiny
    device: str | None = None  # cpu, cuda, cuda:N, mps (None: best available)
    dtype: str | None = None  # fp32, bf16, fp16 (None: per device)
    offload: str = "none"  # none, model, block (kinema.offload.Placement)
    compile: bool = False  # torch.compile the DiT's blocks (kinema.loading.load)
    lora: tuple[tuple[str, float], ...] = ()  # LoRA files and strengths merged into the DiT
    api_key: str | None = None  # when set, /v1 needs "Authorization: Bearer <key>"
    max_queue: int = 32  # queued + running jobs before 429
    max_upload_bytes: int = 32 * 2**20  # per uploaded file
    max_upload_pixels: int = 4096 * 4096  # width x height of an uploaded image or video
    max_upload_frames: int = 2000  # frames of an uploaded video
    max_seconds: float = 60.0  # longest clip (or extension) a request may ask for
    max_memory_bytes: int | None = None  # a job's estimated peak (None: free after loading)
    retention_s: int = 7 * 24 * 3600  # a finished job and its files expire after this
    poll_after_ms: int = 250  # the openai-poll-after-ms hint on retrieve

    @property
    def model_id(self) -> str:
        """The public model name: kinema-tiny, or the model folder's name."""
        return BUILTIN if self.model in (None, BUILTIN) else Path(str(self.model)).name


# ---------------------------------------------------------------------------------------------
# Shapes (response models; FastAPI checks every response against them)
# ---------------------------------------------------------------------------------------------


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """A video job, as the openai SDK's ``Video`` parses it."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None
    expires_at: int | None
    prompt: str | None
    seconds: str
    size: str
    remixed_from_video_id: str | None
    error: VideoError | None
    warnings: list[str] = Field(
        default_factory=list,
        description="kinema's addition: what the model warned about the request when it was "
        "queued (words it never read in training, a prompt longer than it reads, an image "
        "far smaller than the size)",
    )
    seed: int | None = Field(
        None,
        description="kinema's addition: the noise seed it was made with (drawn at random when "
        "the request gave none; give it back to make the same video again)",
    )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class ModelDefaults(BaseModel):
    size: str
    seconds: str
    fps: int
    steps: int
    guidance: float
    size_multiple: int  # width and height must be multiples of this


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    defaults: ModelDefaults


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# Request bodies (JSON or multipart; one model per endpoint, extra fields refused)
# ---------------------------------------------------------------------------------------------


class VideoReference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="id of a completed video")


class ImageReference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_url: str | None = Field(None, description="a base64 data URL; other URLs are refused")
    file_id: str | None = Field(None, description="not supported: upload the file instead")


def _size_form(value: str) -> str:
    if not re.fullmatch(r"[0-9]{1,6}x[0-9]{1,6}", value):  # 6 digits: 8192 is the most
        raise PydanticCustomError("size", "must be WIDTHxHEIGHT in pixels, e.g. '128x128'")
    return value


Size = Annotated[str, AfterValidator(_size_form)]  # "832x480"; the sides are checked later


class TimedFields(BaseModel):
    """Timed prompts, accepted wherever a prompt is."""

    model_config = ConfigDict(extra="forbid")
    at: list[Annotated[str, Field(max_length=4100)]] | None = Field(
        None, max_length=64,
        description='timed prompts, as the CLI\'s --at: ["1.5:a cat jumps", ...] (seconds from '
        "the start of the clip, or of the continuation for an extension)",
    )  # fmt: skip
    switch: str | None = Field(None, description="how `at` switches: blend (default) or cut")

    @field_validator("at", mode="before")
    @classmethod
    def one_or_many(cls, value: Any) -> Any:  # a form sends one `at` as a plain string
        return [value] if isinstance(value, str) else value

    @field_validator("*", mode="before")
    @classmethod
    def no_booleans(cls, value: Any) -> Any:
        """JSON's true / false is no count or setting (lax parsing, which multipart's text
        numbers need, would read ``"steps": true`` as 1 step)."""
        if isinstance(value, bool):
            raise PydanticCustomError("bool", "must be a number or text, not true / false")
        return value


class KinemaFields(TimedFields):
    """kinema's own settings, accepted beside OpenAI's fields (None: the model's default)."""

    negative_prompt: str | None = Field(None, max_length=4000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    shift: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    sampler: str | None = Field(None, description="unipc or euler")
    fps: int | None = Field(None, ge=1, le=120)
    contrast: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False,
        description="timed prompts (blend): guidance away from the next one",
    )  # fmt: skip
    cache: float | None = Field(
        None, description="step-cache threshold (>= 0; 0: off; default: the model's)"
    )


class CreateVideoBody(KinemaFields):
    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    seconds: str | float | None = Field(None, description='clip length, e.g. "4" or 2.5')
    size: Size | None = Field(None, description='"WIDTHxHEIGHT"')
    input_reference: ImageReference | None = Field(
        None, description="image-to-video: the first frame (a file in multipart)"
    )


class EditVideoBody(KinemaFields):
    prompt: str = Field(min_length=1, max_length=4000)
    video: VideoReference | None = Field(None, description="the source: {id} or a file")
    model: str | None = None
    size: Size | None = None
    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="how much to change (SDEdit)"
    )


class ExtendVideoBody(KinemaFields):
    prompt: str = Field(min_length=1, max_length=4000)
    seconds: str | float = Field(description="length of the new segment in seconds")
    video: VideoReference | None = Field(None, description="the clip to extend: {id} or a file")
    model: str | None = None


class RemixVideoBody(TimedFields):
    prompt: str = Field(min_length=1, max_length=4000)
    strength: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    contrast: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)  # with `at`
    seed: int | None = Field(None, ge=0, lt=2**63)


FILE_FIELDS = {CreateVideoBody: ("input_reference",), EditVideoBody: ("video",),
               ExtendVideoBody: ("video",), RemixVideoBody: ()}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, self.status, headers=self.headers)


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, code, message, param)


NO_CHARACTERS = (
    "characters are not supported: kinema's models take a prompt, an image (input_reference) "
    "or a video (edits, extensions), not a reusable character"
)


def not_found(video_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no video with id {shown_id(video_id)}", "video_id")


class BodyTooLarge(Exception):
    """A streamed body went past ``limit`` bytes (:class:`BodyLimit`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over {limit} bytes")
        self.limit = limit


# Which request parameter a pipeline ValueError is about, by the start of its message.
PARAM_OF_MESSAGE = (("width", "size"), ("height", "size"), ("an extension keeps", "size"),
                    ("frames", "seconds"), ("extension frames", "seconds"),
                    ("source video", "video"), ("video to extend", "video"),
                    ("cannot decode video", "video"),
                    ("cannot decode image", "input_reference"), ("image", "input_reference"),
                    ("strength", "strength"), ("steps", "steps"), ("guidance", "guidance"),
                    ("seed", "seed"), ("unknown sampler", "sampler"), ("shift", "shift"),
                    ("fps", "fps"), ("prompt time", "at"), ("unknown switch mode", "switch"),
                    ("switch", "switch"), ("prompt", "prompt"), ("cache", "cache"),
                    ("contrast", "contrast"))  # fmt: skip


def param_of(message: str) -> str | None:
    return next((p for start, p in PARAM_OF_MESSAGE if message.startswith(start)), None)


def shown_id(video_id: str) -> str:
    """An id as an error quotes it: cut to 80 characters (a client's bad id comes back short)."""
    return repr(video_id if len(video_id) <= 80 else video_id[:80] + "...")


def validation_error(err: ValidationError | RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field."""
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
    loc = [x for x in loc if x not in UNION_TAGS]  # "seconds.str": the union member tried
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return bad(param, f"unknown parameter {'.'.join(loc)!r}", "unknown_parameter")
    got = first.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {str(got)[:80]!r})"
    message = re.sub(r" or instance of \w+", "", str(first.get("msg")))  # a Python class
    hint = f"; {SHAPES[param]}" if param in SHAPES else ""
    return bad(param, f"{'.'.join(loc) or 'body'}: {message}{shown}{hint}")


UNION_TAGS = {"str", "int", "float", "bool"}
SHAPES = {  # the valid form of the fields that take an object
    "input_reference": 'give {"image_url": "data:image/png;base64,..."} or upload the image',
    "video": 'give {"id": "video_..."} or upload the video',
}


# ---------------------------------------------------------------------------------------------
# Reading bodies
# ---------------------------------------------------------------------------------------------


def nest(fields: dict[str, Any]) -> dict[str, Any]:
    """Multipart ``video[id]=x`` -> ``{"video": {"id": "x"}}``; a name given both as a value
    and as an object (``prompt=x`` and ``prompt[y]=z``) is refused, not half dropped."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        outer, inner = key[:-1].split("[", 1) if "[" in key and key.endswith("]") else (key, None)
        if outer in out and isinstance(out[outer], dict) != (inner is not None):
            raise bad(outer, f"{outer} is given both as a value and as an object ({key})")
        if inner is None:
            out[key] = value
        else:
            out.setdefault(outer, {})[inner] = value
    return out


async def read_body(request: Request, model: type[BaseModel]) -> tuple[Any, dict[str, bytes]]:
    """The validated body and the bytes of its uploaded files (by field name)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):  # a gzip body read as JSON was "not valid JSON"
        raise ApiError(415, "unsupported_content_encoding", f"content encoding {encoding!r} is "
                       "not supported; send the body uncompressed")  # fmt: skip
    if ctype == "application/json":
        try:
            raw = await request.json()
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, 5000-digit integers
            raise bad(None, f"body is not valid JSON: {err}", "invalid_json") from err
        except RecursionError:  # [[[[...: nested past what a request needs
            raise bad(None, "body is not valid JSON: nested too deeply", "invalid_json") from None
        files: dict[str, bytes] = {}
    elif ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raw, files = await read_form(request, FILE_FIELDS[model])
    else:
        raise ApiError(415, "unsupported_content_type", f"content type {ctype or 'none'!r}: "
                       "send application/json or multipart/form-data")  # fmt: skip
    if not isinstance(raw, dict):
        raise bad(None, "body must be a JSON object")
    try:
        return model.model_validate(raw), files
    except ValidationError as err:
        raise validation_error(err) from err


async def read_form(request: Request, file_fields: tuple[str, ...]) -> tuple[dict, dict]:
    """Plain fields (nested by brackets) and file parts' bytes, with the size limit checked."""
    limit = request.app.state.settings.max_upload_bytes
    try:
        form = await request.form(max_files=4, max_fields=128, max_part_size=2**20)  # 64 `at`
    except BodyTooLarge:
        raise
    except Exception as err:  # python-multipart / starlette parse errors
        raise bad(None, f"malformed form body: {err}", "invalid_form") from err
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if not isinstance(value, UploadFile):
            add_field(fields, key, value)
        elif key not in file_fields:
            raise bad(key, f"{key!r} cannot be a file; file fields: {list(file_fields)}")
        elif key in files:
            raise bad(key, f"{key}: one file, not several")
        else:
            files[key] = await read_upload(key, value, limit)
    return nest(fields), files


def add_field(fields: dict[str, Any], key: str, value: str) -> None:
    """One form field; ``key[]`` (the openai SDK's arrays) or a repeated key makes a list."""
    name = key.removesuffix("[]")
    if key.endswith("[]") or name in fields:
        before = fields.get(name, [])
        fields[name] = [*(before if isinstance(before, list) else [before]), value]
    else:
        fields[name] = value


async def read_upload(key: str, upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    await upload.close()
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"{key}: the file is larger than the limit of "
                       f"{limit} bytes (--max-upload-mb)", key)  # fmt: skip
    if not data:
        raise bad(key, f"{key}: the file is empty")
    return data


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (413), by header or while reading."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await too_large(self.limit).response()(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class HeadAsGet:
    """ASGI middleware: HEAD on a path that has a GET route and no HEAD route of its own is
    answered as GET without the body (HTTP asks every GET resource to take HEAD; FastAPI's
    routes take only the methods they name). Headers, status and Content-Length are GET's."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app, self.router = app, router

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or self.takes_head(scope):
            return await self.app(scope, receive, send)

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the body's parts are dropped; the last one ends the response
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)

    def takes_head(self, scope: dict) -> bool:
        from starlette.routing import Match

        return any(route.matches(scope)[0] == Match.FULL for route in self.router.routes)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the request body is over {limit} bytes")


# ---------------------------------------------------------------------------------------------
# Building jobs
# ---------------------------------------------------------------------------------------------


def byte_range(header: str | None, size: int) -> tuple[int, int]:
    """The bytes [start, end) a ``Range: bytes=...`` header asks of a file of ``size`` bytes:
    the whole file without one (or for several ranges, or another unit, which a server may
    answer whole); ValueError when the range lies past the end (a 416)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if m is None or m.group(1) == m.group(2) == "":
        return 0, size
    first, last = m.groups()
    if first == "":  # the last N bytes
        if int(last) == 0 or size == 0:
            raise ValueError(f"bytes {header} of {size}")
        return max(0, size - int(last)), size
    start = int(first)
    if last != "" and int(last) < start:  # 5-2 is no range at all: ignored (RFC 9110 14.2)
        return 0, size
    end = size if last == "" else min(size, int(last) + 1)
    if start >= size:
        raise ValueError(f"bytes {header} of {size}")
    return start, end


def parse_seconds(value: str | float, limit: float) -> float:
    shown = shown_id(str(value))  # quoted, cut to 80 characters
    try:  # a plain decimal number: float() also takes "1_0" (10) and "١" (Arabic 1)
        if not timeline.DECIMAL.fullmatch(str(value)):
            raise ValueError(value)
        seconds = float(value)
    except ValueError:
        raise bad("seconds", f'seconds {shown} is not a number, e.g. "4"') from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > limit:
        raise bad("seconds", f"seconds {shown} must be > 0 and <= {limit:g}")
    return seconds


def parse_size(size: str | None) -> dict[str, int]:
    if size is None:
        return {}
    w, h = (int(v) for v in size.split("x"))
    if not (0 < w <= 8192 and 0 < h <= 8192):
        raise bad("size", f"size {size!r}: each side must be in 1..8192")
    return {"width": w, "height": h}


def fmt_seconds(seconds: float) -> str:
    return f"{round(seconds, 3):g}"


def span(frames: int, fps: float) -> float:
    """A clip's length as ``seconds`` means it: from its first frame to its last (a clip of
    "2" at 16 fps is 33 frames; a 1 s clip extended by 1 s is "2")."""
    return (frames - 1) / fps


def kinema_settings(body: BaseModel) -> dict[str, Any]:
    """The Request fields given in ``body`` (cache only where the pipeline has it); ``at``
    becomes the Request's ``prompts``, [[seconds, prompt], ...]."""
    from dataclasses import fields

    known = {f.name for f in fields(type_of_request())}
    given = {k: v for k, v in body.model_dump(exclude_none=True).items() if k in KINEMA_KEYS}
    if "at" in given:
        given["prompts"] = [list(timed_prompt(text)) for text in given.pop("at")]
    for key in given:
        if key not in known:
            raise bad(key, f"{key} is not supported by this kinema version", "unsupported")
    return given


KINEMA_KEYS = set(KinemaFields.model_fields) | {"strength"}


def timed_prompt(text: str) -> tuple[float, str]:
    """One ``at`` entry, "SECONDS:PROMPT", parsed as the CLI's ``--at`` is."""
    from kinema.timeline import parse_timed

    try:
        return parse_timed(text)
    except ValueError as err:
        raise bad("at", str(err)) from err


def type_of_request() -> type:
    from kinema.pipeline import Request

    return Request


@dataclass
class Draft:
    """A job being built: its folder (inputs written there) and public fields."""

    folder: str
    spec: JobSpec
    seconds: str | None = None
    remixed_from: str | None = None
    warnings: list[str] = field(default_factory=list)  # said before the pipeline checks it


class Service:
    """What the endpoints do, apart from HTTP: the pipeline, the store and the worker."""

    def __init__(self, settings: ServeSettings, pipe: Any) -> None:
        self.settings, self.pipe = settings, pipe
        self.store = Store(settings.data_dir)
        self.store.recover(retention_s=settings.retention_s)
        self.worker = Worker(self.store, pipe, settings.retention_s)
        self.started = int(time.time())
        self.memory = settings.max_memory_bytes or memory.free_bytes(pipe.device)

    def check_memory(self, req: Any) -> None:
        """Refuse a request whose estimated peak (:func:`kinema.memory.work_bytes`, what
        ``kinema info`` prints, less the loaded weights) exceeds what this server may use: a
        size far past the model's would take the machine down, and cannot be stopped mid-step."""
        try:
            memory.check_fits(self.pipe, req.width, req.height, req.frames, self.memory,
                              "this server")  # fmt: skip
        except ValueError as err:
            raise bad("size", str(err)) from None

    def job_dir(self, folder: str) -> Path:
        return self.settings.data_dir / "jobs" / folder

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_id:
            raise bad("model", f"unknown model {model!r}; valid: {self.settings.model_id!r}")

    def get_completed(self, video_id: str, param: str) -> Job:
        job = self.store.get(video_id)
        if job is None:
            raise ApiError(404, "not_found", f"no video with id {shown_id(video_id)}", param)
        if job.status != "completed":
            raise ApiError(409, "video_not_ready", f"video {video_id} is {job.status}", param)
        return job

    # -- inputs --------------------------------------------------------------------------------

    def save_image(self, folder: str, data: bytes) -> str:
        """Decode and re-encode an uploaded image as PNG in the job folder."""
        try:
            img = media.check_image(data, self.settings.max_upload_pixels)
        except ValueError as err:
            raise bad("input_reference", f"input_reference: {err}", "invalid_image") from err
        img.save(self.job_dir(folder) / "input.png", format="PNG")
        return "input.png"

    def save_video(self, folder: str, data: bytes, param: str) -> str:
        """Keep an uploaded video if every frame decodes (stored under the decoded format)."""
        tmp = self.job_dir(folder) / "upload.tmp"
        tmp.write_bytes(data)
        s = self.settings
        try:
            probe = media.check_video(tmp, s.max_upload_frames, s.max_upload_pixels)
        except ValueError as err:
            raise bad(param, f"{param}: {err}", "invalid_video") from err
        name = f"source{probe.extension}"
        tmp.rename(self.job_dir(folder) / name)
        return name

    def copy_output(self, folder: str, source: Job) -> str:
        shutil.copyfile(self.store.folder(source) / VIDEO_FILE, self.job_dir(folder) / "source.mp4")
        return "source.mp4"

    def source_video(self, folder: str, ref: VideoReference | None, data: bytes | None) -> str:
        if data is not None and ref is not None:
            raise bad("video", 'give the video as a file or as {"id": ...}, not both')
        if data is not None:
            return self.save_video(folder, data, "video")
        if ref is None:
            raise bad("video", 'video is required: upload a file or give {"id": ...}')
        return self.copy_output(folder, self.get_completed(ref.id, "video"))

    # -- submission ----------------------------------------------------------------------------

    def submit(self, draft: Draft) -> Job:
        """Validate with the pipeline (which reads the inputs), then queue (429 when full). A
        request without a seed gets a random one, as a new take each time (a remix keeps its
        source's)."""
        if "seed" not in draft.spec.settings:
            seed = secrets.randbelow(2**31)
            draft.spec = replace(draft.spec, settings={**draft.spec.settings, "seed": seed})
        try:
            resolved, inputs, said = self.pipe.prepare(self.request_of(draft))
        except ValueError as err:  # messages name input files by their field, not their path
            message = str(err).replace(f"{self.job_dir(draft.folder)}{os.sep}", "")
            raise bad(param_of(message), message) from err
        self.check_memory(resolved)
        if draft.spec.kind == "extend":  # the stitched total: source plus new frames
            source = span(len(inputs["extend"]), resolved.fps)
            if source > self.settings.max_seconds:  # held to the limit, as an edit's is
                raise bad("video", f"video: {source:g} s is over the limit "
                          f"of {self.settings.max_seconds:g} s")  # fmt: skip
            draft.seconds = fmt_seconds(span(len(inputs["extend"]) + resolved.frames, resolved.fps))
        elif (length := span(resolved.frames, resolved.fps)) > self.settings.max_seconds:
            param = "seconds" if draft.spec.kind == "generate" else "video"  # a long upload
            raise bad(param, f"{param}: {length:g} s is over the limit "
                      f"of {self.settings.max_seconds:g} s")  # fmt: skip
        return self.queue(draft, replace(draft.spec, warnings=[*draft.warnings, *said]), resolved)

    def request_of(self, draft: Draft) -> Any:
        files = {k: str(self.job_dir(draft.folder) / v) for k, v in draft.spec.inputs.items()}
        return type_of_request()(prompt=draft.spec.prompt, **draft.spec.settings, **files)

    def queue(self, draft: Draft, spec: JobSpec, resolved: Any) -> Job:
        seconds = draft.seconds or fmt_seconds(span(resolved.frames, resolved.fps))
        job = Job(
            seq=0, id=new_video_id(), folder=draft.folder, status="queued", progress=0,
            created_at=int(time.time()), completed_at=None, expires_at=None,
            model=self.settings.model_id, prompt=spec.prompt, seconds=seconds,
            size=f"{resolved.width}x{resolved.height}", remixed_from=draft.remixed_from,
            error_code=None, error_message=None, spec=spec,
        )  # fmt: skip
        try:
            job = self.store.add(job, self.settings.max_queue)
        except QueueFull as err:
            wait = max(1, math.ceil(err.pending * self.store.mean_seconds()))
            raise ApiError(429, "queue_full", f"{err}; retry later", None,
                           {"Retry-After": str(wait)}) from err  # fmt: skip
        self.worker.wake()
        return job

    def build(self, make: Callable[[str], Draft]) -> Job:
        """Make a job folder, fill it with ``make(folder)``, submit; no folder left on error."""
        folder = new_folder()
        self.job_dir(folder).mkdir(parents=True)
        try:
            return self.submit(make(folder))
        except BaseException:
            shutil.rmtree(self.job_dir(folder), ignore_errors=True)
            raise

    # -- the four ways to make a video -----------------------------------------------------------

    def create(self, body: CreateVideoBody, files: dict[str, bytes]) -> Job:
        self.check_model(body.model)
        settings = {**kinema_settings(body), **parse_size(body.size)}
        said: list[str] = []
        if body.seconds is not None:  # the video object says the span made of it (1.1 -> 1)
            value = parse_seconds(body.seconds, self.settings.max_seconds)
            fps = body.fps or self.pipe.defaults.fps
            with notes.collecting() as said:  # e.g. made one step long: in the video object
                settings["frames"] = timeline.clip_frames(value, fps, self.pipe.temporal_factor)
        image = files.get("input_reference")
        if image is not None and body.input_reference is not None:
            raise bad("input_reference", "give input_reference as a file or as "
                      "{image_url | file_id}, not both")  # fmt: skip
        image = image or self.image_from_json(body.input_reference)

        def make(folder: str) -> Draft:
            inputs = {"image": self.save_image(folder, image)} if image else {}
            spec = JobSpec("generate", body.prompt, settings, inputs)
            return Draft(folder, spec, warnings=said)

        return self.build(make)

    def image_from_json(self, ref: ImageReference | None) -> bytes | None:
        if ref is None:
            return None
        if ref.file_id is not None:
            raise bad("input_reference", "input_reference: file_id is not supported; upload the "
                      "image or give a base64 data URL as image_url")  # fmt: skip
        if ref.image_url is None:
            raise bad("input_reference", f"input_reference has no image_url; "
                      f"{SHAPES['input_reference']}")  # fmt: skip
        try:
            return media.decode_data_url(ref.image_url)
        except ValueError as err:
            raise bad("input_reference", f"input_reference.image_url: {err}") from err

    def edit(self, body: EditVideoBody, files: dict[str, bytes]) -> Job:
        self.check_model(body.model)
        settings = {**kinema_settings(body), **parse_size(body.size)}

        def make(folder: str) -> Draft:
            source = self.source_video(folder, body.video, files.get("video"))
            return Draft(folder, JobSpec("edit", body.prompt, settings, {"video": source}))

        return self.build(make)

    def extend(self, body: ExtendVideoBody, files: dict[str, bytes]) -> Job:
        self.check_model(body.model)
        settings = kinema_settings(body)
        seconds = parse_seconds(body.seconds, self.settings.max_seconds)

        def make(folder: str) -> Draft:
            source = self.source_video(folder, body.video, files.get("video"))
            path = str(self.job_dir(folder) / source)
            fps = body.fps or self.source_fps(path)
            with notes.collecting() as said:
                frames = timeline.new_frames(seconds, fps, self.pipe.temporal_factor)
            extra = {"frames": frames, "fps": fps}
            spec = JobSpec("extend", body.prompt, {**settings, **extra}, {"extend": source})
            return Draft(folder, spec, warnings=said)

        return self.build(make)

    def source_fps(self, path: str) -> int:
        from kinema.media import source_fps

        try:
            return source_fps(path, self.pipe.defaults.fps)
        except ValueError as err:
            raise bad("video", f"video: {err}") from err

    def remix(self, video_id: str, body: RemixVideoBody) -> Job:
        """Same settings as the source, a new prompt: video-to-video from the source's output."""
        source = self.get_completed(video_id, "video_id")
        keep = ("negative_prompt", "steps", "guidance", "shift", "sampler", "seed", "fps")
        settings = {k: v for k, v in source.spec.settings.items() if k in keep}
        w, h = (int(v) for v in source.size.split("x"))
        settings.update(width=w, height=h, **kinema_settings(body))

        def make(folder: str) -> Draft:
            inputs = {"video": self.copy_output(folder, source)}
            spec = JobSpec("remix", body.prompt, settings, inputs)  # its seconds: what it makes
            return Draft(folder, spec, remixed_from=source.id)

        return self.build(make)


def model_defaults(pipe: Any) -> dict[str, Any]:
    d = pipe.defaults
    return {"size": f"{d.width}x{d.height}", "seconds": fmt_seconds(span(d.frames, d.fps)),
            "fps": d.fps, "steps": d.steps, "guidance": d.guidance,
            "size_multiple": pipe.spatial_factor}  # fmt: skip


def video_object(job: Job) -> dict[str, Any]:
    """The public shape of a job (openai's ``Video``)."""
    error = None
    if job.status == "failed":
        error = {"code": job.error_code or "failed", "message": job.error_message or ""}
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status,
        "progress": job.progress, "created_at": job.created_at,
        "completed_at": job.completed_at, "expires_at": job.expires_at, "prompt": job.prompt,
        "seconds": job.seconds, "size": job.size, "remixed_from_video_id": job.remixed_from,
        "error": error, "warnings": job.spec.warnings, "seed": job.spec.settings.get("seed"),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "bad request: the error names the field in param"),
        (401, "missing or wrong API key"),
        (404, "unknown id"),
        (409, "the video is not completed"),
        (413, "request body too large"),
        (429, "queue full; see Retry-After"),
    )
}


def create_app(settings: ServeSettings, pipe: Any = None) -> FastAPI:
    """The server for ``settings``; ``pipe`` is a loaded pipeline (default: load the model).
    Raises ValueError, before loading, when another server holds the data dir."""
    lock = DataDirLock(settings.data_dir)
    try:
        if pipe is None:
            from kinema.loading import load

            pipe = load(settings.model, device=settings.device, dtype=settings.dtype,
                        offload=settings.offload, compile=settings.compile,
                        lora=settings.lora)  # fmt: skip
        service = Service(settings, pipe)
    except BaseException:
        lock.release()
        raise

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.worker.start()
        yield
        await run_in_threadpool(service.worker.stop)
        service.store.close()
        lock.release()

    app = FastAPI(title="kinema", version=_version(), lifespan=lifespan,
                  summary="OpenAI-compatible Videos API for kinema")  # fmt: skip
    app.state.settings, app.state.service = settings, service
    install_errors(app)
    install_auth(app, settings.api_key)
    add_routes(app, service)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 2**20)
    app.add_middleware(HeadAsGet, router=app.router)
    app.openapi = lambda: build_openapi(app, settings.api_key is not None)
    return app


def _version() -> str:
    import kinema

    return kinema.__version__


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return too_large(err.limit).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        """A bug: OpenAI's error shape, not a plain-text 500 (the traceback goes to the log)."""
        message = f"internal error ({type(err).__name__}: {err}); the server's log has the rest"
        return ApiError(500, "server_error", message).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        headers, message = dict(err.headers or {}), str(err.detail)
        if err.status_code == 405:  # Allow: every method of the routes on this path (Starlette
            methods = sorted(allowed_methods(request))  # names only the first route's)
            headers["Allow"] = ", ".join(methods)
            message = f"{request.method} is not allowed here; valid: {', '.join(methods)}"
        return ApiError(err.status_code, code, message, None, headers).response()


# Paths under /v1/videos/ that name an action, not a video: POST only.
POST_ONLY = ("edits", "extensions", "characters")


def allowed_methods(request: Request) -> set[str]:
    """The HTTP methods some route takes at ``request``'s path: those of the routes written
    as that very path where there are any (``/v1/videos/edits``: POST, not also the GET and
    DELETE of ``/v1/videos/{video_id}``)."""
    from starlette.routing import Match

    exact: set[str] = set()
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            route_methods = getattr(route, "methods", None) or set()
            methods |= route_methods
            if getattr(route, "path", None) == request.url.path:
                exact |= route_methods
    methods = exact or methods
    return methods | ({"HEAD"} if "GET" in methods else set())  # HeadAsGet


def install_auth(app: FastAPI, api_key: str | None) -> None:
    """With an API key, everything but the page, its static files and the docs needs it."""
    if api_key is not None:
        app.add_middleware(ApiKeyGate, key=api_key.encode())


class ApiKeyGate:
    """ASGI middleware: ``Authorization: Bearer <key>`` (the scheme in any case, as HTTP has
    it) on every path but the public ones, else 401. Plain ASGI, not Starlette's
    ``BaseHTTPMiddleware``, which wraps what the app raises (an over-long streamed body's
    :class:`BodyTooLarge`) in an ExceptionGroup that no handler catches: a 500."""

    def __init__(self, app: Any, key: bytes) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        err = ApiError(401, "invalid_api_key", "missing or wrong API key: send "
                       "'Authorization: Bearer <key>'", None,
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip
        await err.response()(scope, receive, send)


def add_routes(app: FastAPI, service: Service) -> None:
    """Every endpoint; handlers are thin: read, call the service, shape."""
    settings = service.settings
    dump = lambda job: video_object(job)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:  # none: a 204, not a 404 in every browser console
        return Response(status_code=204)

    def model_object() -> dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": service.started,
                "owned_by": "kinema", "defaults": model_defaults(service.pipe)}  # fmt: skip

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    def list_models() -> dict[str, Any]:
        """The served model; ``defaults`` (kinema's) are what a request leaves out."""
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelObject, responses=ERRORS)
    def retrieve_model(model_id: str) -> dict[str, Any]:
        """The served model by its id (``client.models.retrieve``)."""
        if model_id != settings.model_id:
            message = f"no model {shown_id(model_id)}; this server serves {settings.model_id!r}"
            raise ApiError(404, "model_not_found", message, "model")
        return model_object()

    @app.post("/v1/videos", response_model=VideoObject, responses=ERRORS)
    async def create_video(request: Request) -> dict[str, Any]:
        """Create a video from a prompt (and optionally a first-frame image)."""
        body, files = await read_body(request, CreateVideoBody)
        return dump(await run_in_threadpool(service.create, body, files))

    @app.post("/v1/videos/edits", response_model=VideoObject, responses=ERRORS)
    async def edit_video(request: Request) -> dict[str, Any]:
        """Video-to-video: restyle an uploaded video or a completed one ({"id"})."""
        body, files = await read_body(request, EditVideoBody)
        return dump(await run_in_threadpool(service.edit, body, files))

    @app.post("/v1/videos/extensions", response_model=VideoObject, responses=ERRORS)
    async def extend_video(request: Request) -> dict[str, Any]:
        """Continue a video by ``seconds``; the result is the source plus the continuation."""
        body, files = await read_body(request, ExtendVideoBody)
        return dump(await run_in_threadpool(service.extend, body, files))

    @app.post("/v1/videos/characters", include_in_schema=False)
    @app.get("/v1/videos/characters/{character_id}", include_in_schema=False)
    def characters() -> None:
        """Sora's characters (a person or creature from a video, reused in prompts): kinema's
        models have no such conditioning, so these answer 400 with code "unsupported" (and
        the OpenAPI document, which lists what kinema does, leaves them out)."""
        raise bad(None, NO_CHARACTERS, code="unsupported")

    @app.get("/v1/videos", response_model=VideoList, responses=ERRORS)
    def list_videos(
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        anchor = service.store.position(after) if after else None
        if after and anchor is None:
            raise bad("after", f"after: no video with id {shown_id(after)}")
        jobs, more = service.store.page(anchor, limit, order)
        data = [dump(j) for j in jobs]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last,
                "has_more": more}  # fmt: skip

    @app.get("/v1/videos/{video_id}", response_model=VideoObject, responses=ERRORS)
    def retrieve_video(video_id: str, response: Response) -> dict[str, Any]:
        if video_id in POST_ONLY:  # GET /v1/videos/edits: a 405, not "no video 'edits'"
            raise StarletteHTTPException(405)
        job = service.store.get(video_id)
        if job is None:
            raise not_found(video_id)
        response.headers["openai-poll-after-ms"] = str(settings.poll_after_ms)
        return dump(job)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=ERRORS)
    def delete_video(video_id: str) -> dict[str, Any]:
        """Delete a video: a queued or running job is cancelled, its files removed."""
        if video_id in POST_ONLY:
            raise StarletteHTTPException(405)
        job = service.store.delete(video_id)
        if job is None:
            raise not_found(video_id)
        if job.status != "in_progress":  # a running one is removed by the worker
            shutil.rmtree(service.store.folder(job), ignore_errors=True)
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    add_content_routes(app, service)


def add_content_routes(app: FastAPI, service: Service) -> None:
    content = {200: {"content": {t: {} for t in media.MEDIA_TYPES.values()},
                     "description": "the file"}}  # fmt: skip

    @app.head("/v1/videos/{video_id}/content", include_in_schema=False)  # size, type: no body
    @app.get("/v1/videos/{video_id}/content", response_class=Response,
             responses={**content, **ERRORS})  # fmt: skip
    def download_content(
        request: Request, video_id: str,
        variant: Literal["video", "thumbnail", "spritesheet"] = "video",
    ) -> Response:  # fmt: skip
        """The MP4, or its thumbnail (WebP) or spritesheet (JPEG)."""
        job = service.get_completed(video_id, "video_id")
        name = {"video": VIDEO_FILE, "thumbnail": media.THUMBNAIL,
                "spritesheet": media.SPRITESHEET}[variant]  # fmt: skip
        path = service.store.folder(job) / name
        try:  # opened now: a delete from here on unlinks a file this answer still reads
            f = path.open("rb")
        except FileNotFoundError:  # expired or removed between the check and now
            raise not_found(video_id) from None
        size = os.fstat(f.fileno()).st_size
        headers = {
            "content-length": str(size), "accept-ranges": "bytes",
            "content-disposition": f'attachment; filename="{job.id}{path.suffix}"',
        }  # fmt: skip
        try:
            start, end = byte_range(request.headers.get("range"), size)
        except ValueError:
            f.close()
            raise ApiError(416, "range_not_satisfiable", f"the file has {size} bytes", "range",
                           {"content-range": f"bytes */{size}"}) from None  # fmt: skip
        status = 200 if (start, end) == (0, size) else 206
        if status == 206:
            headers.update({"content-length": str(end - start),
                            "content-range": f"bytes {start}-{end - 1}/{size}"})  # fmt: skip
        if request.method == "HEAD":
            f.close()
            return Response(None, status, headers, media.MEDIA_TYPES[variant])

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = end - start
                while left > 0 and (block := f.read(min(1 << 20, left))):
                    left -= len(block)
                    yield block

        return StreamingResponse(chunks(), status, headers, media.MEDIA_TYPES[variant])

    @app.post("/v1/videos/{video_id}/remix", response_model=VideoObject, responses=ERRORS)
    async def remix_video(video_id: str, request: Request) -> dict[str, Any]:
        """A new video from a completed one: same settings, new prompt."""
        body, _ = await read_body(request, RemixVideoBody)
        return video_object(await run_in_threadpool(service.remix, video_id, body))


# ---------------------------------------------------------------------------------------------
# OpenAPI: the request bodies, as JSON and as multipart
# ---------------------------------------------------------------------------------------------

BODIES = {("/v1/videos", "post"): CreateVideoBody, ("/v1/videos/edits", "post"): EditVideoBody,
          ("/v1/videos/extensions", "post"): ExtendVideoBody,
          ("/v1/videos/{video_id}/remix", "post"): RemixVideoBody}  # fmt: skip


def build_openapi(app: FastAPI, secured: bool) -> dict[str, Any]:
    """FastAPI's document plus the bodies it cannot see (read by hand in JSON or multipart)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                      routes=app.routes)  # fmt: skip
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), model in BODIES.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        doc["paths"][path][method]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
            "multipart/form-data": {"schema": multipart_schema(schema, FILE_FIELDS[model])},
        }}  # fmt: skip
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for ops in doc["paths"].values():
            for op in ops.values():
                op["security"] = [{"bearer": []}]
    app.openapi_schema = doc
    return doc


def multipart_schema(schema: dict[str, Any], file_fields: tuple[str, ...]) -> dict[str, Any]:
    """The JSON schema with file fields as binary parts (``video[id]`` also accepted)."""
    props = dict(schema["properties"])
    for name in file_fields:
        props[name] = {"type": "string", "format": "binary", "description": "an uploaded file"}
    return {**schema, "properties": props}
