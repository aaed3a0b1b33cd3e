"""The models: exact non-embedding parameter counts, shapes, µP."""

import pytest
import torch

from trainer.model import (
    GPT,
    GPTConfig,
    LinearRegression,
    LinearRegressionConfig,
    gpt_non_embedding_params,
)


@pytest.mark.parametrize("n_layer,n_head,d_model", [(1, 1, 8), (2, 2, 64), (4, 4, 96)])
def test_gpt_counts_non_embedding_params_exactly(n_layer, n_head, d_model):
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, d_model=d_model, seq_len=16))
    # 12 d^2 + 2 d per block, + d for the final LayerNorm; embeddings excluded
    expected = n_layer * (12 * d_model**2 + 2 * d_model) + d_model
    assert model.n_params == expected == gpt_non_embedding_params(n_layer, d_model)
    total = sum(p.numel() for p in model.parameters())
    assert total - model.n_params == (256 + 16) * d_model  # token + position tables


def test_gpt_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, seq_len=16))
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx, torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    # an untrained model predicts nearly uniformly: loss close to ln(256)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.2
    with pytest.raises(ValueError, match="seq_len=16"):
        model(torch.randint(0, 256, (1, 17)))


def test_mup_at_base_width_matches_standard_and_scales_hidden_lr():
    base = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, mup=True, mup_base_d_model=32))
    assert base.config.width_mult == 1.0
    wide = GPT(GPTConfig(n_layer=1, n_head=2, d_model=128, mup=True, mup_base_d_model=32))
    assert wide.config.width_mult == 4.0
    groups = wide.optimizer_groups(learning_rate=0.01, weight_decay=0.1)
    hidden = groups[0]
    assert hidden["lr"] == pytest.approx(0.01 / 4) and hidden["weight_decay"] == 0.1
    assert all(g["lr"] == 0.01 for g in groups[1:])
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in wide.parameters())
    # hidden init std shrinks as 1/sqrt(m)
    std_base = base.blocks[0].mlp.c_fc.weight.std().item()
    std_wide = wide.blocks[0].mlp.c_fc.weight.std().item()
    assert std_wide == pytest.approx(std_base / 2, rel=0.15)


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="d_model must be divisible by n_head"):
        GPTConfig(n_head=3, d_model=64)
    with pytest.raises(ValueError, match="n_layer must be > 0"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dim must be > 0"):
        LinearRegressionConfig(dim=0)


def test_linear_regression_params_and_loss():
    model = LinearRegression(LinearRegressionConfig(dim=5))
    assert model.n_params == 5
    x = torch.ones(4, 5)
    _, loss = model(x, torch.full((4,), 2.0))
    assert loss.item() == pytest.approx(4.0)  # w0 = 0: mean (0 - 2)^2
