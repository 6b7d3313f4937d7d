"""The real model behind the server: runtime selection, thread sharing, and numerics end to end over a real
grpc.aio server with an exported tiny BERT. Status codes, lifecycle and metrics: tests/test_service.py."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from recserve.manifest import Manifest
from recserve.server.runtime import (
    CPU,
    CUDA,
    OVERLAP_HOLD_S,
    OnnxBackend,
    RuntimeSelectionError,
    ThreadShare,
    default_concurrent_batches,
    select_runtime,
)
from recserve.tensors import Encoded, FloatArray
from recserve.v1 import inference_pb2 as pb
from tests.support.repository import run_repository
from tests.support.serving import (
    MANY_TEXTS,
    TEXTS,
    assert_each_is_its_own,
    concurrent_single_text_calls,
    embed,
    serving,
)


# --- runtime selection ----------------------------------------------------------------------------------
def test_runtime_prefers_fp16_on_cuda_and_fp32_on_cpu() -> None:
    assert select_runtime([CUDA, CPU], ["fp32", "fp16", "int8"]).precision == "fp16"
    assert select_runtime([CUDA, CPU], ["fp32", "fp16"]).provider == CUDA
    cpu = select_runtime([CPU], ["fp32", "fp16", "int8"])
    assert (cpu.precision, cpu.provider) == ("fp32", CPU)
    assert "no CUDAExecutionProvider" in cpu.reason
    assert select_runtime([CUDA, CPU], ["fp32"]).precision == "fp32"  # fp16 missing: falls back, says so
    assert select_runtime([CUDA, CPU], ["fp32", "fp16"], device="cpu").provider == CPU
    assert select_runtime([CPU], ["fp32", "int8"], precision="int8").precision == "int8"


def test_runtime_refuses_what_cannot_be_met() -> None:
    with pytest.raises(RuntimeSelectionError, match="CUDAExecutionProvider"):
        select_runtime([CPU], ["fp32", "fp16"], device="cuda")
    with pytest.raises(RuntimeSelectionError, match="holds only"):
        select_runtime([CPU], ["fp32"], precision="int8")


def test_concurrent_batches_default_to_two_on_a_multicore_cpu_only() -> None:
    assert default_concurrent_batches(CPU, 2) == 2
    assert default_concurrent_batches(CPU, 16) == 2
    assert default_concurrent_batches(CPU, 1) == 1  # one thread: nothing to share
    assert default_concurrent_batches(CUDA, 16) == 1


def test_thread_share_gives_every_thread_only_to_a_batch_that_starts_into_an_idle_model() -> None:
    now = [0.0]
    share = ThreadShare(hold_s=0.1, clock=lambda: now[0])
    with share.enter() as first:
        with share.enter() as second:  # starts while the first runs
            pass
        with share.enter() as third:  # the first still runs
            pass
    now[0] = 0.05
    with share.enter() as soon:  # nothing runs, but batches overlapped 50 ms ago: load is on
        pass
    now[0] = 0.2
    with share.enter() as later:  # idle for longer than the hold: alone again
        pass
    assert (first, second, third, soon, later) == (True, False, False, False, True)


# --- numerics through the server ----------------------------------------------------------------------
def test_embed_through_the_server_matches_the_runner_in_every_encoding(tiny_repo: Path) -> None:
    """The served vectors are the shared runner's (tokenise, pad, run, pool, normalise) in each encoding."""
    expected = run_repository(tiny_repo, TEXTS)
    with serving(tiny_repo, metrics_port=None) as server:
        stub = server.stub()
        info = stub.Info(pb.InfoRequest())
        floats = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_FLOAT))
        f32 = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_PACKED_F32))
        f16 = stub.Embed(pb.EmbedRequest(texts=TEXTS, encoding=pb.VECTOR_ENCODING_PACKED_F16))
    assert (info.precision, info.provider) == ("fp32", CPU)
    assert info.weights_sha256 == Manifest.load(tiny_repo).source.weights_sha256
    assert info.dimension == expected.shape[1]
    as_floats = np.array([list(v.values) for v in floats.vectors], dtype=np.float32)
    as_f32 = np.frombuffer(f32.packed, dtype="<f4").reshape(expected.shape)
    as_f16 = np.frombuffer(f16.packed, dtype="<f2").reshape(expected.shape).astype(np.float32)
    # Batched with other lengths (so padded differently) than the runner's batch: float noise only.
    np.testing.assert_allclose(as_floats, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(as_f32, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(as_f16, expected, rtol=0, atol=2e-3)


def test_concurrent_batches_share_the_threads_and_answer_the_same(tiny_repo: Path) -> None:
    """Two threads: a batch alone runs on both, batches that overlap on one each; the vectors agree."""
    with serving(tiny_repo, intra_op_threads=2, metrics_port=None) as shared:
        assert shared.server is not None
        backend = shared.server.model.backend
        assert isinstance(backend, OnnxBackend)
        assert (backend.concurrent_batches, backend.threads) == (2, (2, 1))
        assert backend.shared is not backend.alone
        # Pool threads must not spin on after a batch, holding the cores that answer its calls.
        for runner in (backend.alone, backend.shared):
            options = runner.session.get_session_options()
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        # Spies installed after warm-up (which runs both sessions), so they see only the calls' batches.
        used: list[str] = []

        def spy(name: str, run: Callable[[Sequence[Encoded]], FloatArray]) -> Callable[..., FloatArray]:
            def counted(batch: Sequence[Encoded]) -> FloatArray:
                used.append(name)
                return run(batch)

            return counted

        backend.alone.run = spy("alone", backend.alone.run)  # type: ignore[method-assign]
        backend.shared.run = spy("shared", backend.shared.run)  # type: ignore[method-assign]
        got = concurrent_single_text_calls(shared.address, MANY_TEXTS)
        time.sleep(2 * OVERLAP_HOLD_S)  # batches overlapped: the next lone one waits out the hold
        lone = embed(shared.stub(), MANY_TEXTS[:1])
    assert {"alone", "shared"} <= set(used)
    assert used[-1] == "alone"  # the lone call, with nothing else running
    expected = run_repository(tiny_repo, MANY_TEXTS)
    assert_each_is_its_own(got, expected, atol=1e-4)
    np.testing.assert_allclose(lone[0], expected[0], rtol=0, atol=1e-5)


def test_cross_encoder_scores_match_pytorch(tiny_cross_repo: Path, tiny_cross_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    query, candidates = (
        "red running shoes",
        ["nike pegasus road shoe", "cast iron pan", "", "trail runner " * 80],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_cross_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_checkpoint).eval()
    with serving(tiny_cross_repo, metrics_port=None) as s:
        stub = s.stub()
        info = stub.Info(pb.InfoRequest())
        batch = tokenizer(
            [query] * len(candidates),
            candidates,
            padding=True,
            truncation=True,
            max_length=info.max_tokens,
            return_tensors="pt",
        )
        with torch.no_grad():
            expected = model(**batch).logits[:, -1].numpy()
        reply = stub.Score(pb.ScoreRequest(query_text=query, candidates=candidates))
        assert info.task == "cross-encoder"
        np.testing.assert_allclose(reply.scores, expected, atol=1e-4)
        assert list(reply.truncated) == [3]


def test_generated_protobuf_modules_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recserve.protos", "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_serving_never_imports_torch() -> None:
    code = (
        "import sys, recserve.cli, recserve.server.app; recserve.cli.build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model-repo", "/no/such/repo"], "does not exist"),
        (["--max-batch-size", "512"], "window_texts (64) must be at least max_batch_size (512)"),
        (["--port", "70000"], "--port"),
    ],
)
def test_serve_refuses_bad_settings_with_one_line(
    tiny_repo: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from recserve.cli import main

    assert main(["serve", "--model-repo", str(tiny_repo), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_without_an_onnx_runtime_says_which_extra_to_install(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The base install carries no runtime (the cpu and gpu extras exclude each other)."""
    from recserve.cli import main

    for name in ("recserve.server.runtime", "recserve.runner"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    assert main(["serve", "--model-repo", str(tiny_repo), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "recserve serve: onnxruntime is not installed: pip install 'recserve[cpu]' (or 'recserve[gpu]')"
    )
