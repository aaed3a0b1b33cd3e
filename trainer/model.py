"""Models trained by hyperlaw: a small GPT (optionally µP) and the linear model of the
synthetic power-law regression task.

The file knows nothing about training: configuration dataclasses and modules, no I/O and no
distributed code. Every model's ``forward`` returns ``(prediction, loss)``; ``n_params`` is
the non-embedding parameter count N used throughout hyperlaw.

µP (Yang et al. 2022, "Tensor Programs V"), width multiplier m = d_model / mup_base_d_model:
  * hidden matrices are initialised with std = init_std / √m (embeddings keep init_std);
  * attention logits are scaled by 1/d_head instead of 1/√d_head (times √d_head_base so the
    base width is unchanged);
  * the tied readout is divided by m: logits = (h · W_eᵀ) / m;
  * Adam learning rates: η / m for hidden matrices, η for embeddings, norms and biases
    (see ``optimizer_groups``).
With m = 1 a µP model is exactly the standard one, so hyper-parameters tuned at the base width
transfer to wider models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT. ``vocab_size`` 256 is the byte-level tokenizer."""

    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    seq_len: int = 64  # block size: longest sequence the position table covers
    vocab_size: int = 256
    dropout: float = 0.0
    init_std: float = 0.02
    mup: bool = False
    mup_base_d_model: int = 64

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "mup_base_d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model must be divisible by n_head (got d_model={self.d_model}, "
                f"n_head={self.n_head})"
            )
        if self.mup and self.mup_base_d_model % self.n_head:
            raise ValueError(
                f"mup_base_d_model must be divisible by n_head (got {self.mup_base_d_model}, "
                f"n_head={self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout})")

    @property
    def width_mult(self) -> float:
        """µP width multiplier m = d_model / mup_base_d_model (1 without µP)."""
        return self.d_model / self.mup_base_d_model if self.mup else 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def gpt_non_embedding_params(n_layer: int, d_model: int) -> int:
    """N of this GPT: per block 12·d² (attention 4·d², MLP 8·d²) + 2·d (two LayerNorm gains),
    plus d for the final LayerNorm. Token and position embeddings are excluded (the readout
    is tied to the token embedding), following Kaplan et al. 2020."""
    return n_layer * (12 * d_model * d_model + 2 * d_model) + d_model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.d_head = config.d_model // config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout
        if config.mup:
            base_d_head = config.mup_base_d_model // config.n_head
            self.scale = math.sqrt(base_d_head) / self.d_head  # 1/d_head, equal to 1/√d at base
        else:
            self.scale = 1.0 / math.sqrt(self.d_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (batch, time, d_model)
        q, k, v = self.c_attn(x).split(d, dim=2)
        q = q.view(b, t, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(b, t, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.d_head).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, dropout_p=dropout
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(b, t, d)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=False)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=False)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer with tied input/output embeddings."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.config
        hidden_std = cfg.init_std / math.sqrt(cfg.width_mult)
        # residual projections get the GPT-2 depth scaling 1/√(2·n_layer)
        proj_std = hidden_std / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # LayerNorm gains stay at 1
            if name.startswith(("wte", "wpe")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=proj_std)
            else:
                nn.init.normal_(p, mean=0.0, std=hidden_std)

    @property
    def n_params(self) -> int:
        """Non-embedding parameter count N (counted from the parameters themselves)."""
        embedding = self.wte.weight.numel() + self.wpe.weight.numel()
        return sum(p.numel() for p in self.parameters()) - embedding

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab) and the mean
        next-token cross-entropy in nats (None without targets)."""
        b, t = idx.shape
        if t > self.config.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len={self.config.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight) / self.config.width_mult  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def optimizer_groups(self, learning_rate: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups. Matrices inside the blocks decay; embeddings and gains do
        not. With µP the hidden matrices' learning rate is η / m (m = width multiplier)."""
        hidden, other_decay, no_decay = [], [], []
        for name, p in self.named_parameters():
            if p.dim() < 2:
                no_decay.append(p)
            elif name.startswith("blocks."):
                hidden.append(p)
            else:
                other_decay.append(p)
        m = self.config.width_mult
        return [
            {"params": hidden, "lr": learning_rate / m, "weight_decay": weight_decay},
            {"params": other_decay, "lr": learning_rate, "weight_decay": 0.0},
            {"params": no_decay, "lr": learning_rate, "weight_decay": 0.0},
        ]


@dataclass(frozen=True)
class LinearRegressionConfig:
    """The model of the synthetic task: ŷ = xᵀw with w ∈ ℝ^dim, initialised at w₀ = 0."""

    dim: int = 256

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be > 0 (got {self.dim})")

    def as_dict(self) -> dict:
        return asdict(self)


class LinearRegression(nn.Module):
    """Least squares: loss = mean over the batch of (xᵀw − y)²; N = dim."""

    def __init__(self, config: LinearRegressionConfig) -> None:
        super().__init__()
        self.config = config
        self.w = nn.Parameter(torch.zeros(config.dim))

    @property
    def n_params(self) -> int:
        return self.w.numel()

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, dim) covariates, y: (B,) responses."""
        pred = x @ self.w
        loss = None if y is None else torch.mean((pred - y) ** 2)
        return pred, loss

    def optimizer_groups(self, learning_rate: float, weight_decay: float) -> list[dict]:
        return [{"params": [self.w], "lr": learning_rate, "weight_decay": weight_decay}]
