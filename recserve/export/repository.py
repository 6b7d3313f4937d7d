"""Writing the model repository: atomically, and with the tokenizer configured for serving.

Everything is written into a hidden temporary directory next to the target and renamed into place at the
end, so a failed or interrupted export never leaves a half-written repository where the server looks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from recserve.export.errors import ExportError
from recserve.manifest import MANIFEST_FILE, TOKENIZER_FILE


def check_target(target: Path, force: bool) -> None:
    """Refuses an existing output unless --force, and never replaces something that is not a repository."""
    if not target.exists() and not target.is_symlink():
        if target.parent.exists() and not target.parent.is_dir():
            raise ExportError(f"cannot create {target}: {target.parent} is not a directory")
        return
    if not force:
        raise ExportError(f"output directory {target} already exists (pass --force to replace it)")
    if not target.is_dir() or target.is_symlink():
        raise ExportError(f"refusing to replace {target}: it is not a directory")
    # NOTE: --force must not turn a typo (`--out ~`) into deleting a home directory.
    if any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise ExportError(f"refusing to replace {target}: it is not empty and holds no {MANIFEST_FILE}")


class Staging:
    """A temporary directory next to `target`; `commit` renames it into place, leaving it removes it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        # mkdtemp makes the directory private (0700); a repository gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)
        self._committed = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        old: Path | None = None
        if self.target.exists():  # --force, checked by check_target
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            old.rmdir()
            self.target.rename(old)
        self.path.rename(self.target)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_tokenizer(model_dir: Path, out: Path, max_length: int) -> int:
    """Writes the tokenizer files into `out`, tokenizer.json truncating at max_length and not padding.

    Returns the pad token id.

    NOTE: checkpoints often ship a tokenizer.json with truncation and fixed padding baked in (the default
    model's pads every text to 128 tokens and cuts it there); the server pads per batch instead.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            str(model_dir), use_fast=True, local_files_only=True
        )
    except Exception as exc:  # a checkpoint without a usable tokenizer is bad input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot load the tokenizer of {model_dir}: {first}") from None
    if not tokenizer.is_fast:
        raise ExportError(
            f"{model_dir} has no fast (Rust) tokenizer, which the server needs: "
            f"{type(tokenizer).__name__} has no fast version and no tokenizer.json is there"
        )
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out))
    path = out / TOKENIZER_FILE
    fast = Tokenizer.from_file(str(path))
    # longest_first is what transformers applies to (query, item) pairs with truncation=True.
    fast.enable_truncation(max_length=max_length, strategy="longest_first")
    fast.no_padding()
    fast.save(str(path))
    pad_id = tokenizer.pad_token_id
    return int(pad_id) if pad_id is not None else 0
