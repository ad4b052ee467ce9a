"""The upload schema and its checks: files in, model inputs and answers out."""

from __future__ import annotations

import functools
import io
import os
import posixpath
import uuid
from http import HTTPStatus
from pathlib import PurePosixPath
from typing import BinaryIO

import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from PIL import Image
from pydantic_core import PydanticCustomError, core_schema
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from malaria.config import Settings
from malaria.preprocess import ALLOWED_FORMATS, ImageTooLargeError, InvalidImageError, decode_image, to_model_input
from malaria.serving import compat
from malaria.serving.schemas import BatchSummary, Prediction
from malaria.spec import DECISIONS, ModelSpec


class PayloadTooLarge(BentoMLException):
    """413: an upload over the byte, pixel or count limit."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


MAX_FILENAME_CHARS = 255


def clean_filename(filename: str | None) -> str | None:
    """The client's file name made safe once, at the boundary: no folder part, no control or unpaired
    surrogate characters (they forge log lines or break the JSON answer), at most 255 characters."""
    name = posixpath.basename((filename or "").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)
    return name[:MAX_FILENAME_CHARS].strip() or None


class ImageUpload(PurePosixPath):
    """One uploaded file as Starlette parsed it (in memory up to 1 MB, spooled to disk above), with
    the client's file name (``filename``, without any folder part) and ``size`` in bytes.

    BentoML writes every ``Path`` upload to a temporary file that the handler then reads back; that
    cost about a tenth of the CPU per single-image request. A ``PurePath`` subclass is still a file
    field to BentoML (multipart parsing, ``type: file`` in the schema its clients read), and its
    bytes are read one image at a time, after the size check.
    """

    filename: str | None
    size: int
    _source: BinaryIO

    @classmethod
    def of(cls, source: BinaryIO, size: int, filename: str | None = None) -> ImageUpload:
        name = clean_filename(filename)
        upload = cls(name or "upload")
        upload.filename, upload.size, upload._source = name, size, source
        return upload

    def read(self) -> bytes:
        return self.stream().read()

    def stream(self) -> BinaryIO:
        """The upload's bytes as a file, from the start."""
        self._source.seek(0)
        return self._source

    @classmethod
    def validate(cls, value) -> ImageUpload:
        if isinstance(value, cls):
            return value
        if isinstance(value, UploadFile):
            size = value.size if value.size is not None else value.file.seek(0, os.SEEK_END)
            return cls.of(value.file, size, value.filename)
        if isinstance(value, bytes):
            return cls.of(io.BytesIO(value), len(value))
        raise PydanticCustomError("file_type", "expected a file upload (multipart/form-data)")

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler) -> dict:
        # What BentoML's own file fields publish (its clients look for ``type: file``).
        if handler.mode == "validation":
            return {"type": "file", "format": "binary"}
        return {"type": "string", "format": "binary"}


# One cell crop this small is decoded on the event loop: handing it to a thread cost more than decoding it
# (a 128 px NIH crop decodes in about 0.3 ms). /predict at c=32 served 681-745 images/s this way against
# 633-659 through the thread (`make bench` scenario, 2 workers). The pixel bound, read from the header,
# keeps a small file that inflates to a big image (a decompression bomb under the byte limit) off the loop:
# the slowest image under both bounds (300x300, flat) holds the loop for 1.3 ms, measured.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 300 * 300


def decodes_quickly(uploads: list[ImageUpload]) -> bool:
    """True for a single small image, cheaper to decode where the request is handled than on a thread."""
    if len(uploads) != 1 or not 0 < uploads[0].size <= INLINE_DECODE_BYTES:
        return False
    try:
        # The header only, of the formats decode_image accepts (some others decode while opening).
        with Image.open(uploads[0].stream(), formats=ALLOWED_FORMATS) as image:
            return image.width * image.height <= INLINE_DECODE_PIXELS
    except Exception:  # noqa: BLE001 - not an image: decode_image answers why, on a thread
        return False


class PreparedImages:
    """Validated uploads: model inputs, original sizes and names."""

    def __init__(self, batch: np.ndarray, sizes: list[tuple[int, int]], names: list[str | None]):
        self.batch, self.sizes, self.names = batch, sizes, names


def prepare_uploads(uploads: list[ImageUpload], spec: ModelSpec, settings: Settings) -> PreparedImages:
    """Check limits and run the shared preprocessing; bad input raises a 4xx BentoML error."""
    if not uploads:
        raise InvalidArgument("no image received: send at least one file")
    if len(uploads) > settings.max_images_per_request:
        raise PayloadTooLarge(f"{len(uploads)} images in one request; the limit is {settings.max_images_per_request}")
    batch = np.empty((len(uploads), spec.image_size, spec.image_size, 3), dtype=np.float32)
    sizes = []
    for i, upload in enumerate(uploads):
        image = decode_cell(upload, settings, f"image {upload.filename or i + 1}")
        sizes.append(image.size)
        batch[i] = to_model_input(image, spec)
    return PreparedImages(batch, sizes, [upload.filename for upload in uploads])


def decode_upload(upload: ImageUpload, max_bytes: int, max_pixels: int, label: str | None = None):
    """One upload -> an upright RGB image, under a route's byte and pixel limits (413 over them, 400 if not an
    image)."""
    label = label or f"image {upload.filename or ''}".strip()
    if upload.size == 0:
        raise InvalidArgument(f"{label}: empty file")
    if upload.size > max_bytes:
        raise PayloadTooLarge(f"{label}: {upload.size} bytes; the limit is {max_bytes} bytes")
    try:
        return decode_image(upload.read(), max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise PayloadTooLarge(f"{label}: {exc}") from exc
    except InvalidImageError as exc:
        raise InvalidArgument(f"{label}: {exc}") from exc


def decode_cell(upload: ImageUpload, settings: Settings, label: str | None = None):
    """One cell-crop upload, under the cell routes' limits."""
    return decode_upload(upload, settings.max_image_bytes, settings.max_image_pixels, label)


def make_predictions(
    probability: np.ndarray,
    spec: ModelSpec,
    model_version: str,
    request_id: str,
    names: list[str | None],
) -> list[Prediction]:
    return [
        Prediction(**spec.answer(p), model_version=model_version, request_id=request_id, filename=name)
        for p, name in zip(probability, names, strict=True)
    ]


def summarize(predictions: list[Prediction], spec: ModelSpec) -> BatchSummary:
    counts = {name: 0 for name in spec.class_names}
    decisions = dict.fromkeys(DECISIONS, 0)
    for prediction in predictions:
        counts[prediction.label] += 1
        decisions[prediction.decision] += 1
    return BatchSummary(total=len(predictions), counts=counts, decisions=decisions)


def new_request_id(headers) -> str:
    """The caller's X-Request-ID when it is sane, else a fresh UUID."""
    given = headers.get("x-request-id", "") if headers is not None else ""
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


# Text parts of one form: the routes declare at most 4 (a smear field's size, a box, a label, a note).
MAX_TEXT_FIELDS = 16
MAX_TEXT_PART_BYTES = 64 * 1024  # one text part held in memory: the longest declared one is 128 characters


@functools.cache
def files_allowed(cls, max_images_per_request: int) -> int:
    """How many file parts a route's form may hold: one per file field, the list limit for a list field
    (worked out once per route: it is asked at every request)."""
    return sum(
        max_images_per_request if compat.takes_a_list(cls.model_fields[field].annotation) else 1
        for field in cls.multipart_fields
    )


def harden_multipart_parsing(max_images_per_request: int) -> None:
    """Bound a form at parse time, per route, and answer 4xx, not 500, to a malformed one.

    Starlette parses a whole form before BentoML sees it, by default up to 1,000 files and 1,000 text
    parts of 1 MB each held in memory, so a count checked afterwards comes too late: the parser now
    stops at the route's own number of files (one per file field, ``max_images_per_request`` for a
    list field; one more is let through so the count check can name it), ``MAX_TEXT_FIELDS`` text
    parts and ``MAX_TEXT_PART_BYTES`` per text part (413).
    BentoML 1.4 JSON-decodes every unknown form part as text, and a binary part raises
    ``UnicodeDecodeError`` there, which its error handler turns into a 500. Text in a file field is
    taken as a URL that the server downloads (or fails to: a 500).
    """
    base = compat.multipart_serde_base()
    if getattr(base, "hardened", False):
        setattr(base, "max_images_per_request", max_images_per_request)  # noqa: B010 - a class found at run time
        return

    class HardenedMultipartSerde(base):  # type: ignore[valid-type, misc]  # BentoML's class, found at run time
        hardened = True

        async def parse_request(self, request, cls):
            most_files = files_allowed(cls, self.max_images_per_request)
            try:
                # Starlette caches the form: the base class reads this one, parsed under these bounds.
                # One file over the route's number, so that the checks below can still name the field
                # and the count ("takes one file, got 2"); past that the parser stops reading.
                form = await request.form(
                    max_files=most_files + 1, max_fields=MAX_TEXT_FIELDS, max_part_size=MAX_TEXT_PART_BYTES
                )
            except (MultiPartException, HTTPException) as exc:
                message = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
                if message.startswith(("Too many", "Part exceeded", "Field exceeded")):
                    raise PayloadTooLarge(
                        f"form over this endpoint's limit ({most_files} files, {MAX_TEXT_FIELDS} text fields "
                        f"of at most {MAX_TEXT_PART_BYTES // 1024} KB): {message}"
                    ) from exc
                raise InvalidArgument(f"malformed form: {message}") from exc
            for field in cls.multipart_fields:
                values = form.getlist(field)
                if any(not isinstance(value, UploadFile) for value in values):
                    # BentoML would fetch a URL given as text on the server, or fail with a 500.
                    raise InvalidArgument(f"field {field!r} takes files, not text")
                if len(values) > 1 and not compat.takes_a_list(cls.model_fields[field].annotation):
                    # BentoML would answer for the first file only.
                    raise InvalidArgument(f"field {field!r} takes one file, got {len(values)}")
            try:
                return await super().parse_request(request, cls)
            except UnicodeDecodeError as exc:
                fields = ", ".join(name for name in cls.model_fields if not name.startswith("_"))
                raise InvalidArgument(f"unexpected file field; this endpoint takes: {fields}") from exc

    HardenedMultipartSerde.max_images_per_request = max_images_per_request
    compat.install_form_serde(HardenedMultipartSerde)


def decode_field(upload: ImageUpload, settings: Settings):
    """One smear field upload, under the smear routes' limits."""
    return decode_upload(upload, settings.max_smear_bytes, settings.max_smear_pixels)
