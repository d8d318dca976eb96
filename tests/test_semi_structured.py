"""pipeline.maths.semi_structured: the 2:4 validator (any device) and the export's device/dtype guard."""
import pytest
import torch
from torch import nn

from pipeline.maths import sparsity as sp
from pipeline.maths.semi_structured import check_2_4, export_semi_structured

torch.set_num_threads(1)


def pruned_2_4(out_features=64, in_features=64, dtype=torch.float32, device="cpu"):
    linear = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        sp.apply_mask_(linear.weight, sp.select_mask(sp.magnitude_scores(linear.weight), n_m=(2, 4)))
    return linear.to(device=device, dtype=dtype)


def test_check_2_4():
    assert check_2_4(pruned_2_4().weight)
    assert check_2_4(torch.zeros(4, 8))                       # more zeros than 2 per group is still 2:4
    assert check_2_4(torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]]))
    assert not check_2_4(torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0]]))   # 3 nonzeros in the first group
    assert not check_2_4(torch.ones(4, 6))                    # in_features not a multiple of 4
    assert not check_2_4(torch.zeros(8))                      # not a matrix
    # groups run along the input dim: a 2:4 pattern along the output dim does not count
    along_rows = torch.tensor([[1.0], [1.0], [0.0], [0.0]]).repeat(1, 4)
    assert not check_2_4(along_rows)
    assert check_2_4(pruned_2_4(dtype=torch.bfloat16).weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_on_cpu_raises_one_clear_line_and_leaves_model_untouched(dtype):
    model = nn.Sequential(pruned_2_4(dtype=dtype), nn.ReLU(), pruned_2_4(dtype=dtype))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError) as err:
        export_semi_structured(model)
    message = str(err.value)
    assert "CUDA" in message and "compute capability >= 8.0" in message and "\n" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_export_filter_excluding_everything_is_a_no_op_on_cpu():
    model = nn.Sequential(pruned_2_4())
    report = export_semi_structured(model, module_filter=lambda name, module: False)
    assert report["converted"] == [] and report["skipped"] == {}


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                    reason="needs an Ampere+ GPU")
def test_export_on_gpu_matches_dense():
    dense = nn.Sequential(pruned_2_4(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half()
    sparse = nn.Sequential(pruned_2_4(128, 128), nn.ReLU(), nn.Linear(128, 128)).cuda().half()
    sparse.load_state_dict(dense.state_dict())
    report = export_semi_structured(sparse)
    assert report["converted"] == ["0"] and "2" in report["skipped"]
    x = torch.randn(4, 32, 128, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        assert torch.allclose(dense(x), sparse(x), atol=2e-2, rtol=2e-2)


def test_export_report_logic_with_kernels_stubbed(monkeypatch):
    # No GPU here: stub the device check and the conversion to exercise which layers are converted/skipped.
    import pipeline.maths.semi_structured as ss

    monkeypatch.setattr(ss, "_check_device_and_dtype", lambda name, weight: None)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: w.clone())
    tied = pruned_2_4(dtype=torch.bfloat16)
    twin = nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    twin.weight = tied.weight
    model = nn.ModuleDict({
        "ok": pruned_2_4(dtype=torch.bfloat16),
        "dense": nn.Linear(64, 64).to(torch.bfloat16),
        "tiny": pruned_2_4(out_features=8, dtype=torch.bfloat16),   # below the kernel's minimum rows
        "odd": nn.Linear(6, 64).to(torch.bfloat16),
        "tied": tied, "twin": twin,
        "filtered": pruned_2_4(dtype=torch.bfloat16),
    })
    report = export_semi_structured(model, module_filter=lambda name, module: name != "filtered")
    assert report["converted"] == ["ok"] and report["converted_params"] == 64 * 64
    assert set(report["skipped"]) == {"dense", "tiny", "odd", "tied", "twin"}
    assert "not 2:4" in report["skipped"]["dense"] and "tied" in report["skipped"]["tied"]
    assert "divisible by 4" in report["skipped"]["odd"] and "tile" in report["skipped"]["tiny"]
    assert not model["ok"].weight.requires_grad and model["filtered"].weight.requires_grad
