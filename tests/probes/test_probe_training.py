import torch

from seqbench.config import ModelSpec
from seqbench.models import build_model
from seqbench.probes.mqar import mqar_batch
from seqbench.probes.train import accuracy, train


def test_a_tiny_set_is_learned_to_100_percent():
    """16 fixed sequences, trained on repeatedly: the loop must drive their query accuracy to 1.0."""
    tokens, labels = mqar_batch(16, 16, 2, 32, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="a", kind="attention", d_model=32, n_layers=2, n_heads=2, vocab_size=32))
    before = accuracy(model, tokens, labels)
    result = train(model, lambda n: (tokens, labels), steps=60, batch=16, lr=1e-2, weight_decay=0.0)
    assert before < 0.5
    assert accuracy(model, tokens, labels) == 1.0
    assert result.steps == 60 and result.final_loss < 0.1
