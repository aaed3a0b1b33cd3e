"""Training data: a memory-mapped token corpus and the synthetic power-law regression task.

Batches are a pure function of (seed, step, rank, micro step): a run resumed from a checkpoint
sees exactly the batches it would have seen, and workers never draw the same examples.

Token corpus layout (``hyperlaw corpus build``): ``train.bin`` and ``val.bin`` (flat arrays
of token ids, dtype in ``meta.json``) and ``meta.json`` (tokenizer, vocab_size, counts and a
fingerprint: the first 16 hex digits of SHA-256 over the token bytes of both splits).

Synthetic task (Zhang et al. 2024, appendix A.2, "How Does Critical Batch Size Scale in
Pre-training?"): x ~ N(0, H), y | x ~ N(xᵀw*, σ²) with H = diag(λ), λ_i = i^(−a) (capacity)
and λ_i·(w*_i)² = i^(−b) (source), i = 1..dim. The population risk of w is exact:
R(w) = (w − w*)ᵀ H (w − w*) + σ², so evaluation is noiseless and costs O(dim). For b > a the
variance error dominates and the paper's CBS grows with the data size as
B* ≈ D^(1 − a / min(b, 2a + 1)).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

BYTE_VOCAB_SIZE = 256
DOCUMENT_SEPARATOR = b"\n\n"


class CorpusError(ValueError):
    """A corpus that cannot be built or read, with the reason."""


def batch_generator(seed: int, step: int, rank: int, micro_step: int) -> torch.Generator:
    """A torch generator determined by (seed, step, rank, micro_step) only."""
    state = np.random.SeedSequence([seed, step, rank, micro_step]).generate_state(2)
    gen = torch.Generator()
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


# ----------------------------------------------------------------------------- token corpus


def _source_files(sources: list[str]) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():  # hidden folders and bytecode caches are not text
            for p in sorted(path.rglob("*")):
                parts = p.relative_to(path).parts
                if p.is_file() and not any(x.startswith(".") or x == "__pycache__" for x in parts):
                    files.append(p)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"source {source!r} is neither a file nor a directory")
    if not files:
        raise CorpusError("sources contain no files")
    return files


def build_corpus(
    sources: list[str], out: str | Path, *, val_fraction: float = 0.05, tokenizer: str = "byte"
) -> dict:
    """Tokenize local files (byte-level: token id = byte value, vocab 256) into
    ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``; documents are joined by a blank
    line and the last ``val_fraction`` of the tokens is held out. Returns the metadata."""
    if tokenizer != "byte":
        raise CorpusError(f"tokenizer must be 'byte' (got {tokenizer!r})")
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1) (got {val_fraction})")
    files = _source_files(sources)
    raw = DOCUMENT_SEPARATOR.join(p.read_bytes() for p in files)
    tokens = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)
    n_val = int(math.ceil(len(tokens) * val_fraction))
    n_train = len(tokens) - n_val
    if n_train < 2 or n_val < 2:
        raise CorpusError(
            f"sources hold {len(tokens)} tokens: too few for a train/val split with "
            f"val_fraction={val_fraction}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens[:n_train].tofile(out / "train.bin")
    tokens[n_train:].tofile(out / "val.bin")
    meta = {
        "tokenizer": tokenizer,
        "vocab_size": BYTE_VOCAB_SIZE,
        "dtype": "uint16",
        "n_train_tokens": int(n_train),
        "n_val_tokens": int(n_val),
        "fingerprint": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
        "sources": [p.name for p in files],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenCorpus:
    """A built corpus opened read-only through ``np.memmap`` (nothing is loaded eagerly)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise CorpusError(
                f"{directory} has no meta.json; build it with `hyperlaw corpus build`"
            )
        self.meta = json.loads(meta_path.read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        self.fingerprint = str(self.meta["fingerprint"])
        dtype = np.dtype(self.meta["dtype"])
        self._splits = {
            split: np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r")
            for split in ("train", "val")
        }

    def batch(
        self, split: str, n_sequences: int, seq_len: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of the split: inputs and next-token targets, both (n, seq_len)."""
        data = self._splits[split]
        if len(data) <= seq_len:
            raise CorpusError(
                f"{split} split has {len(data)} tokens, needs more than seq_len={seq_len}"
            )
        starts = torch.randint(len(data) - seq_len, (n_sequences,), generator=generator)
        rows = np.stack([np.asarray(data[s : s + seq_len + 1]) for s in starts.tolist()])
        windows = torch.from_numpy(rows.astype(np.int64))  # (n, seq_len + 1)
        return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------- synthetic task


@dataclass(frozen=True)
class SyntheticRegressionConfig:
    """Power-law linear regression; see the module docstring for the formulas."""

    dim: int = 256
    capacity_exponent: float = 1.5  # a: λ_i = i^-a
    source_exponent: float = 2.5  # b: λ_i (w*_i)² = i^-b
    noise_std: float = 0.5  # σ
    task_seed: int = 0  # signs of w*

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0 (got {self.dim})")
        if self.capacity_exponent <= 1.0:
            raise ValueError(f"capacity_exponent must be > 1 (got {self.capacity_exponent})")
        if self.source_exponent <= 1.0:
            raise ValueError(f"source_exponent must be > 1 (got {self.source_exponent})")
        if self.noise_std < 0.0:
            raise ValueError(f"noise_std must be >= 0 (got {self.noise_std})")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return "synthetic-" + hashlib.sha256(blob).hexdigest()[:16]


class SyntheticRegression:
    """Samples of the power-law regression task and its exact population risk."""

    def __init__(self, config: SyntheticRegressionConfig) -> None:
        self.config = config
        i = torch.arange(1, config.dim + 1, dtype=torch.float64)
        self.eigenvalues = i ** (-config.capacity_exponent)  # λ_i
        coins = torch.randint(
            0, 2, (config.dim,), generator=torch.Generator().manual_seed(config.task_seed)
        )
        signs = coins.to(torch.float64) * 2 - 1  # ±1
        # λ_i (w*_i)² = i^-b  ⇒  |w*_i| = i^((a - b) / 2)
        self.w_star = signs * i ** ((config.capacity_exponent - config.source_exponent) / 2)
        self._sqrt_eig = self.eigenvalues.sqrt().to(torch.float32)
        self._w_star32 = self.w_star.to(torch.float32)

    @property
    def fingerprint(self) -> str:
        return self.config.fingerprint

    @property
    def bayes_risk(self) -> float:
        """σ², the smallest achievable loss."""
        return self.config.noise_std**2

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples: x (n, dim) with covariance H, y (n,) = xᵀw* + σ·ε."""
        z = torch.randn(n, self.config.dim, generator=generator)
        x = z * self._sqrt_eig
        noise = torch.randn(n, generator=generator) * self.config.noise_std
        return x, x @ self._w_star32 + noise

    def risk(self, w: torch.Tensor) -> float:
        """Population risk R(w) = Σ_i λ_i (w_i − w*_i)² + σ² (what the loss estimates)."""
        diff = w.detach().to(torch.float64).cpu() - self.w_star
        return float(torch.sum(self.eigenvalues * diff * diff)) + self.bayes_risk
