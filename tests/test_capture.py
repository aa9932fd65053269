"""``lora.capture``: a pass stops at the module asked about (nothing after it runs), answers
that module's first input and output, says when the module is never called, and leaves no
hook behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora.capture import NotCalled, first_call, first_outputs, forward_order, run_until


class Counted(nn.Module):
    """Doubles its input and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 2 * x


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), Counted(), nn.Linear(3, 2))


def test_first_call_answers_the_modules_input_and_output_and_stops_there():
    model, x = network(), torch.randn(5, 4)
    expected_in = torch.tanh(model[0](x))
    taken, given = first_call(model, model[2], x, with_output=True)
    assert torch.equal(taken, expected_in) and torch.equal(given, 2 * expected_in)
    taken, given = first_call(model, model[3], x)
    assert torch.equal(taken, 2 * expected_in) and given is None


def test_run_until_never_runs_the_module_or_what_follows():
    model = network()
    run_until(model, torch.randn(5, 4), model[2])
    assert model[2].calls == 0


def test_a_module_the_pass_never_calls_is_said_and_no_hook_stays():
    model, x = network(), torch.randn(5, 4)
    stranger = nn.Linear(4, 4)
    with pytest.raises(NotCalled):
        first_call(model, stranger, x)
    # every hook is gone: whole passes run through, the counted module every time
    first_call(model, model[2], x, with_output=True)
    run_until(model, x, model[2])
    forward_order(model, x, ["0", "2"])
    first_outputs(model, {"2": model[2]}, x)
    calls = model[2].calls
    assert torch.equal(model(x), model[3](2 * torch.tanh(model[0](x))))
    assert model[2].calls == calls + 1


def test_forward_order_and_first_outputs_follow_the_pass():
    model, x = network(), torch.randn(5, 4)
    assert forward_order(model, x, ["3", "0", "2"]) == ["0", "2", "3"]
    outputs = first_outputs(model, {"3": model[3], "1": model[1]}, x)
    assert outputs.keys() == {"3", "1"} and torch.equal(outputs["1"], torch.tanh(model[0](x)))
