"""The targets of other protocols (protocols.py): OpenAI-compatible and TEI embeddings over HTTP (aiohttp),
and the KServe v2 / Open Inference Protocol over gRPC (tritonclient's asyncio client).

Each is checked end to end before any load: reachable, speaking its protocol, serving one model that takes
texts and gives vectors (one real probe call), and taking as many texts per call as the workload sends. The
load then sends prebuilt requests (JSON bodies, or tritonclient InferInputs serialised once), and checks
every answer's vector count and width, so a server answering with the wrong shape counts as failing.

Status of a failed call: an HTTP answer other than 200 is recorded as its HTTP status (HTTP_503, say),
a timeout as DEADLINE_EXCEEDED, a connection that failed as UNAVAILABLE; a KServe call keeps its gRPC code.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

import grpc
import numpy as np

from recserve.benchmarks.protocols import (
    CHECK_DEADLINE_S,
    DESCRIPTIONS,
    PROBE_TEXT,
    Access,
    Calls,
    Endpoint,
    Reply,
    Target,
)
from recserve.benchmarks.recorder import HTTP_BASE, MISMATCH, OK
from recserve.benchmarks.results import PeerInfo
from recserve.benchmarks.targets import TargetError
from recserve.benchmarks.workloads import Workload, WorkloadSpec
from recserve.v1 import inference_pb2 as pb

DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
# What an unparseable answer raises while it is decoded: counted as a mismatched reply.
_MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError)
# The KServe tensors this project's front door and the harness agree on.
KSERVE_INPUT = "TEXT"
KSERVE_OUTPUT = "EMBEDDING"


def embed_texts(workload: Workload) -> list[list[str]]:
    """The texts of each call of the ring: peers take Embed workloads only (flags.py refuses the rest)."""
    out = []
    for kind, message in zip(workload.kinds, workload.messages, strict=True):
        if kind != "embed" or not isinstance(message, pb.EmbedRequest):
            raise TargetError(f"this target takes Embed calls only; the workload holds a {kind} call")
        out.append(list(message.texts))
    return out


def _one_line(raw: bytes, width: int = 160) -> str:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text if len(text) <= width else text[:width] + "…"


# --- HTTP: OpenAI-compatible and TEI -----------------------------------------------------------------------


class HttpCalls:
    """Prebuilt JSON bodies posted to one route; each answer decoded and its vectors counted."""

    def __init__(self, target: HttpTarget, bodies: Sequence[bytes], expect: Sequence[int]) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.target = target
        self.bodies = bodies
        self.expect = expect
        self._timeouts: dict[float, Any] = {}

    async def send(self, i: int, deadline_s: float) -> Reply:
        aiohttp, target = self._aiohttp, self.target
        limit = self._timeouts.get(deadline_s)
        if limit is None:
            limit = self._timeouts[deadline_s] = aiohttp.ClientTimeout(total=deadline_s)
        try:
            async with target.session.post(target.endpoint.path, data=self.bodies[i], timeout=limit) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            return DEADLINE_EXCEEDED, None
        except aiohttp.ClientError:
            return UNAVAILABLE, None
        if status != 200:
            return HTTP_BASE + status, None
        try:
            widths, tokens = target.decode(raw, headers)
        except _MALFORMED:
            return MISMATCH, None
        if len(widths) != self.expect[i] or any(w != target.dimension for w in widths):
            return MISMATCH, None
        return OK, tokens


class HttpTarget(Target):
    """An embeddings server over HTTP/1.1 with JSON bodies: one keep-alive connection per call in flight."""

    what: ClassVar[str]
    """What a server of this protocol is, for the errors: "an OpenAI-compatible embeddings server"."""

    def __init__(self, endpoint: Endpoint, session: Any) -> None:
        super().__init__(endpoint)
        self.session = session
        self.model = endpoint.model
        self.dimension = 0

    @abc.abstractmethod
    def body(self, texts: list[str]) -> bytes:
        """One call's request body."""

    @abc.abstractmethod
    def decode(self, raw: bytes, headers: Mapping[str, str]) -> tuple[list[int], int | None]:
        """The width of each vector of an answer, and the tokens the server counted (None: not said)."""

    def prepare(self, workload: Workload) -> Calls:
        calls = embed_texts(workload)
        return HttpCalls(self, [self.body(t) for t in calls], [len(t) for t in calls])

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One call of the pre-load checks; TargetError when nothing usable answers."""
        import aiohttp

        try:
            async with self.session.request(
                method, path, data=body, timeout=aiohttp.ClientTimeout(total=CHECK_DEADLINE_S)
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise TargetError(
                f"{self.name} did not answer {method} {path} within {CHECK_DEADLINE_S:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise TargetError(f"cannot reach {self.name}: {exc.os_error.strerror or exc}") from None
        except aiohttp.ClientError as exc:
            # Something listens there but answers no HTTP/1.1: a gRPC server, for one.
            raise TargetError(
                f"{self.name} does not answer HTTP/1.1 ({type(exc).__name__}); if it is a gRPC server, "
                "name it grpc://HOST:PORT (recserve) or kserve-v2://HOST:PORT"
            ) from None

    async def probe(self) -> int:
        """One real call of one text: the vector width, or TargetError saying why the route is not ours."""
        path = self.endpoint.path
        status, raw = await self.request("POST", path, self.body([PROBE_TEXT]))
        if status == 405:
            raise TargetError(f"{self.name} has no POST {path} (HTTP 405): not {self.what}")
        if status == 404:  # no such route, or (vLLM, TEI's OpenAI route) no such model: its body says which
            raise TargetError(
                f"{self.name}: POST {path} answered HTTP 404 ({_one_line(raw)}): not {self.what}, or not "
                "serving the model asked for"
            )
        if status in (401, 403):
            raise TargetError(f"{self.name} refused the probe call (HTTP {status}): pass --token-file?")
        if status != 200:
            raise TargetError(f"{self.name}: the probe call got HTTP {status}: {_one_line(raw)}")
        try:
            widths, _ = self.decode(raw, {})
        except _MALFORMED:
            raise TargetError(
                f"{self.name}: POST {path} answered, but not as {self.what} does: {_one_line(raw)}"
            ) from None
        if len(widths) != 1 or widths[0] < 1:
            raise TargetError(f"{self.name}: one text came back as {len(widths)} vector(s) of {widths}")
        return widths[0]

    async def get_json(self, path: str) -> Any | None:
        """GET a JSON document of the checks; None when the server has no such route or no JSON there."""
        status, raw = await self.request("GET", path)
        if status != 200:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def sibling(self, name: str) -> str:
        """A route beside the load's: /v1/embeddings -> /v1/models, /embed -> /info."""
        return self.endpoint.path.rsplit("/", 1)[0] + "/" + name


class OpenAITarget(HttpTarget):
    """`POST /v1/embeddings` with {"input": [...], "model": ...}; the answer's `data[].embedding`."""

    what = "an OpenAI-compatible embeddings server"

    def body(self, texts: list[str]) -> bytes:
        doc: dict[str, Any] = {"input": texts}
        if self.model is not None:
            doc["model"] = self.model
        return json.dumps(doc).encode()

    def decode(self, raw: bytes, headers: Mapping[str, str]) -> tuple[list[int], int | None]:
        doc = json.loads(raw)
        widths = [len(item["embedding"]) for item in doc["data"]]
        usage = doc.get("usage") or {}
        tokens = usage.get("prompt_tokens")
        return widths, tokens if isinstance(tokens, int) else None

    async def check(self, spec: WorkloadSpec, notes: list[str]) -> PeerInfo:
        if self.model is None:
            listed = await self.get_json(self.sibling("models"))
            models = listed.get("data") if isinstance(listed, dict) else None
            names = sorted({str(m.get("id")) for m in models or [] if isinstance(m, dict)})
            if len(names) > 1:
                raise TargetError(
                    f"{self.name} serves {len(names)} models ({', '.join(names)}): name one with "
                    "--model NAME (or ?model=NAME in the URL)"
                )
            if names:
                self.model = names[0]
            else:
                notes.append(
                    f"{self.name} lists no model at GET {self.sibling('models')}: its calls name none "
                    "(pass --model if it needs one)"
                )
        self.dimension = await self.probe()
        return PeerInfo(
            protocol=self.endpoint.protocol,
            model_name=self.model or "",
            dimension=self.dimension,
            server=await self.openapi_name(),
            max_texts_per_call=None,
            details={"route": f"POST {self.endpoint.path}"},
        )

    async def openapi_name(self) -> str:
        """The server's name and version from its OpenAPI document (infinity: "Infinity ... 0.0.78"), or ""
        where it has none or only FastAPI's placeholder title: the protocol itself does not say."""
        doc = await self.get_json("/openapi.json")
        info = doc.get("info") if isinstance(doc, dict) else None
        if not isinstance(info, dict):
            return ""
        title, version = str(info.get("title") or "").strip(), str(info.get("version") or "").strip()
        if not title or title == "FastAPI":
            return ""
        return f"{title} {version}".strip()


class TeiTarget(HttpTarget):
    """TEI's `POST /embed` with {"inputs": [...], "truncate": true}; the answer is a list of vectors."""

    what = "a text-embeddings-inference server"

    def body(self, texts: list[str]) -> bytes:
        # NOTE: recserve cuts a text past the model's max length by default; TEI refuses it unless asked.
        return json.dumps({"inputs": texts, "truncate": True}).encode()

    def decode(self, raw: bytes, headers: Mapping[str, str]) -> tuple[list[int], int | None]:
        rows = json.loads(raw)
        if not isinstance(rows, list):
            raise TypeError("not a list of vectors")
        widths = [len(row) if isinstance(row, list) else -1 for row in rows]
        counted = headers.get("x-compute-tokens")  # TEI says how many tokens it computed
        return widths, int(counted) if counted and counted.isdigit() else None

    async def check(self, spec: WorkloadSpec, notes: list[str]) -> PeerInfo:
        info = await self.get_json(self.sibling("info"))
        info = info if isinstance(info, dict) else {}
        limit = info.get("max_client_batch_size")
        if isinstance(limit, int) and 0 < limit < spec.texts_per_call:
            raise TargetError(
                f"{self.name} takes at most {limit} texts per call (max_client_batch_size); "
                f"this workload sends {spec.texts_per_call}"
            )
        self.dimension = await self.probe()
        version = info.get("version")
        details = {
            key: str(info[key])
            for key in ("max_batch_tokens", "max_concurrent_requests", "max_input_length", "model_dtype")
            if key in info
        }
        return PeerInfo(
            protocol=self.endpoint.protocol,
            model_name=str(info.get("model_id", "")),
            dimension=self.dimension,
            server=f"text-embeddings-inference {version}" if version else "",
            max_texts_per_call=limit if isinstance(limit, int) else None,
            details={"route": f"POST {self.endpoint.path}", **details},
        )


# --- KServe v2 / Open Inference Protocol over gRPC ---------------------------------------------------------


def grpc_code(status: str | None) -> int:
    """tritonclient's status ("StatusCode.UNAVAILABLE") as the gRPC status value the recorder keeps."""
    name = (status or "").removeprefix("StatusCode.")
    member = grpc.StatusCode.__members__.get(name)
    return int(member.value[0]) if member is not None else UNKNOWN


class KServeCalls:
    """InferInputs serialised once per call of the ring; each answer's EMBEDDING shape and bytes checked."""

    def __init__(self, target: KServeTarget, texts: Sequence[list[str]]) -> None:
        from tritonclient.grpc import InferInput, InferRequestedOutput  # type: ignore[import-untyped]
        from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

        self.target = target
        self.error = InferenceServerException
        self.inputs = []
        for call in texts:
            tensor = InferInput(KSERVE_INPUT, [len(call)], "BYTES")
            tensor.set_data_from_numpy(np.array([t.encode() for t in call], dtype=np.object_))
            self.inputs.append([tensor])
        self.outputs = [InferRequestedOutput(KSERVE_OUTPUT)]
        self.expect = [len(call) for call in texts]

    async def send(self, i: int, deadline_s: float) -> Reply:
        target = self.target
        try:
            result = await target.client.infer(
                target.model,
                self.inputs[i],
                outputs=self.outputs,
                client_timeout=deadline_s,
                headers=target.headers,
            )
        except self.error as exc:
            return grpc_code(exc.status()), None
        n = self.expect[i]
        return (OK if target.fits(result.get_response(), n) else MISMATCH), None


class KServeTarget(Target):
    """A KServe v2 server over gRPC: one model whose BYTES input TEXT [n] gives FP32 EMBEDDING [n, dim]."""

    def __init__(self, endpoint: Endpoint, client: Any, headers: dict[str, str] | None) -> None:
        super().__init__(endpoint)
        self.client = client
        self.headers = headers
        self.model = endpoint.model or ""
        self.dimension = 0

    def fits(self, response: Any, n: int) -> bool:
        """The answer holds EMBEDDING as FP32 [n, dim], its raw bytes exactly that many floats."""
        for index, out in enumerate(response.outputs):
            if out.name == KSERVE_OUTPUT:
                raw = response.raw_output_contents
                size = len(raw[index]) if index < len(raw) else -1
                return (
                    out.datatype == "FP32"
                    and list(out.shape) == [n, self.dimension]
                    and size == 4 * n * self.dimension
                )
        return False

    async def call(self, what: str, method: str, *args: Any) -> Any:
        """One call of the checks; TargetError naming what failed and why."""
        from tritonclient.utils import InferenceServerException

        try:
            call = getattr(self.client, method)
            return await call(*args, headers=self.headers, client_timeout=CHECK_DEADLINE_S)
        except InferenceServerException as exc:
            status = (exc.status() or "").removeprefix("StatusCode.")
            details = exc.message() or ""
            if status == "UNAVAILABLE":
                if "HTTP/2" in details or "http1" in details.lower():
                    raise TargetError(f"{self.name} is not a gRPC server ({details})") from None
                raise TargetError(f"cannot reach {self.name}: {details}") from None
            if status == "DEADLINE_EXCEEDED":
                raise TargetError(
                    f"{self.name} did not answer {what} within {CHECK_DEADLINE_S:g} s"
                ) from None
            if status == "UNIMPLEMENTED":
                raise TargetError(
                    f"{self.name} does not implement inference.GRPCInferenceService/{what}: "
                    "not a KServe v2 server"
                ) from None
            raise TargetError(f"{self.name}: {what} failed ({status or 'error'}: {details})") from None

    async def check(self, spec: WorkloadSpec, notes: list[str]) -> PeerInfo:
        if not await self.call("ServerLive", "is_server_live"):
            raise TargetError(f"{self.name} says it is not live: no load sent")
        if not await self.call("ServerReady", "is_server_ready"):
            raise TargetError(f"{self.name} says it is not ready: no load sent")
        if not self.model:
            self.model = await self._only_model()
        meta = await self.call("ModelMetadata", "get_model_metadata", self.model)
        inputs = {t.name: t.datatype for t in meta.inputs}
        outputs = {t.name: t.datatype for t in meta.outputs}
        if inputs.get(KSERVE_INPUT) != "BYTES" or outputs.get(KSERVE_OUTPUT) != "FP32":
            shown = ", ".join(f"{k} {v}" for k, v in inputs.items())
            got = ", ".join(f"{k} {v}" for k, v in outputs.items())
            raise TargetError(
                f"{self.name}: model {self.model!r} takes ({shown}) and gives ({got}); the harness sends "
                f"{KSERVE_INPUT} BYTES [n] and reads {KSERVE_OUTPUT} FP32 [n, dim]"
            )
        self.dimension = await self._probe()
        server = ""
        with contextlib.suppress(TargetError):  # optional in the protocol: the report only names it
            about = await self.call("ServerMetadata", "get_server_metadata")
            server = f"{about.name} {about.version}".strip()
        return PeerInfo(
            protocol=self.endpoint.protocol,
            model_name=self.model,
            dimension=self.dimension,
            server=server,
            max_texts_per_call=None,
            details={"platform": meta.platform, "versions": ",".join(meta.versions)},
        )

    async def _only_model(self) -> str:
        try:
            index = await self.call("RepositoryIndex", "get_model_repository_index")
        except TargetError as exc:
            raise TargetError(f"{exc}; name the model with --model NAME (or ?model=NAME)") from None
        names = sorted({m.name for m in index.models})
        if len(names) != 1:
            listed = f" ({', '.join(names)})" if names else ""
            raise TargetError(
                f"{self.name} serves {len(names)} models{listed}: name one with --model NAME (or ?model=NAME)"
            )
        return str(names[0])

    async def _probe(self) -> int:
        """One real call of one text: the EMBEDDING width."""
        from tritonclient.grpc import InferInput

        tensor = InferInput(KSERVE_INPUT, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([PROBE_TEXT.encode()], dtype=np.object_))
        result = await self.call("ModelInfer", "infer", self.model, [tensor])
        out = result.get_output(KSERVE_OUTPUT)
        shape = list(out.shape) if out is not None else []
        if len(shape) != 2 or shape[0] != 1 or shape[1] < 1 or out.datatype != "FP32":
            raise TargetError(
                f"{self.name}: one text came back as {KSERVE_OUTPUT} "
                f"{out.datatype if out is not None else 'missing'} {shape}, not FP32 [1, dim]"
            )
        self.dimension = int(shape[1])
        if not self.fits(result.get_response(), 1):
            raise TargetError(f"{self.name}: the probe's {KSERVE_OUTPUT} bytes do not match its shape")
        return self.dimension

    def prepare(self, workload: Workload) -> Calls:
        return KServeCalls(self, embed_texts(workload))


# --- opening ---------------------------------------------------------------------------------------------


def _missing(package: str, protocol: str) -> TargetError:
    return TargetError(
        f"{protocol}:// targets need the {package} package: pip install {package} (the bench extra has it)"
    )


@contextlib.asynccontextmanager
async def open_peer(endpoint: Endpoint, access: Access) -> AsyncIterator[Target]:
    """A connected target of an HTTP or KServe protocol; its sessions and channels closed on exit."""
    token = None
    if access.token_file is not None:
        token = (await asyncio.to_thread(access.token_file.read_text)).strip()
    auth = {"authorization": f"Bearer {token}"} if token else {}
    if endpoint.protocol in ("openai+http", "tei+http"):
        try:
            import aiohttp
        except ImportError:
            raise _missing("aiohttp", endpoint.protocol) from None
        # NOTE: no cap on connections. HTTP/1.1 carries one call per connection at a time, so a cap would
        # queue calls inside the client, where the loops' own in-flight cap is the only one they should meet.
        connector = aiohttp.TCPConnector(limit=0)
        headers = {"content-type": "application/json", **auth}
        async with aiohttp.ClientSession(
            base_url=f"http://{endpoint.address}", connector=connector, headers=headers
        ) as session:
            kind = OpenAITarget if endpoint.protocol == "openai+http" else TeiTarget
            yield kind(endpoint, session)
        return
    if endpoint.protocol != "kserve-v2":
        raise ValueError(f"not a peer protocol: {DESCRIPTIONS[endpoint.protocol]}")
    try:
        from tritonclient.grpc.aio import InferenceServerClient  # type: ignore[import-untyped]
    except ImportError:
        raise _missing("tritonclient", endpoint.protocol) from None

    def path(p: Any) -> str | None:
        return None if p is None else str(p)

    client = InferenceServerClient(
        endpoint.address,
        ssl=access.tls,
        root_certificates=path(access.root_cert),
        private_key=path(access.tls_key),
        certificate_chain=path(access.tls_cert),
    )
    try:
        yield KServeTarget(endpoint, client, auth or None)
    finally:
        await client.close()
