"""The images, proven by their parts (this machine has no container engine): one ONNX Runtime per install;
the runtime stages' install script, run into a fresh virtual environment from a copy of the build context,
serves a model with the image's environment and holds no torch; the Dockerfile keeps the promises the
image makes (that script, non-root, health check, ports, pinned bases)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from recserve import health
from recserve.manifest import Manifest
from recserve.v1 import inference_pb2 as pb
from recserve.v1 import inference_pb2_grpc as pb_grpc
from tests.support.fake_server import FakeInference, FakeServer, fake_server

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INSTALL_SCRIPT = Path("deploy") / "install-runtime.sh"
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
# What the export stage holds and the runtime must not.
EXPORT_ONLY = {"torch", "transformers", "optimum", "optimum-onnx", "onnx", "sentence-transformers"}


def _names(distributions: list[str]) -> set[str]:
    return {canonicalize_name(name) for name in distributions}


def test_exactly_one_onnx_runtime_is_installed_here() -> None:
    """onnxruntime and onnxruntime-gpu write the same `onnxruntime` module: with both, whichever was installed
    last wins, and the CUDA provider can silently disappear. ONNX Runtime's docs say never to install both."""
    installed = _names([d.metadata["Name"] or "" for d in importlib.metadata.distributions()])
    assert len(installed & RUNTIMES) == 1, (
        f"installed ONNX Runtimes: {sorted(installed & RUNTIMES)}; install recserve with exactly one of the "
        "`cpu` and `gpu` extras (pip uninstall -y onnxruntime onnxruntime-gpu, then reinstall one)"
    )


def _pulled(requirements: list[str], extras: set[str]) -> set[str]:
    """The names pip installs directly for `recserve[extras]`. pip evaluates each marker once with no extra
    (`extra == ''`) and once per requested extra, and takes the requirement when any of them holds: so a base
    requirement marked `extra != 'gpu'` is always taken."""
    pulled = set()
    for line in requirements:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in {"", *extras}):
            pulled.add(canonicalize_name(requirement.name))
    return pulled


def test_pulled_models_pips_reading_of_extra_markers() -> None:
    # The requirements before the `cpu` extra existed: `.[gpu]` took both runtimes.
    old = ["onnxruntime>=1.20; extra != 'gpu'", "onnxruntime-gpu>=1.20; extra == 'gpu'"]
    assert _pulled(old, {"gpu"}) & RUNTIMES == RUNTIMES


# ---- the runtime install, in a fresh virtual environment ---------------------------------------------------


def _copy_build_context(destination: Path) -> None:
    """Copies what .dockerignore lets into the build context (its `!` paths, less its `**/` exclusions)."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()]
    included = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    excluded = [line.removeprefix("**/") for line in lines if line.startswith("**/")]
    assert INSTALL_SCRIPT.as_posix() in included and "recserve" in included
    for path in included:
        source = ROOT / path
        if not source.exists():
            continue  # checkpoints/: only there when someone exports their own
        target = destination / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*excluded))
        else:
            shutil.copy2(source, target)


def _clean_env(**values: str) -> dict[str, str]:
    """This process's environment without what would let the fresh environment see the project's, nor
    the caller's own RECSERVE_* settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith("RECSERVE_")
    }
    return {**env, **values}


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding what the cpu image's /opt/recserve holds, installed by the image's
    own script from a copy of the build context (pip may answer from its cache)."""
    base = tmp_path_factory.mktemp("image")
    source, venv = base / "context", base / "venv"
    _copy_build_context(source)
    # NOTE: from the project's .venv, `-m venv` still builds on the base interpreter, without its packages.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=base)
    install = ["sh", str(source / INSTALL_SCRIPT), "cpu", str(venv / "bin" / "python"), str(source)]
    result = subprocess.run(install, cwd=base, env=_clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def _venv_python(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    # NOTE: cwd is the environment itself, so that '' on sys.path cannot find the repository's recserve.
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], cwd=venv, env=_clean_env(), capture_output=True, text=True
    )


def _venv_distributions(venv: Path) -> set[str]:
    code = "import importlib.metadata as m, json; print(json.dumps([d.name for d in m.distributions()]))"
    result = _venv_python(venv, code)
    assert result.returncode == 0, result.stderr
    return _names(json.loads(result.stdout))


@pytest.mark.image
def test_runtime_install_holds_one_runtime_and_no_export_toolchain(runtime_venv: Path) -> None:
    installed = _venv_distributions(runtime_venv)
    assert installed & RUNTIMES == {"onnxruntime"}
    assert not installed & EXPORT_ONLY
    for module in ("torch", "transformers"):
        result = _venv_python(runtime_venv, f"import {module}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (module, result.stderr)
    where = _venv_python(runtime_venv, "import recserve; print(recserve.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(runtime_venv), "recserve is not the fresh install's"


@pytest.mark.image
def test_built_metadata_gives_each_extra_one_runtime(runtime_venv: Path) -> None:
    """Read from the metadata pip just built from pyproject.toml (the non-editable install above)."""
    [dist_info] = (runtime_venv / "lib").glob("python*/site-packages/recserve-*.dist-info")
    recserve = importlib.metadata.Distribution.at(dist_info)
    requirements, extras = recserve.requires or [], set(recserve.metadata.get_all("Provides-Extra") or [])
    assert {"cpu", "gpu"} <= extras
    assert not _pulled(requirements, set()) & RUNTIMES, "the base dependencies must name no ONNX Runtime"
    assert _pulled(requirements, {"cpu"}) & RUNTIMES == {"onnxruntime"}
    assert _pulled(requirements, {"gpu"}) & RUNTIMES == {"onnxruntime-gpu"}
    for extra in extras - {"cpu", "gpu"}:
        assert _pulled(requirements, {"gpu", extra}) & RUNTIMES == {"onnxruntime-gpu"}, extra


def _stages() -> dict[str, list[tuple[str, str]]]:
    """The Dockerfile's instructions by stage name ("" before the first FROM), continuation lines joined."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8")).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            current = arguments.partition(" AS ")[2]
            stages[current] = []
        stages[current].append((instruction.upper(), arguments.strip()))
    return stages


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for op, args in stage if op == "ENV" for pair in shlex.split(args))


def _snapshot(*trees: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for tree in trees for p in tree.rglob("*")}


def _wait_for(log: Path, event: str, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(encoding="utf-8").split("\n")[:-1]:  # whole lines only
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("event") == event:
                return record
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text(encoding='utf-8')}"
        time.sleep(0.2)
    raise AssertionError(f"no {event!r} within {timeout_s} s:\n{log.read_text(encoding='utf-8')}")


@pytest.mark.image
def test_runtime_install_serves_embed_with_the_image_environment(
    runtime_venv: Path, tiny_repo: Path, tmp_path: Path
) -> None:
    """`recserve serve` from the fresh install, configured by the cpu image's ENV (with the /tmp volume, the
    port and the bind address swapped for this test's), answers health via the image's HEALTHCHECK command,
    then Embed; it writes nothing outside its tmp directory and drains on SIGTERM with exit 0."""
    volume = tmp_path / "tmp"
    volume.mkdir()
    values = {k: v.replace("/tmp", str(volume)) for k, v in _env(_stages()["cpu-runtime"]).items()}
    del values["RECSERVE_MODEL_REPO"]  # given as the flag below
    values.update(
        PATH=f"{runtime_venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        RECSERVE_HOST="127.0.0.1",
        RECSERVE_PORT="0",
        RECSERVE_METRICS_HOST="127.0.0.1",
        RECSERVE_METRICS_PORT="0",
        RECSERVE_INTRA_OP_THREADS="1",
        RECSERVE_TOKENIZER_THREADS="1",
        RECSERVE_GRACE_PERIOD_S="5",
    )
    env = _clean_env(**values)
    before = _snapshot(runtime_venv, tiny_repo)
    log = tmp_path / "serve.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(runtime_venv / "bin" / "recserve"), "serve", "--model-repo", str(tiny_repo)],
            cwd=volume,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        address = str(_wait_for(log, "listening", proc, timeout_s=60)["address"])
        [healthcheck] = [args for op, args in _stages()["cpu-runtime"] if op == "HEALTHCHECK"]
        command = [*json.loads(healthcheck.split(" CMD ", 1)[1]), "--address", address]
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            health = subprocess.run(command, cwd=volume, env=env, capture_output=True, text=True)
            if health.returncode == 0:
                break
            time.sleep(0.5)
        assert health is not None and health.returncode == 0, health and health.stderr
        assert "SERVING" in health.stdout

        texts = ["red running shoes", "trail runners, waterproof", "cast iron pan"]
        with grpc.insecure_channel(address) as channel:
            reply = pb_grpc.InferenceStub(channel).Embed(
                pb.EmbedRequest(texts=texts, encoding=pb.VECTOR_ENCODING_PACKED_F32), timeout=30
            )
        dimension = Manifest.load(tiny_repo).output_dim
        vectors = np.frombuffer(reply.packed, dtype="<f4").reshape(len(texts), reply.dimension)
        assert reply.dimension == dimension and vectors.shape == (3, dimension)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _snapshot(runtime_venv, tiny_repo) == before, "the server wrote outside its tmp directory"


# ---- the HEALTHCHECK command -----------------------------------------------------------------------------


@pytest.mark.parametrize(("serving", "code"), [(True, 0), (False, 1)])
def test_health_exits_0_only_when_serving(
    serving: bool, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_server(serving=serving) as server:
        assert health.main(["--address", server.address]) == code
    assert capsys.readouterr().out.strip().endswith("SERVING")


def test_health_exits_1_without_a_server_or_a_health_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert health.main(["--address", "127.0.0.1:1", "--timeout-s", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    with FakeServer(FakeInference(), health_status=None) as server:
        assert health.main(["--address", server.address]) == 1
    assert "UNIMPLEMENTED" in capsys.readouterr().err


def test_health_checks_the_server_of_its_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("RECSERVE_PORT", "6000")
    assert health.default_address() == "127.0.0.1:6000"
    monkeypatch.setenv("RECSERVE_HOST", "10.1.2.3")
    assert health.default_address() == "10.1.2.3:6000"


# ---- the Dockerfile's promises -----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_runtime_stage_keeps_the_images_promises(flavour: str) -> None:
    stages = _stages()
    stage = stages[f"{flavour}-runtime"]
    text = " ".join(args for _, args in stage)
    assert f"{INSTALL_SCRIPT.as_posix()} {flavour} " in text, "the runtime installs through the tested script"
    assert not re.search(r"\b(torch|transformers)\b", text)
    env = _env(stage)
    assert env["RECSERVE_HOST"] == env["RECSERVE_METRICS_HOST"] == "0.0.0.0"
    assert env["HOME"] == env["TMPDIR"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["RECSERVE_MODEL_REPO"].startswith("/models/")
    ops = dict(stage)  # the last of each instruction
    assert ops["VOLUME"] == '["/tmp"]'
    assert ops["USER"] != "root" and not ops["USER"].startswith("0")
    assert set(ops["EXPOSE"].split()) == {env["RECSERVE_PORT"], env["RECSERVE_METRICS_PORT"]}
    assert ops["HEALTHCHECK"].endswith('CMD ["python", "-m", "recserve.health"]')
    assert json.loads(ops["ENTRYPOINT"]) == ["recserve", "serve"], "exec form: the server gets SIGTERM"
    # The shipped target is the runtime plus the exported model, nothing else.
    assert stages[flavour] == [
        ("FROM", f"{flavour}-runtime AS {flavour}"),
        ("COPY", "--from=export /models /models"),
    ]


def test_base_images_are_pinned_to_exact_versions() -> None:
    args = dict(a.split("=", 1) for op, a in _stages()[""] if op == "ARG" and "=" in a)
    for name in ("PYTHON_IMAGE", "CUDA_IMAGE"):
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+-[\w.-]+(@sha256:[0-9a-f]{64})?", args[name]), args[name]
    bases = {args.split(" AS ")[0] for stage in _stages().values() for op, args in stage if op == "FROM"}
    assert bases <= {"${PYTHON_IMAGE}", "${CUDA_IMAGE}", "cpu-runtime", "gpu-runtime"}, bases
