"""`--teacher`: a share α of the classification target from a stored set's soft targets
(deflect.train.distill): the loss against a hand-written formula, the step's total, BatchNorm's
running statistics untouched, and the CLI end to end (stored id, epoch terms, resume, grow, errors)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import deflect
from deflect.cli import app
from deflect.data import dataset_info
from deflect.models import build_model
from deflect.store import Store
from deflect.train import Callbacks, train
from deflect.train.distill import Teacher, distilled, soft_loss
from deflect.train.losses import ActiveTerms, disjoint_loss
from tests.conftest import tiny_config
from tests.test_reliability import _one_line_error


def test_soft_loss_is_t2_times_kl_by_hand() -> None:
    torch.manual_seed(0)
    z, t = torch.randn(6, 10), torch.randn(6, 10)
    for temp in (1.0, 4.0):
        p = torch.softmax(t / temp, 1)
        q = torch.softmax(z / temp, 1)
        by_hand = temp**2 * (p * (p.log() - q.log())).sum(1).mean()
        assert float(soft_loss(z, p, temp)) == pytest.approx(float(by_hand), rel=1e-5)
        assert float(soft_loss(t, p, temp)) == pytest.approx(0.0, abs=1e-6)  # the teacher's own logits


def test_distilled_total_replaces_a_share_of_classification() -> None:
    """total' = total − w·α·CE + w·α·soft; its gradient is that of the formula written out, and the
    extra forward leaves BatchNorm's running statistics as they were."""
    torch.manual_seed(0)
    info = dataset_info("digits")
    models = [build_model("cnn", info, width=8).train() for _ in range(2)]
    teacher_net = build_model("cnn", info, width=8).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cfg = dataclasses.replace(tiny_config(), teacher="t", distill_alpha=0.3, distill_temperature=2.0)
    teacher = Teacher("t", [teacher_net])
    active = ActiveTerms.for_epoch(cfg, 2)

    a = copy.deepcopy(models)
    parts = disjoint_loss(a, x, y, cfg, active)
    stats = [b.clone() for m in a for n, b in m.named_buffers() if "running" in n]
    total, values = distilled(parts, a, x, teacher, cfg)
    after = [b for m in a for n, b in m.named_buffers() if "running" in n]
    assert all(torch.equal(u, v) for u, v in zip(after, stats, strict=True))
    total.backward()

    b = copy.deepcopy(models)
    ref = disjoint_loss(b, x, y, cfg, active)
    with torch.no_grad():
        p = torch.softmax(teacher_net(x) / 2.0, 1)
    soft = sum(4.0 * F.kl_div(F.log_softmax(m(x) / 2.0, 1), p, reduction="batchmean") for m in b)
    expected = ref.total - 0.3 * ref.classification + 0.3 * soft
    expected.backward()
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert values["distill"] == pytest.approx(float(soft.detach()), rel=1e-5)
    assert values["total"] == float(total.detach())
    for pa, pb in zip((q for m in a for q in m.parameters()), (q for m in b for q in m.parameters()), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)
    assert distilled(ref, b, x, None, cfg)[0] is ref.total  # no teacher: the method's own step


def test_teacher_run_end_to_end(store: Store) -> None:
    """A teacher named 'latest' is stored by id and every epoch row holds a finite soft loss. With
    α = 1 the students learn from the teacher alone: a teacher still at chance keeps them there and
    closer to its outputs than the same set trained on the labels. An interrupted run resumes to the
    uninterrupted run's weights. A grown set distils only from a teacher the grow names."""
    teacher_id = train(tiny_config(method="independent", epochs=2, train_limit=192, width=8), store)
    assert max(store.get_run(teacher_id).clean_acc) < 20  # 3 optimizer steps: a teacher at chance
    cfg = tiny_config(epochs=3, teacher="latest", distill_alpha=1.0, distill_temperature=1.0)
    student = train(cfg, store)
    run = store.get_run(student)
    assert run.config["teacher"] == teacher_id
    rows = store.epochs(student)
    assert all(r.terms and torch.isfinite(torch.tensor(r.terms["distill"])) and r.terms["distill"] > 0 for r in rows)
    plain = train(dataclasses.replace(cfg, teacher=None), store)
    assert max(run.clean_acc) < 20 < min(store.get_run(plain).clean_acc) - 15
    teacher = Teacher.load(store, teacher_id, cfg, torch.device("cpu"))
    val = deflect.load_dataset("digits", "val")
    x, _ = val.batch(torch.arange(len(val)))
    with torch.no_grad():
        p = teacher.soft_targets(x, 1.0)
        kd = [float(soft_loss(m(x), p, 1.0)) for m in deflect.load_set(student, store)]
        no = [float(soft_loss(m(x), p, 1.0)) for m in deflect.load_set(plain, store)]
    assert all(a < b for a, b in zip(kd, no, strict=True)), (kd, no)

    def stop_after_first(metric: object) -> None:
        if metric.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, teacher=teacher_id), store, Callbacks(on_epoch=stop_after_first))
    resumed = train(store=store, resume=store.list_runs()[-1].id)
    for a, b in zip(deflect.load_set(student, store), deflect.load_set(resumed, store), strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb), ka

    from deflect.train.grow_run import grow

    grown = grow(store, student, 1, epochs=1)  # the parent's teacher is not inherited
    assert (store.get_run(grown).config["teacher"], store.get_run(student).config["teacher"]) == (None, teacher_id)
    assert "distill" not in store.epochs(grown)[0].terms
    named = grow(store, plain, 1, epochs=1, teacher=teacher_id[:-2], distill_alpha=0.25)
    named_cfg = store.get_run(named).config
    assert (named_cfg["teacher"], named_cfg["distill_alpha"], named_cfg["distill_temperature"]) == (teacher_id, 0.25, 4)
    assert store.get_run(plain).config["teacher"] is None  # the parent is only read
    assert store.epochs(named)[0].terms["distill"] > 0
    again = grow(store, student, 1, epochs=1, teacher=teacher_id)  # α and T: the grow's defaults, not the parent's
    again_cfg = store.get_run(again).config
    assert (again_cfg["distill_alpha"], again_cfg["distill_temperature"]) == (0.5, 4)


def test_cli_teacher_errors_leave_no_run(tmp_path) -> None:
    db = str(tmp_path / "deflect.db")
    runner = CliRunner()
    base = ["train", "--n", "2", "--epochs", "1", "--limit", "128", "--width", "8", "--db", db]
    cases = {
        "--teacher nosuch": "no run 'nosuch'",
        "--distill 0.3": "--distill and --distill-temperature need --teacher",
        "--method adp --teacher x": "--teacher works with --method disjoint or independent",
    }
    for extra, message in cases.items():
        _one_line_error(base + extra.split(), message, strict=True)
    first = json.loads(runner.invoke(app, [*base, "--json"]).output.strip().splitlines()[-1])["id"]
    for extra, message in {
        "--teacher latest --distill 0": "--distill must be in (0, 1]",
        "--teacher latest --distill-temperature -1": "--distill-temperature must be positive",
        "--teacher latest --dataset fashion-mnist": "trained on digits, not fashion-mnist",
    }.items():
        _one_line_error(base + extra.split(), message, strict=True)
    grow_cases = {
        f"grow {first} --distill 0.3": "--distill and --distill-temperature need --teacher",
        f"grow {first} --teacher {first} --distill 2": "--distill must be in (0, 1]",
        f"grow {first} --teacher nosuch": "no run 'nosuch'",
    }
    for command, message in grow_cases.items():
        _one_line_error([*command.split(), "--db", db], message, strict=True)
    assert [r.id for r in Store(db).list_runs()] == [first]
