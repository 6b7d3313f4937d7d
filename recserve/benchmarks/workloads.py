"""Reproducible workloads: texts with chosen token-length distributions, and the ring of requests sent.

Every request message is built once, before any load, and reused: the load loop then only picks the next
prebuilt message, so the client spends its (shared) CPU on gRPC and not on building protobufs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recserve.benchmarks.results import TokenStats, WorkloadSummary
from recserve.v1 import inference_pb2 as pb

RpcKind = Literal["embed", "score", "history"]
RPC_KINDS: tuple[RpcKind, ...] = ("embed", "score", "history")
# [CLS] and [SEP]: every BERT text carries them.
SPECIAL_TOKENS = 2
MAX_FILE_TEXTS = 1_000_000

# Common English and catalogue words, each one WordPiece token in the uncased BERT vocabulary (checked against
# all-MiniLM-L6-v2's vocab), so a text of n words is n + 2 tokens and the length distributions below hold in
# tokens, not just in words. Other tokenizers may split some of them; the exact counts then come back in the
# Embed responses (token_counts) and replace these estimates.
_WORD_LIST = """
    the a of and to in for with on by from at is new best top free fast easy light dark small large big
    mini classic modern vintage premium basic simple smart wireless digital portable electric outdoor
    indoor kitchen home office garden summer winter spring autumn travel sport running walking hiking
    music movie book game video photo camera phone watch shirt dress jacket coat shoes boots bag hat
    table chair lamp bed desk sofa rug clock mirror window door wall floor red blue green black white
    yellow pink brown gray orange purple gold silver wood metal glass stone paper cotton wool leather
    men women kids baby family friends love life story world history science art design style food
    coffee tea water wine chocolate bread cheese fruit apple lemon rice pasta pizza chicken fish salad
    soup cake cookie sugar salt oil guide review set pack pair kit box case cover stand holder tool
    tools cable speaker screen keyboard mouse computer laptop tablet printer battery power energy solar
    car bike road city country house room space star sun moon night day morning evening week year time
    old young good great long short high low hot cold soft hard warm cool clean how what why when where
    who which cheap near open close buy sell gift party wedding birthday holiday christmas learn make
    build play read write listen cook grow paint draw dance sing run walk drive fly swim this that these
    those your our their my his her its every each other more most many much some any all few will can
    may must should would could just also very really still even only never always often sometimes
"""
WORDS = tuple(_WORD_LIST.split())


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths (special tokens included), log-normal around `median`, clipped to [low, high]."""

    name: str
    median: float
    sigma: float
    low: int
    high: int
    description: str

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.sigma == 0:
            return np.full(n, int(self.median), dtype=np.int64)
        raw = rng.lognormal(math.log(self.median), self.sigma, size=n)
        return np.clip(np.rint(raw), self.low, self.high).astype(np.int64)


# NOTE: "mix" is the serving issue's realistic load: log-normal, mean ~36 tokens, clipped to 4..200. With
# sigma 0.8 the unclipped mean is median * exp(sigma^2 / 2): median 27 gives ~37, ~36 after clipping.
DISTRIBUTIONS: dict[str, LengthDistribution] = {
    d.name: d
    for d in (
        LengthDistribution("query", 7, 0.35, 3, 16, "short search queries, ~7 tokens"),
        LengthDistribution("title", 16, 0.3, 6, 40, "item titles, ~16 tokens"),
        LengthDistribution("description", 110, 0.35, 40, 256, "item descriptions, ~110 tokens"),
        LengthDistribution("mix", 27, 0.8, 4, 200, "realistic mix: log-normal, mean ~36, 4..200 tokens"),
    )
}


class WorkloadError(ValueError):
    """A workload spec or file that cannot be used; the message says why."""


def parse_length_spec(spec: str) -> LengthDistribution | Path:
    """`mix`, `query`, `title`, `description`, `fixed:N`, or `file:PATH`."""
    if spec in DISTRIBUTIONS:
        return DISTRIBUTIONS[spec]
    kind, _, arg = spec.partition(":")
    if kind == "fixed":
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if n < 3:
            raise WorkloadError(f"workload {spec!r}: fixed:N needs N >= 3 tokens (2 are [CLS] and [SEP])")
        return LengthDistribution(f"fixed:{n}", n, 0.0, n, n, f"every text {n} tokens")
    if kind == "file":
        path = Path(arg)
        if not path.is_file():
            raise WorkloadError(f"workload {spec!r}: {arg or '(empty path)'} is not a file")
        return path
    names = ", ".join([*DISTRIBUTIONS, "fixed:N", "file:PATH"])
    raise WorkloadError(f"unknown workload {spec!r}; choose one of {names}")


def synthetic_texts(dist: LengthDistribution, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`n` texts whose token counts follow `dist`; returns (texts, nominal token counts)."""
    rng = np.random.default_rng(seed)
    lengths = dist.sample(rng, n)
    words = np.array(WORDS)
    picks = rng.integers(0, len(words), size=int(lengths.sum()))
    texts = []
    start = 0
    for length in lengths:
        count = max(1, int(length) - SPECIAL_TOKENS)
        texts.append(" ".join(words[picks[start : start + count]]))
        start += count
    return texts, np.maximum(lengths, 1 + SPECIAL_TOKENS)


def read_texts(path: Path, limit: int = MAX_FILE_TEXTS) -> list[str]:
    """Texts from a file: one per line, or JSONL (a JSON string, or an object with a "text" field)."""
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if len(texts) >= limit:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".ndjson") or line.lstrip().startswith(("{", '"')):
                texts.append(_json_text(line, path, lineno))
            else:
                texts.append(line)
    if not texts:
        raise WorkloadError(f"{path} holds no texts")
    return texts


def _json_text(line: str, path: Path, lineno: int) -> str:
    try:
        value: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, str):
        raise WorkloadError(f'{path}:{lineno}: expected a JSON string or an object with a "text" string')
    return value


def estimate_tokens(texts: Sequence[str]) -> np.ndarray:
    # WordPiece splits rarer words: ~1.3 tokens a word is the usual rule of thumb for English.
    return np.array([SPECIAL_TOKENS + math.ceil(1.3 * len(t.split())) for t in texts], dtype=np.int64)


def parse_rpc_mix(spec: str) -> dict[RpcKind, float]:
    """`embed`, or weights such as `embed=0.8,score=0.2` (normalised to sum to 1)."""
    weights: dict[RpcKind, float] = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition("=")
        if name not in RPC_KINDS:
            raise WorkloadError(f"unknown RPC {name!r} in --rpc; choose from {', '.join(RPC_KINDS)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = -1.0
        if not math.isfinite(weight) or weight <= 0:
            raise WorkloadError(f"--rpc {spec!r}: the weight of {name} must be a positive number")
        weights[name] = weights.get(name, 0.0) + weight  # type: ignore[index]
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send; every field is part of the run's settings in the report."""

    lengths: str = "mix"
    seed: int = 0
    # One pool serves the load and the raw baseline, so both see literally the same texts.
    pool_texts: int = 1024
    ring_calls: int = 1024
    texts_per_call: int = 1
    rpc: dict[RpcKind, float] = field(default_factory=lambda: {"embed": 1.0})
    candidates: int = 16
    history: int = 8
    encoding: Literal["f16", "f32", "float"] = "f16"


_ENCODINGS = {
    "f16": pb.VECTOR_ENCODING_PACKED_F16,
    "f32": pb.VECTOR_ENCODING_PACKED_F32,
    "float": pb.VECTOR_ENCODING_FLOAT,
}


@dataclass
class Workload:
    """The text pool and the ring of prebuilt calls, with what each call should get back."""

    spec: WorkloadSpec
    texts: list[str]
    text_tokens: np.ndarray
    tokens_exact: bool
    kinds: list[RpcKind]
    messages: list[pb.EmbedRequest | pb.ScoreRequest]
    texts_per: np.ndarray  # texts the server encodes for each call
    tokens_per: np.ndarray  # their tokens: nominal until an Embed response reports the exact count
    expect: np.ndarray  # vectors (Embed) or scores (Score) each call must return

    def __len__(self) -> int:
        return len(self.messages)

    def describe(self) -> WorkloadSummary:
        toks = self.text_tokens
        return WorkloadSummary(
            lengths=self.spec.lengths,
            description=_describe_lengths(self.spec.lengths),
            seed=self.spec.seed,
            texts=len(self.texts),
            distinct_calls=len(self.messages),
            tokens_per_text=TokenStats(
                mean=round(float(toks.mean()), 2),
                p50=int(np.percentile(toks, 50)),
                p90=int(np.percentile(toks, 90)),
                min=int(toks.min()),
                max=int(toks.max()),
                # NOTE: measured tokens/s use the server's own counts wherever an Embed reply reports them.
                source="generator (BERT uncased WordPiece)" if self.tokens_exact else "estimate (1.3 a word)",
            ),
            texts_per_call=self.spec.texts_per_call,
            rpc={str(k): v for k, v in self.spec.rpc.items()},
            candidates=self.spec.candidates,
            history=self.spec.history,
            encoding=self.spec.encoding,
        )


def _describe_lengths(spec: str) -> str:
    try:
        parsed = parse_length_spec(spec)
    except WorkloadError:
        return spec
    return f"texts from {parsed}" if isinstance(parsed, Path) else parsed.description


def pool_texts(spec: WorkloadSpec) -> tuple[list[str], np.ndarray, bool]:
    """The distinct texts of the workload: (texts, token counts, whether the counts are exact)."""
    parsed = parse_length_spec(spec.lengths)
    if isinstance(parsed, Path):
        texts = read_texts(parsed)
        return texts, estimate_tokens(texts), False
    texts, tokens = synthetic_texts(parsed, spec.pool_texts, spec.seed)
    return texts, tokens, True


def build_workload(spec: WorkloadSpec) -> Workload:
    """Texts and the ring of prebuilt calls, all from `spec.seed`."""
    texts, text_tokens, exact = pool_texts(spec)
    rng = np.random.default_rng(spec.seed + 1)
    names = list(spec.rpc)
    kinds: list[RpcKind] = [
        names[i] for i in rng.choice(len(names), size=spec.ring_calls, p=list(spec.rpc.values()))
    ]
    cursor = 0

    def take(k: int) -> list[int]:
        nonlocal cursor
        idx = [(cursor + j) % len(texts) for j in range(k)]
        cursor += k
        return idx

    messages: list[pb.EmbedRequest | pb.ScoreRequest] = []
    texts_per, tokens_per, expect = [], [], []
    # Recency weights of a user history: the latest item weighs 1, each older one 0.8 times the next.
    history_weights = [0.8**j for j in range(spec.history)]
    for kind in kinds:
        if kind == "embed":
            used = take(spec.texts_per_call)
            messages.append(
                pb.EmbedRequest(texts=[texts[i] for i in used], encoding=_ENCODINGS[spec.encoding])
            )
            expect.append(len(used))
        elif kind == "score":
            query, cands = take(1), take(spec.candidates)
            used = query + cands
            messages.append(pb.ScoreRequest(query_text=texts[query[0]], candidates=[texts[i] for i in cands]))
            expect.append(len(cands))
        else:
            hist, cands = take(spec.history), take(spec.candidates)
            used = hist + cands
            history = pb.UserHistory(texts=[texts[i] for i in hist], weights=history_weights)
            messages.append(pb.ScoreRequest(user_history=history, candidates=[texts[i] for i in cands]))
            expect.append(len(cands))
        texts_per.append(len(used))
        tokens_per.append(int(text_tokens[used].sum()))
    return Workload(
        spec=spec,
        texts=texts,
        text_tokens=text_tokens,
        tokens_exact=exact,
        kinds=kinds,
        messages=messages,
        texts_per=np.array(texts_per, dtype=np.int64),
        tokens_per=np.array(tokens_per, dtype=np.int64),
        expect=np.array(expect, dtype=np.int64),
    )
