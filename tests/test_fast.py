"""The fast step computes the reference objective: loss, gradients and BN buffers (deflect.train.fast)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from deflect.cli import app
from deflect.config import make_config
from deflect.data import dataset_info
from deflect.errors import DeflectError
from deflect.models import build_model
from deflect.store import Store
from deflect.train.fast import chunked_batchnorm, fast_disjoint_loss
from deflect.train.losses import ActiveTerms, disjoint_loss
from tests.test_reliability import _one_line_error


def setup(n: int, width: int = 8, batch: int = 32):
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    models = [build_model("cnn", info, width=width) for _ in range(n)]
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    cfg = make_config(n, "fashion-mnist", width=width)
    return models, x, y, cfg


def step(fn, models, x, y, cfg, sample, **kw):
    for m in models:
        m.train()
        m.zero_grad()
    parts = fn(models, x, y, cfg, ActiveTerms.all_enabled(cfg), sample, **kw)
    assert parts.total.dtype == x.dtype
    parts.total.backward()
    grads = [p.grad.clone() for m in models for p in m.parameters()]
    buffers = [b.clone() for m in models for b in m.buffers()]
    return parts, grads, buffers


@pytest.mark.parametrize("n, sample, clamp, detach, smooth", [
    (3, None, "batch", False, 0.0), (5, [0, 2, 4], "batch", False, 0.0), (3, None, "image", False, 0.0),
    (3, None, "image", True, 0.0), (5, [0, 2, 4], "image", False, 0.3), (5, [0, 2, 4], "none", False, 0.0)])
# the NHWC layout sums in another order; tanh(2e4·g) magnifies that rounding in float32, so its
# equality is checked in float64, where rounding is far below the tolerance
@pytest.mark.parametrize("batched, channels_last, dtype", [(True, False, torch.float32), (False, True, torch.float64)])
def test_fast_step_equals_the_reference(n: int, sample, clamp: str, detach: bool, smooth: float, batched: bool,
                                        channels_last: bool, dtype) -> None:
    models, x, y, cfg = setup(n)
    cfg = dataclasses.replace(cfg, transfer_clamp=clamp, detach_clean=detach, w_smooth=smooth)
    models = [m.to(dtype) for m in models]
    x = x.to(dtype)
    twins = copy.deepcopy(models)
    xf = x
    if channels_last:
        twins = [m.to(memory_format=torch.channels_last) for m in twins]
        xf = x.contiguous(memory_format=torch.channels_last)
    ref, ref_grads, ref_buffers = step(disjoint_loss, models, x, y, cfg, sample)
    fast, fast_grads, fast_buffers = step(fast_disjoint_loss, twins, xf, y, cfg, sample, batched=batched)
    for name in ("total", "classification", "angle", "transfer1", "transfer2"):
        assert float(getattr(fast, name).detach()) == pytest.approx(float(getattr(ref, name).detach()), abs=1e-4,
                                                                    rel=1e-4)
    assert float(ref.transfer1.detach()) > 0 and float(ref.transfer2.detach()) > 0  # the terms under test are live
    assert (ref.smooth is None) == (fast.smooth is None) == (smooth == 0)
    if smooth:
        assert float(fast.smooth.detach()) == pytest.approx(float(ref.smooth.detach()), rel=1e-4)
    for a, b in zip(ref_grads, fast_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(ref_buffers, fast_buffers, strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)  # running statistics and counters


def test_chunked_batchnorm_normalises_each_chunk_alone() -> None:
    bn = torch.nn.BatchNorm2d(3)
    twin = copy.deepcopy(bn)
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5) * 3 + 1
    with chunked_batchnorm(bn, 2):
        out = bn(torch.cat([a, b]))
    expected = torch.cat([twin(a), twin(b)])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(bn.running_mean, twin.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, twin.running_var, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(twin.num_batches_tracked) == 2
    assert "_orig_forward" not in vars(bn)  # restored after the block


def test_transfer_batch_changes_only_the_transfer_terms() -> None:
    models, x, y, cfg = setup(3)
    full = fast_disjoint_loss(copy.deepcopy(models), x, y, cfg, ActiveTerms.all_enabled(cfg))
    cfg.transfer_batch = 8
    part = fast_disjoint_loss(copy.deepcopy(models), x, y, cfg, ActiveTerms.all_enabled(cfg))
    assert float(part.classification.detach()) == pytest.approx(float(full.classification.detach()), rel=1e-5)
    assert float(part.transfer1.detach()) != pytest.approx(float(full.transfer1.detach()), rel=1e-3)
    assert torch.isfinite(part.total)
    cfg.transfer_batch = len(x)  # the whole batch: the reference again
    same = fast_disjoint_loss(copy.deepcopy(models), x, y, cfg, ActiveTerms.all_enabled(cfg))
    assert float(same.total.detach()) == pytest.approx(float(full.total.detach()), rel=1e-5)


@pytest.mark.parametrize("clamp", ["batch", "image", "none"])
def test_transfer_batch_puts_every_pair_term_on_the_first_images(clamp: str) -> None:
    """As in `deflect grow`: the pair terms equal the whole-batch terms computed on the first images
    alone (their gradients rescaled to the whole batch's per-image size), classification keeps the
    batch; the input gradients with their graph cover the first images only."""
    models, x, y, cfg = setup(3)
    for m in models:
        m.eval()  # BatchNorm in eval mode: an image's terms do not depend on the rest of its batch
    cfg = dataclasses.replace(cfg, transfer_clamp=clamp, eps1_per_sample=False, w_smooth=0.5)
    active = ActiveTerms.all_enabled(cfg)
    cut = fast_disjoint_loss(models, x, y, dataclasses.replace(cfg, transfer_batch=8), active)
    # the smoothness term is each image's own squared gradient norm: the first 8 images', at any batch size
    assert cut.smooth is not None
    own = fast_disjoint_loss(models, x[:8], y[:8], dataclasses.replace(cfg, w_angle=0.0, w_transfer1=0.0,
                                                                        w_transfer2=0.0), ActiveTerms(smooth=True))
    assert own.smooth is not None and float(cut.smooth.detach()) == pytest.approx(float(own.smooth.detach()), rel=1e-5)
    # the same terms over the 8 images alone, ε1 and the tanh scale scaled by 8/32 for the batch
    # mean's 1/B, which is what rescaling the gradients does
    alone = fast_disjoint_loss(models, x[:8], y[:8], dataclasses.replace(
        cfg, eps1=cfg.eps1 * 8 / 32, tanh_scale=cfg.tanh_scale * 8 / 32), active)
    full = fast_disjoint_loss(models, x, y, cfg, active)
    cut, alone, full = (parts.as_floats() for parts in (cut, alone, full))
    assert cut["class"] == pytest.approx(full["class"], rel=1e-6)
    for name in ("angle", "transfer1", "transfer2"):
        assert cut[name] == pytest.approx(alone[name], rel=1e-4, abs=1e-7)
    assert cut["transfer1"] > 0 and cut["transfer2"] > 0
    assert cut["angle"] != pytest.approx(full["angle"], rel=1e-4)


def test_bad_step_options_are_refused() -> None:
    with pytest.raises(DeflectError, match="--transfer-clamp must be 'batch', 'image' or 'none'"):
        make_config(3, "digits", transfer_clamp="sample")
    with pytest.raises(DeflectError, match="unknown step 'quick'"):
        make_config(3, "digits", step="quick")
    with pytest.raises(DeflectError, match="--transfer-batch must be at least 2"):
        make_config(3, "digits", transfer_batch=1)


def test_train_with_the_fast_step_matches_the_reference_run(tmp_path) -> None:
    accs = {}
    for step_name, extra in (("reference", []), ("fast", []), ("fast", ["--transfer-batch", "16"])):
        args = ["train", "--n", "2", "--step", step_name, "--epochs", "4", "--limit", "640", "--width", "8", "--json"]
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        run = Store(tmp_path / "deflect.db").latest_run()
        assert run is not None and run.status == "finished" and run.config["step"] == step_name
        accs[(step_name, bool(extra))] = run.clean_acc
    assert min(accs[("reference", False)]) > 50
    # same objective, same seed: the same models up to float rounding
    for a, b in zip(accs[("reference", False)], accs[("fast", False)], strict=True):
        assert abs(a - b) <= 2.0
    assert min(accs[("fast", True)]) > 40  # fewer images in the transfer terms still trains


def test_bench_quick_json_reports_rates_phases_and_ratios() -> None:
    result = CliRunner().invoke(app, ["bench", "--quick", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.stdout.strip().splitlines()[-1])
    rates = data["steps_per_s"]["3"]
    from deflect.inference import bf16_supported

    bf16 = {"reference_bf16"} if bf16_supported("cpu") else set()  # timed wherever bf16 is native
    assert set(rates) == {"independent", "reference", "fast", "cheap", "fast_k5", "fast_k5_r50",
                          "independent_nchw", "reference_nchw"} | bf16
    assert min(rates.values()) > 0
    # the disjoint loss costs several independent steps (double backprop, 2(n-1) extra forwards each)
    assert data["ratios"]["reference_cost_vs_independent_n3"] > 2
    # what `--transfer-steps 5` adds, joint and grown, beside the one-step baseline, on all or half the batch
    ratios = data["ratios"]
    for name in ("fast_k5_cost_vs_fast_n3", "fast_k5_r50_cost_vs_fast_n3", "grow_s3_tb32_k5_cost_vs_grow_s3_tb32",
                 "grow_s3_tb32_k5_r50_cost_vs_grow_s3_tb32", "grow_batched_vs_grow_s2_tb32"):
        assert ratios[name] > 0, name
    # the training layout (channels-last on CPU) against NCHW models, step by step in one process
    for name in ("nhwc_vs_nchw_independent_n3", "nhwc_vs_nchw_reference_n3", "nhwc_vs_nchw_one_model",
                 "nhwc_vs_nchw_grow_s2_tb32"):
        assert ratios[name] > 0, name
    assert not any(name.startswith("one_model_nchw") or "_nchw_cost" in name for name in ratios), ratios
    assert set(data["phases"]) == {"input_gradients", "perturbed_forwards", "backward"}
    assert all(v > 0 for v in data["phases"].values())
    assert data["matrix"]["deflect_images_per_s"] > 0 and data["peak_memory_mb"] > 0
    if "torchattacks_images_per_s" in data["matrix"]:  # the oracle library is a test dependency
        assert data["ratios"]["matrix_vs_torchattacks"] > 0
        # crafting under bf16 is timed, with its own ratio, wherever bf16 is native
        assert ("matrix_bf16_vs_torchattacks" in data["ratios"]) == bf16_supported("cpu")
    # one crafting thread per torch thread; the in-order figure beside it whenever there are several
    assert data["matrix"]["deflect_workers"] == data["threads"]
    assert ("matrix_workers_vs_one_worker" in data["ratios"]) == (data["threads"] > 1)


def test_bench_rejects_bad_steps() -> None:
    _one_line_error(["bench", "--quick", "--steps", "0"], "--steps must be at least 1", strict=True)


def test_bench_times_the_width_it_is_given() -> None:
    import json

    result = CliRunner().invoke(app, ["bench", "--quick", "--json", "--device", "cpu", "--width", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["settings"]["width"] == 4  # not --quick's 8
    for bad, message in ((["--width", "0"], "--width must be at least 1"),
                         (["--width", "8", "--preset", "digits"], "--preset times the preset's own model")):
        result = CliRunner().invoke(app, ["bench", "--quick", *bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_time_to_quality_reports_each_recipe_and_their_ratio() -> None:
    import json

    args = ["bench", "--time-to-quality", "--dataset", "digits", "--epochs", "2", "--limit", "320", "--device", "cpu",
            "--json", "--width", "8"]
    result = CliRunner().invoke(app, [*args, "--clean-bar", "0", "--blackbox-bar", "0"])
    assert result.exit_code == 0, result.output
    # long work shows itself: a line per epoch's check of the bar (the batch bars are Rich's, on stderr)
    assert "faithful, epoch 1/2:" in result.stderr and "fast, epoch 1/2:" in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["width"] == 8
    for name in ("faithful", "fast"):
        assert report[name]["reached_epoch"] == 1 and len(report[name]["epochs"]) == 1
    # a zero bar is cleared after the first epoch: the ratio is that of one epoch of each recipe (which
    # one is faster here is a timing on a shared machine, so `deflect bench` reports it, not a test)
    faithful, fast = (report[name]["reached_at"] for name in ("faithful", "fast"))
    assert faithful > 0 and fast > 0
    assert report["time_to_quality_ratio"] == pytest.approx(faithful / fast)
    # the fast recipe changes the objective only by its pair-term batch
    assert report["fast_recipe"] == {"step": "fast", "transfer_batch": 32}
    # a bar these sets cannot clear (every model perfect, clean and under attack, after two epochs of a
    # width-8 CNN); the fast recipe's schedule has a length of its own
    result = CliRunner().invoke(app, [*args, "--clean-bar", "100", "--blackbox-bar", "100", "--fast-epochs", "1"])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["faithful"]["reached_at"] is None and len(report["faithful"]["epochs"]) == 2
    assert report["fast_epochs"] == 1 and len(report["fast"]["epochs"]) == 1
    assert report["time_to_quality_ratio"] is None
    result = CliRunner().invoke(app, [*args, "--fast-epochs", "0"])
    assert result.exit_code == 2 and "--fast-epochs must be at least 1" in result.output


def test_time_to_quality_reads_the_given_data_dir(tmp_path) -> None:
    root = tmp_path / "no-mnist-here"
    root.mkdir()
    args = ["bench", "--time-to-quality", "--dataset", "mnist", "--epochs", "1", "--data-dir", str(root)]
    _one_line_error(args, f"mnist not found under {root}", strict=True)


def test_bench_preset_times_the_presets_model_and_sizes_an_epoch() -> None:
    import dataclasses

    from deflect.bench import default_settings, epoch_seconds, step_rates
    from deflect.data import dataset_info

    settings = dataclasses.replace(default_settings("cpu", "digits"), steps=1)
    assert settings.dataset == "digits" and settings.matrix_images == 512
    rates = step_rates(settings, 2, torch.device("cpu"))
    from deflect.inference import bf16_supported

    bf16 = {"reference_bf16"} if bf16_supported("cpu") else set()  # timed wherever bf16 is native
    assert set(rates) == {"independent", "reference", "fast", "cheap", "fast_k5", "fast_k5_r50",
                          "independent_nchw", "reference_nchw"} | bf16
    seconds = epoch_seconds(settings, 2, rates)
    batch = make_config(2, "digits", "digits").batch_size
    steps = dataset_info("digits").train_split_images // batch
    for name, rate in rates.items():
        assert seconds[name] == pytest.approx(steps / rate)
    assert default_settings("cuda").matrix_images == 4096  # a GPU's figure must not be fixed costs
    # a GPU step takes milliseconds: more timed steps, or the figure is noise
    assert default_settings("cuda").steps == 10 and default_settings("cuda", "paper-cifar10").steps == 10
    assert default_settings("cpu").steps == 3


def test_bench_rejects_an_unknown_preset() -> None:
    result = CliRunner().invoke(app, ["bench", "--preset", "paper-imagenet"])
    assert result.exit_code == 2 and "unknown preset 'paper-imagenet'" in result.output
    assert "Traceback" not in result.output


def test_training_layout_is_channels_last_on_cpu_and_keeps_the_function() -> None:
    """Training models are NHWC on CPU; the logits and a checkpoint round trip are unchanged by it."""
    from safetensors.torch import load as st_load

    from deflect.checkpoint import encode_tensors
    from deflect.runtime import changes_layout, training_layout

    # the bench times an NCHW twin exactly where training converts (on CUDA it would time one step twice)
    assert changes_layout(torch.device("cpu")) and not changes_layout(torch.device("cuda"))
    torch.manual_seed(0)
    model = build_model("cnn", dataset_info("fashion-mnist"), True, 8).eval()
    x = torch.rand(5, 1, 28, 28)
    before = model(x)
    (nhwc,) = training_layout([copy.deepcopy(model)], torch.device("cpu"))
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # a 1-channel input's kernel is both layouts at once
    torch.testing.assert_close(nhwc(x), before, atol=1e-5, rtol=1e-5)
    fresh = build_model("cnn", dataset_info("fashion-mnist"), True, 8).eval()
    fresh.load_state_dict(st_load(encode_tensors(nhwc.state_dict())))
    torch.testing.assert_close(fresh(x), before, atol=1e-5, rtol=1e-5)
