"""mmdgen.files: JSON lines with errors naming the file and line, safetensors weights saved atomically and loaded
with every name and shape checked, errors naming the file and the tensor."""

import re

import pytest
import torch
from torch import nn

from mmdgen.files import load_weights, read_jsonl, read_jsonl_numbered, read_weights, save_weights


def test_json_lines_keep_their_physical_line_numbers(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2, "b": [1, 2]}\n{"a": 3}')  # blank lines, no final newline
    assert read_jsonl_numbered(path) == [(1, {"a": 1}), (4, {"a": 2, "b": [1, 2]}), (5, {"a": 3})]
    assert read_jsonl(path, required=("a",)) == [{"a": 1}, {"a": 2, "b": [1, 2]}, {"a": 3}]


def test_bad_json_lines_name_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    with pytest.raises(ValueError, match=r"bad.jsonl: no such file"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"text": "x", "id": 1}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=re.escape('bad.jsonl:2: expected a JSON object with a "text" and a "id", '
                                                   "got keys ['id']")):
        read_jsonl(path, required=("text", "id"))


class _Odd(nn.Module):
    """Awkward shapes: an odd linear layer, a scalar buffer, a 1-element parameter."""

    def __init__(self, width=3):
        super().__init__()
        self.linear = nn.Linear(width, 5)
        self.scale = nn.Parameter(torch.tensor([0.5]))
        self.register_buffer("steps", torch.tensor(7))


def test_weights_round_trip_into_a_module_and_as_a_mapping(tmp_path):
    torch.manual_seed(0)
    saved = _Odd()
    path = tmp_path / "deep" / "model.safetensors"
    save_weights(path, saved)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left
    loaded = _Odd()
    tensors = load_weights(path, loaded, "the test model")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor) and torch.equal(tensors[name], tensor)
    codes = {"codes.train": torch.arange(12, dtype=torch.int16).view(3, 4)[:, ::2]}  # a non-contiguous view
    save_weights(tmp_path / "codes.safetensors", codes)
    read = load_weights(tmp_path / "codes.safetensors", {"codes.train": (3, 2)}, "codes")
    assert read["codes.train"].dtype == torch.int16 and torch.equal(read["codes.train"], codes["codes.train"])


def test_weight_errors_name_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match=r"model.safetensors: missing; expected the weights of the test model"):
        load_weights(path, _Odd(), "the test model")
    torch.save(_Odd().state_dict(), path)  # a pickle under the safetensors name
    with pytest.raises(ValueError, match=r"model.safetensors: not a safetensors file of the test model"):
        read_weights(path, "the test model")
    save_weights(path, _Odd())
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    with pytest.raises(ValueError, match=r"model.safetensors: not a safetensors file of the test model"):
        load_weights(path, _Odd(), "the test model")
    save_weights(path, {"linear.weight": torch.zeros(5, 3), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model.safetensors: the weights do not fit the test model: missing "
                                         r"linear.bias, scale, steps, unexpected extra"):
        load_weights(path, _Odd(), "the test model")
    save_weights(path, _Odd(width=4))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor linear.weight has shape \(5, 4\), the test model "
                                         r"expects \(5, 3\)"):
        load_weights(path, _Odd(), "the test model")
    many = {f"t{i}": torch.zeros(1) for i in range(7)}
    save_weights(path, {})
    with pytest.raises(ValueError, match=r"missing t0, t1, t2, t3, t4 and 2 more, unexpected none"):
        load_weights(path, many, "seven tensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_a_non_finite_value_are_not_written(tmp_path, bad):
    model = _Odd()
    path = tmp_path / "model.safetensors"
    save_weights(path, model)
    before = path.read_bytes()
    model.linear.weight.data[4, 2] = bad
    with pytest.raises(ValueError, match=r"model.safetensors: not written: tensor linear.weight of the test model "
                                         r"holds 1 non-finite values \(NaN or infinity\) among 15; expected finite"):
        save_weights(path, model, "the test model")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with pytest.raises(ValueError, match=r"fresh.safetensors: not written: tensor w of the weights holds 2 "):
        save_weights(tmp_path / "fresh.safetensors", {"w": torch.tensor([1.0, bad, bad], dtype=torch.bfloat16)})
    assert not (tmp_path / "fresh.safetensors").exists()
    save_weights(tmp_path / "codes.safetensors", {"codes": torch.tensor([-1, 2**31 - 1])})  # integers: nothing to check


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_a_non_finite_value_or_a_wrong_kind_of_dtype_are_not_loaded(tmp_path, bad):
    """A file written by other means (a damaged or foreign safetensors file): refused by name, the module as it was."""
    from safetensors.torch import save_file

    model = _Odd()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["linear.weight"][1, 1] = bad
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"nan.safetensors: tensor linear.weight of the test model holds 1 non-finite "
                                         r"values \(NaN or infinity\) among 15; expected finite weights"):
        load_weights(tmp_path / "nan.safetensors", model, "the test model")
    state["linear.weight"] = torch.ones(5, 3, dtype=torch.int32)
    save_file(state, str(tmp_path / "ints.safetensors"))
    with pytest.raises(ValueError, match=r"ints.safetensors: tensor linear.weight is torch.int32, the test model "
                                         r"expects torch.float32"):
        load_weights(tmp_path / "ints.safetensors", model, "the test model")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
