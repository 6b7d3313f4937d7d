"""A served model repository is verified before it serves: weights against the manifest's sha256, every path
inside the repository, every number in range, unloadable files as one line; and the logs stay JSON."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from recserve.manifest import MANIFEST_FILE, Manifest, ManifestError, file_sha256, verify_variant
from recserve.server.logs import configure_logging
from recserve.v1 import inference_pb2 as pb
from tests.support.serving import serving, settings_for

FLIP_EVERY = 256 * 1024
PROBLEM = "recserve serve: "
PORTS = ("--port", "0", "--metrics-port", "0")


# --- helpers --------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging (called by `recserve serve` in-process too) changes process-wide state: undo it."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, warnings.showwarning, sys.excepthook, threading.excepthook)
    saved_unraisable = sys.unraisablehook
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    warnings.showwarning, sys.excepthook, threading.excepthook = saved[2], saved[3], saved[4]
    sys.unraisablehook = saved_unraisable


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny exported repository, to corrupt."""
    return Path(shutil.copytree(tiny_repo, tmp_path / "repo"))


def edit_manifest(repo: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = repo / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def replace_variant_file(repo: Path, content: bytes) -> Path:
    """Writes `content` as the fp32 file and records its true size and sha256, so verification passes."""
    path = repo / Manifest.load(repo).variants["fp32"].file
    path.write_bytes(content)

    def record(data: dict[str, Any]) -> None:
        data["variants"]["fp32"].update(size_bytes=len(content), sha256=file_sha256(path))

    edit_manifest(repo, record)
    return path


def flip_weight_bytes(model_file: Path) -> int:
    """Flips 4 bytes every 256 KB inside the largest initializer's raw data, so the file still parses."""
    import onnx

    model = onnx.load(str(model_file))
    largest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = bytearray(model_file.read_bytes())
    start = bytes(data).find(largest.raw_data)
    assert start >= 0 and len(largest.raw_data) > 8
    offsets = range(start + 4, start + len(largest.raw_data) - 4, FLIP_EVERY)
    for offset in offsets:
        data[offset : offset + 4] = bytes(b ^ 0xFF for b in data[offset : offset + 4])
    model_file.write_bytes(bytes(data))
    return len(offsets)


def _must_not_start(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the server started on a repository it should have refused")


def serve_in_process(
    repo: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *flags: str
) -> tuple[int, list[str]]:
    """`recserve serve` in this process; (exit code, stderr lines that are not JSON log lines).

    Every other stderr line must be a JSON log line. If the repository is wrongly accepted, the test fails
    instead of serving forever.
    """
    from recserve.cli import main
    from recserve.server import app

    monkeypatch.setattr(app, "running_server", _must_not_start)
    code = main(["serve", "--model-repo", str(repo), *PORTS, *flags])
    return code, plain_lines(capfd.readouterr().err)


def plain_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that are not JSON objects; asserts there is no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    plain = []
    for line in stderr.splitlines():
        try:
            assert isinstance(json.loads(line), dict)
        except ValueError:
            plain.append(line)
    return plain


# --- weights against the manifest's sha256 --------------------------------------------------------------
def test_flipped_weight_bytes_are_refused_by_the_cli_in_one_line(repo: Path) -> None:
    model_file = repo / "model.fp32.onnx"
    assert flip_weight_bytes(model_file) >= 1
    manifest = Manifest.load(repo)
    result = subprocess.run(
        [sys.executable, "-m", "recserve.cli", "serve", "--model-repo", str(repo), *PORTS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    # The whole of stderr, native libraries included: one line naming the file and both hash prefixes.
    assert result.stderr.splitlines() == [
        f"{PROBLEM}model file {model_file} does not match the manifest: sha256 "
        f"{file_sha256(model_file)[:12]}..., expected {manifest.variants['fp32'].sha256[:12]}...; the file "
        "is corrupt or was replaced: re-export the repository"
    ]


def test_skip_verify_loads_the_same_corrupted_file(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The refusal above came from the check, not from ONNX Runtime: unchecked, the corrupt file loads."""
    from recserve.server.runtime import load_model

    flip_weight_bytes(repo / "model.fp32.onnx")
    with caplog.at_level(logging.WARNING, logger="recserve.server.runtime"):
        model = load_model(settings_for(repo, skip_verify=True))
    assert model.backend.verified_sha256 is None
    assert any("not verified" in r.getMessage() for r in caplog.records)
    with pytest.raises(ManifestError, match="does not match the manifest"):
        load_model(settings_for(repo))


def test_a_file_of_the_wrong_size_is_refused_before_hashing(repo: Path) -> None:
    variant = Manifest.load(repo).variants["fp32"]
    with (repo / variant.file).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=f"has {variant.size_bytes + 1} bytes but the manifest says"):
        verify_variant(repo, variant)


def test_a_missing_model_file_is_one_line(
    repo: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (repo / "model.fp32.onnx").unlink()
    code, lines = serve_in_process(repo, capfd, monkeypatch)
    assert code == 2
    assert lines == [
        f"{PROBLEM}model file {repo / 'model.fp32.onnx'} cannot be read: No such file or directory"
    ]


# --- paths stay inside the repository -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("file", "../../../../etc/passwd"),
        ("file", "/etc/passwd"),
        ("file", "sub/../../model.fp32.onnx"),
        ("file", "..\\model.fp32.onnx"),
        ("file", ""),
        ("tokenizer_file", "../tokenizer.json"),
        ("tokenizer_file", "/etc/passwd"),
    ],
)
def test_a_path_leaving_the_repository_is_refused(
    repo: Path, field: str, value: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def change(data: dict[str, Any]) -> None:
        (data["variants"]["fp32"] if field == "file" else data)[field] = value

    edit_manifest(repo, change)
    code, lines = serve_in_process(repo, capfd, monkeypatch)
    where = "variants.fp32.file" if field == "file" else field
    assert code == 2
    assert lines == [
        f"{PROBLEM}{repo / MANIFEST_FILE} is not a valid manifest: {where}: must be a relative path inside "
        f"the repository (no leading /, no .., no backslash) (got {value!r})"
    ]


def test_a_symlink_out_of_the_repository_is_refused(
    repo: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(repo / "model.fp32.onnx", outside / "model.onnx")
    (repo / "linked.onnx").symlink_to(outside / "model.onnx")
    (repo / "linked_dir").symlink_to(outside, target_is_directory=True)
    for name in ("linked.onnx", "linked_dir/model.onnx"):

        def change(data: dict[str, Any], name: str = name) -> None:
            data["variants"]["fp32"]["file"] = name

        edit_manifest(repo, change)
        code, lines = serve_in_process(repo, capfd, monkeypatch)
        assert code == 2
        assert lines == [
            f"{PROBLEM}{repo / MANIFEST_FILE}: variants.fp32.file {name!r} resolves to "
            f"{(outside / 'model.onnx').resolve()}, outside the repository {repo.resolve()}; every file must "
            "lie inside the repository"
        ]


def test_a_symlink_inside_the_repository_is_fine(repo: Path) -> None:
    (repo / "current.onnx").symlink_to("model.fp32.onnx")
    edit_manifest(repo, lambda data: data["variants"]["fp32"].update(file="current.onnx"))
    assert Manifest.load(repo).variants["fp32"].file == "current.onnx"


# --- numbers in range -----------------------------------------------------------------------------------
def test_a_negative_output_dim_is_refused_by_the_cli_in_one_line(
    repo: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    edit_manifest(repo, lambda data: data.update(output_dim=-5))
    code, lines = serve_in_process(repo, capfd, monkeypatch)
    assert code == 2
    assert lines == [
        f"{PROBLEM}{repo / MANIFEST_FILE} is not a valid manifest: output_dim: Input should be greater than "
        "or equal to 1 (got -5)"
    ]


def _set(*path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("hidden_size", value=0), "hidden_size: Input should be greater than or equal to 1 (got 0)"),
        (_set("max_length", value=1), "max_length: Input should be greater than or equal to 2 (got 1)"),
        (_set("pad_token_id", value=-1), "pad_token_id: Input should be greater than or equal to 0 (got -1)"),
        (_set("output_dim", value=2.5), "output_dim: Input should be a valid integer"),
        (
            _set("variants", "fp32", "size_bytes", value=-1),
            "variants.fp32.size_bytes: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            _set("variants", "fp32", "sha256", value="ABC"),
            "variants.fp32.sha256: must be a sha256: 64 lowercase hex digits (got 'ABC')",
        ),
        (
            _set("source", "weights_sha256", value="F" * 64),
            "source.weights_sha256: must be a sha256: 64 lowercase hex digits",
        ),
        (_set("inputs", value=[]), "inputs: List should have at least 1 item after validation, not 0"),
        (_set("inputs", value=["input_ids", "attention_mask", "pixel_values"]), "each must be one of"),
        (_set("inputs", value=["input_ids"]), "input_ids and attention_mask are required"),
        (_set("output_name", value="pooler_output"), "must be 'last_hidden_state' for task embedding"),
        (_set("variants", "fp32", "precision", value="int8"), "variants.fp32.precision is 'int8'"),
        (_set("variants", "fp32", "parity", "threshold", value=float("inf")), "parity.threshold"),
        (
            _set("variants", "fp32", "parity", "min_cosine", value=float("nan")),
            "variants.fp32.parity.min_cosine: must be a finite number (got nan)",
        ),
        (_set("variants", "fp32", "parity", "texts", value=0), "variants.fp32.parity.texts"),
        (_set("export", "duration_s", value=-1.0), "export.duration_s"),
        (_set("variants", "fp32", "fused_ops", "Attention", value=-2), "variants.fp32.fused_ops.Attention"),
    ],
)
def test_every_number_and_name_is_checked(
    repo: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_manifest(repo, change)
    with pytest.raises(ManifestError) as caught:
        Manifest.load(repo)
    text = str(caught.value)
    assert message in text and "\n" not in text, text


def test_the_exported_manifest_passes_every_check(tiny_repo: Path) -> None:
    manifest = Manifest.load(tiny_repo)
    for variant in manifest.variants.values():
        assert verify_variant(tiny_repo, variant) == variant.sha256


# --- files that cannot be loaded ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_an_unloadable_model_file_is_one_line_naming_it(
    repo: Path, kind: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = (repo / "model.fp32.onnx").read_bytes()
    content = b"\x00garbage, not a protobuf\xff" * 64 if kind == "garbage" else original[: len(original) // 2]
    path = replace_variant_file(repo, content)
    code, lines = serve_in_process(repo, capfd, monkeypatch)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PROBLEM}model file {path} cannot be loaded: "), lines


def test_an_unloadable_tokenizer_file_is_one_line_naming_it(
    repo: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = repo / "tokenizer.json"
    path.write_text('{"version": "1.0", "model": ')
    code, lines = serve_in_process(repo, capfd, monkeypatch)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PROBLEM}tokenizer file {path} cannot be loaded: "), lines


# --- Info reports what was verified ---------------------------------------------------------------------
def test_info_reports_the_verified_hash(tiny_repo: Path) -> None:
    manifest = Manifest.load(tiny_repo)
    with serving(tiny_repo, metrics_port=None, warmup=False) as server:
        info = server.stub().Info(pb.InfoRequest())
    assert info.verified
    assert info.variant_sha256 == file_sha256(tiny_repo / manifest.variants["fp32"].file)
    assert info.variant_sha256 == manifest.variants["fp32"].sha256
    assert info.weights_sha256 == manifest.source.weights_sha256  # the checkpoint's, unchanged


def test_info_says_unverified_when_skipped(tiny_repo: Path) -> None:
    with serving(tiny_repo, metrics_port=None, warmup=False, skip_verify=True) as server:
        info = server.stub().Info(pb.InfoRequest())
    assert (info.verified, info.variant_sha256) == (False, "")


# --- logs stay JSON -------------------------------------------------------------------------------------
def json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = stderr.splitlines()
    return [json.loads(line) for line in lines]


def test_a_library_warning_is_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(
            "this argument is deprecated\nand the warning spans lines", DeprecationWarning, stacklevel=1
        )
    [line] = json_lines(capsys.readouterr().err)
    assert line["level"] == "warning" and line["logger"] == "py.warnings"
    assert line["event"] == "this argument is deprecated\nand the warning spans lines"
    assert line["category"] == "DeprecationWarning" and "test_repository.py" in line["source"]


def test_stray_exceptions_are_one_json_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")

    def fail() -> None:
        raise RuntimeError("worker broke")

    thread = threading.Thread(target=fail, name="worker-1")
    thread.start()
    thread.join()
    try:
        raise ValueError("main broke")
    except ValueError:
        sys.excepthook(*sys.exc_info())
    in_thread, in_main = json_lines(capsys.readouterr().err)
    assert [in_thread[k] for k in ("exc_type", "exc_message", "in_thread")] == [
        "RuntimeError",
        "worker broke",
        "worker-1",
    ]
    assert [in_main[k] for k in ("level", "exc_type", "exc_message")] == [
        "critical",
        "ValueError",
        "main broke",
    ]
    assert "Traceback" in in_main["exc"]  # the traceback travels inside the one line


def test_text_logs_keep_a_traceback_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "info")
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("recserve.test").exception("failed")
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("ts=") and "exc_type=KeyError" in line and "Traceback" in line
