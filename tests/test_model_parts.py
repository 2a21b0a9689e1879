"""Model parts without a test elsewhere: the transformer projector."""

import torch

from tipcap.projectors import TransformerProjector


def test_transformer_projector_maps_each_row_to_its_own_k_prefix_vectors():
    torch.manual_seed(0)
    projector = TransformerProjector(clip_dim=32, width=64, prefix_length=4, layers=2, heads=4).eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        prefix = projector(x)
        moved = x.clone()
        moved[1] += 1.0
        again = projector(moved)
    assert prefix.shape == (3, 4, 64)
    assert torch.allclose(again[[0, 2]], prefix[[0, 2]], atol=1e-6)
    assert (again[1] - prefix[1]).abs().max() > 1e-2
    assert (prefix[:, 0] - prefix[:, 1]).abs().max() > 1e-2


def test_transformer_projector_trains_its_queries_and_input_map():
    torch.manual_seed(0)
    projector = TransformerProjector(clip_dim=32, width=64, prefix_length=4, layers=1, heads=4)
    projector(torch.randn(5, 32)).square().sum().backward()
    assert projector.queries.grad.abs().max() > 0 and projector.linear.weight.grad.abs().max() > 0
