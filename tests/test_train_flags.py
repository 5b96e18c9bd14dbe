"""`deflect train`'s flags on the success path: each one lands in its own `TrainConfig` field, and no other.

Training is replaced by a stand-in that keeps the configuration the command built (as the option fuzz
test in tests/test_reliability.py replaces it by its validation), so each case costs a CLI parse.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deflect.cli import app
from deflect.config import TermWindow, TrainConfig, make_config

runner = CliRunner()


class Built(Exception):
    """Raised by the stand-in for training, carrying the configuration it was given."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__("configuration built")
        self.cfg = cfg


def built_config(args: list[str], monkeypatch: pytest.MonkeyPatch) -> TrainConfig:
    """The validated `TrainConfig` that `deflect train ARGS` hands to training."""
    train_pkg = importlib.import_module("deflect.train")  # the callable package; its `train` is what runs

    def keep(cfg: Any, store: Any, callbacks: Any = None, resume: str | None = None, shard: Any = None) -> str:
        assert resume is None and shard is None
        cfg.validate()
        raise Built(cfg)

    monkeypatch.setattr(train_pkg, "train", keep)
    result = runner.invoke(app, ["train", *args])
    assert isinstance(result.exception, Built), (result.exit_code, result.output, result.exception)
    return result.exception.cfg


# (flags, what make_config is given for them); a flag that changes the dataset or preset compares with that
# dataset's or preset's own defaults. Values differ from every preset's so a flag landing elsewhere shows.
CASES: list[tuple[list[str], dict[str, Any]]] = [
    (["--n", "4"], dict(n=4)),
    (["--dataset", "fashion-mnist"], dict(dataset="fashion-mnist")),
    (["--preset", "fashion-mnist"], dict(preset="fashion-mnist")),
    (["--method", "independent"], dict(method="independent")),
    (["--arch", "preact-resnet18"], dict(arch="preact-resnet18")),
    (["--width", "5"], dict(width=5)),
    (["--epochs", "7"], dict(epochs=7)),
    (["--batch-size", "48"], dict(batch_size=48)),
    (["--lr", "0.03"], dict(lr_max=0.03)),
    (["--eps1", "7.25"], dict(eps1=7.25)),
    (["--eps2", "0.0625"], dict(eps2=0.0625)),
    (["--w-angle", "0.25"], dict(w_angle=0.25)),
    (["--w-transfer1", "1.5"], dict(w_transfer1=1.5)),
    (["--w-transfer2", "2.5"], dict(w_transfer2=2.5)),
    (["--w-smooth", "0.125"], dict(w_smooth=0.125)),
    (["--angle-epochs", "3"], dict(angle_window=TermWindow(1, 3))),
    (["--transfer-until", "5"], dict(transfer1_window=TermWindow(2, 5), transfer2_window=TermWindow(2, 5))),
    (["--sample", "2"], dict(sample_models=2)),
    (["--no-angle"], dict(w_angle=0.0)),
    (["--no-transfer"], dict(w_transfer1=0.0, w_transfer2=0.0)),
    (["--eps1-per-sample"], dict(eps1_per_sample=True)),
    (["--method", "fast-at", "--at-eps", "0.2"], dict(method="fast-at", at_eps=0.2)),
    (["--step", "fast"], dict(step="fast")),
    (["--transfer-batch", "16"], dict(transfer_batch=16)),
    (["--transfer-clamp", "image"], dict(transfer_clamp="image")),
    (["--detach-clean"], dict(detach_clean=True)),
    (["--clean-bn-stats"], dict(clean_bn_stats=True)),
    (["--transfer-steps", "3"], dict(transfer_steps=3)),
    (["--transfer-refine", "0.5"], dict(transfer_refine=0.5)),
    (["--transfer1-l2", "0.75"], dict(transfer1_l2=0.75)),
    (["--teacher", "some-run"], dict(teacher="some-run")),
    (["--teacher", "some-run", "--distill", "0.25", "--distill-temperature", "2.5"],
     dict(teacher="some-run", distill_alpha=0.25, distill_temperature=2.5)),
    (["--select", "last"], dict(select="last")),
    (["--limit", "100"], dict(train_limit=100)),
    (["--seed", "7"], dict(seed=7)),
    (["--device", "cpu"], dict(device="cpu")),
    (["--bf16"], dict(bf16=True)),
    (["--download"], dict(download=True)),
]


@pytest.mark.parametrize("flags, fields", CASES, ids=[" ".join(flags) for flags, _ in CASES])
def test_each_train_flag_lands_in_its_field(flags: list[str], fields: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = built_config(flags, monkeypatch)
    want = make_config(n=fields.pop("n", 3), dataset=fields.pop("dataset", "digits"), **fields)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(want)


def test_plain_train_is_the_presets_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """No flags: the digits preset for 3 models, so every case above differs from it by its own field alone."""
    assert dataclasses.asdict(built_config([], monkeypatch)) == dataclasses.asdict(make_config(3, "digits"))
    assert make_config(3, "digits").w_transfer2 > 0 and make_config(3, "digits").w_angle > 0


def test_data_dir_lands_in_its_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = built_config(["--data-dir", str(tmp_path)], monkeypatch)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(make_config(3, "digits", data_dir=str(tmp_path)))


def test_every_train_option_has_a_case() -> None:
    """A new `deflect train` option needs a case here (or a reason it has none)."""
    import typer.main

    train_command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    options = {name for param in train_command.params for name in param.opts if name.startswith("--")}
    covered = {flag for flags, _ in CASES for flag in flags if flag.startswith("--")} | {"--data-dir"}
    not_config = {"--resume", "--db", "--json", "--help"}  # a run to continue, where to store it, output format
    assert options - not_config == covered
