"""Every use of BentoML internals, in one place.

BentoML's public API has no hook for these, so they reach into ``_bentoml_impl``, ``_bentoml_sdk``
and ``bentoml._internal``, which change between minor releases. The version check below makes an
upgrade fail here, at import, with one clear message, instead of somewhere deep in a request.
"""

from __future__ import annotations

from typing import Any, get_args

import bentoml

WRITTEN_FOR = "1.4."  # the minor series these internals were read from (1.4.40)

if not bentoml.__version__.startswith(WRITTEN_FOR):
    raise ImportError(
        f"malaria.serving.compat was written for BentoML {WRITTEN_FOR}x, found {bentoml.__version__}: "
        "check the internals used in malaria/serving/compat.py against the new release, then update WRITTEN_FOR"
    )


def multipart_serde_base() -> type:
    """BentoML's multipart/form-data request parser class."""
    from _bentoml_impl import serde

    return serde.ALL_SERDE["multipart/form-data"]


def install_form_serde(serde_cls: type) -> None:
    """Make ``serde_cls`` BentoML's parser for multipart and url-encoded form bodies."""
    from _bentoml_impl import serde

    for media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        serde.ALL_SERDE[media_type] = serde_cls


def takes_a_list(annotation: Any) -> bool:
    """Whether BentoML's multipart parser keeps every file of a field, by its own test of the annotation."""
    from _bentoml_sdk.typing_utils import is_list_type, is_union_type

    if is_union_type(annotation):
        annotation = get_args(annotation)[0]
    return is_list_type(annotation)


def cork_dispatcher(**options: Any) -> Any:
    """BentoML's adaptive-batching dispatcher (the one its batchable APIs use)."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    return CorkDispatcher(**options)


def io_descriptor() -> type:
    """The base class of a BentoML API's input model (used by tests to build one by hand)."""
    from _bentoml_sdk.io_models import IODescriptor

    return IODescriptor


def cache_response_media_types() -> None:
    """Work out each output model's response media type once, not at every response.

    BentoML derives it from the output model's JSON schema, which pydantic generates anew for every
    answer of an API returning a list: 8 % of a worker's GIL time at ``/classify`` (py-spy ``--gil``).
    The schema is fixed when the service is defined, so its media type is too.
    """
    from _bentoml_sdk.io_models import IOMixin

    if getattr(IOMixin.mime_type, "cached", False):
        return
    derive = IOMixin.mime_type.__func__
    known: dict[tuple[type, str | None], str] = {}

    def mime_type(cls: type) -> str:
        key = (cls, getattr(cls, "media_type", None))
        if key not in known:
            known[key] = derive(cls)
        return known[key]

    mime_type.cached = True  # type: ignore[attr-defined]
    IOMixin.mime_type = classmethod(mime_type)


UNMATCHED_PATH_LABEL = "(unmatched)"
BENTOML_PATHS = frozenset({"/", "/docs.json", "/schema.json", "/healthz", "/livez", "/readyz", "/metrics"})
BENTOML_PREFIXES = ("/static_content/", "/assets/")  # the Swagger page's files


def bound_endpoint_labels(mounted: tuple[str, ...] = ()) -> None:
    """Label BentoML's request metrics of a path no route serves ``(unmatched)``, not with the path.

    BentoML labels its request counter and histograms with the raw path, so every unknown path a
    client sends (no token needed: the answer is a 404) added series to ``/metrics`` without bound.
    Known: the API routes, BentoML's own, and the ``mounted`` apps' prefixes (one label each).
    """
    import copy

    from bentoml._internal.context import server_context
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    if getattr(RunnerTrafficMetricsMiddleware.__call__, "bounded", False):
        return
    count = RunnerTrafficMetricsMiddleware.__call__
    prefixes = (*BENTOML_PREFIXES, *(prefix.rstrip("/") + "/" for prefix in mounted))

    def label(path: str) -> str:
        if path in BENTOML_PATHS or path in server_context.service_routes:
            return path
        return next((p for p in prefixes if path.startswith(p) or path == p.rstrip("/")), UNMATCHED_PATH_LABEL)

    async def bounded(self: Any, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if scope["type"] not in ("http", "websocket") or path is None or label(path) == path:
            return await count(self, scope, receive, send)
        if not self._is_setup:
            self._setup()  # the metrics objects are created once, on the shared instance
        app, relabelled = self.app, copy.copy(self)

        async def with_the_real_path(inner: Any, receive: Any, send: Any) -> None:
            await app({**inner, "path": path}, receive, send)

        relabelled.app = with_the_real_path
        await count(relabelled, {**scope, "path": label(path)}, receive, send)

    bounded.bounded = True  # type: ignore[attr-defined]
    RunnerTrafficMetricsMiddleware.__call__ = bounded  # type: ignore[method-assign]


def document_bearer_auth() -> None:
    """Declare the bearer token in the OpenAPI document, so the Swagger page at ``/`` can send one.

    BentoML 1.4's OpenAPI model has no ``securitySchemes`` ("not yet supported"): the scheme is added
    to the document it serves at ``/docs.json``; Swagger UI then shows *Authorize* and sends
    ``Authorization: Bearer ...`` with every call it makes.
    """
    from bentoml._internal.service.openapi.specification import OpenAPISpecification

    if getattr(OpenAPISpecification.asdict, "bearer", False):
        return
    plain = OpenAPISpecification.asdict

    def asdict(self) -> dict[str, Any]:
        document = plain(self)
        schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearerAuth"] = {"type": "http", "scheme": "bearer", "description": "MALARIA_API_TOKEN"}
        document["security"] = [{"bearerAuth": []}]
        return document

    asdict.bearer = True  # type: ignore[attr-defined]
    OpenAPISpecification.asdict = asdict  # type: ignore[method-assign]
