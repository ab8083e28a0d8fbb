"""Term slots (streamtap.tapping.sinks): where each module's output goes, and a clear error when a
module runs twice or never in one forward."""

import pytest
import torch

from streamtap.errors import StreamtapError
from streamtap.tapping.sinks import Route, TermSlots


def _slots(routes, mask):
    return TermSlots(routes, mask, lambda name, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))


def test_a_module_that_runs_twice_in_one_forward_is_an_error_not_an_overwrite():
    mask = torch.ones(1, 3, dtype=torch.bool)
    where = ("model.block", "output")
    slots = _slots({where: [Route("mlp_out", 0, 1)]}, mask)
    slots.put(where, torch.ones(1, 3, 4))
    with pytest.raises(StreamtapError, match="ran twice in one forward"):
        slots.put(where, torch.ones(1, 3, 4))


def test_a_module_the_forward_never_reached_is_named():
    mask = torch.tensor([[True, True, False]])
    routes = {("model.a", "output"): [Route("mlp_out", 0, 2)], ("model.b", "output"): [Route("mlp_out", 1, 2)]}
    slots = _slots(routes, mask)
    slots.put(("model.a", "output"), (torch.arange(6.0).reshape(1, 3, 2), None))
    with pytest.raises(StreamtapError, match=r"never reached \[\('model.b', 'output'\)\]"):
        slots.terms()
    slots.put(("model.b", "output"), torch.zeros(1, 3, 2))
    terms = slots.terms()["mlp_out"]
    assert terms.shape == (2, 2, 2)  # real tokens only: the padded third position is left out
    assert torch.equal(terms[:, 0], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))


def test_a_module_input_routes_its_first_argument_split_into_heads():
    mask = torch.ones(2, 2, dtype=torch.bool)
    slots = _slots({("model.o", "inputs"): [Route("z", 0, 1, tail=(2, 3))]}, mask)
    x = torch.arange(24.0).reshape(2, 2, 6)
    slots.put(("model.o", "inputs"), ((x,), {}))
    z = slots.terms()["z"]
    assert z.shape == (4, 1, 2, 3) and torch.equal(z[:, 0].reshape(4, 6), x.reshape(4, 6))
