"""deeprnn.training.resume: the configuration a resumed run continues with, its folder, and its restored state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeprnn.config import RunConfig, preset_config
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM
from deeprnn.training import checkpoint
from deeprnn.training.divergence import TrainingDivergedError
from deeprnn.training.loop import Trainer
from deeprnn.training.resume import (
    RESUMABLE,
    Finished,
    ResumeError,
    check_run_id,
    no_checkpoint,
    nothing_left,
    restore_training,
    resume_config,
    run_folder,
)

CPU = torch.device("cpu")
URL = "http://127.0.0.1:8000/timemachine.txt"


def _stored(**train: object) -> dict:
    config = preset_config("smoke", {"data": {"url": URL}, "train": {"device": "cpu", **train}})
    return config.model_dump(mode="json")


def test_stored_configuration_is_kept_and_may_be_restated() -> None:
    stored = _stored()
    config = resume_config(stored, {"train": {"lr": 1.0, "num_steps": 16}, "model": {"cell": "lstm"}}, epochs_done=2)
    assert config == RunConfig.model_validate(stored)


def test_contradicting_settings_are_refused_naming_each_with_both_values() -> None:
    with pytest.raises(ResumeError) as info:
        resume_config(_stored(), {"train": {"lr": 0.5}, "model": {"num_hiddens": 64}}, epochs_done=2)
    message = str(info.value)
    assert "train.lr: the checkpoint has 1.0, given 0.5" in message
    assert "model.num_hiddens: the checkpoint has 32, given 64" in message
    assert "train.epochs" in message  # says what may change


def test_epochs_may_be_extended_never_cut_below_what_is_done() -> None:
    assert resume_config(_stored(), {"train": {"epochs": 50}}, epochs_done=3).train.epochs == 50
    assert resume_config(_stored(), {"train": {"epochs": 3}}, epochs_done=3).train.epochs == 3
    with pytest.raises(ResumeError, match="already has 3 epochs done; --epochs 2 would undo them"):
        resume_config(_stored(), {"train": {"epochs": 2}}, epochs_done=3)


def test_the_step_budget_may_be_raised_never_cut_below_the_steps_done() -> None:
    assert (
        resume_config(_stored(max_steps=50), {"train": {"max_steps": 80}}, epochs_done=1, steps_done=50).train.max_steps
        == 80
    )
    with pytest.raises(
        ResumeError, match="already has 50 steps done; --max-steps 40 would undo them: give at least 50"
    ):
        resume_config(_stored(max_steps=50), {"train": {"max_steps": 40}}, epochs_done=1, steps_done=50)


def test_the_time_budget_may_change_but_must_leave_time_to_train() -> None:
    assert (
        resume_config(_stored(time_budget=5), {"train": {"time_budget": "1m"}}, 0, seconds_done=5).train.time_budget
        == 60
    )
    assert (
        resume_config(_stored(time_budget=5), {"train": {"time_budget": "off"}}, 0, seconds_done=5).train.time_budget
        is None
    )
    assert resume_config(_stored(time_budget=5), {}, 0, seconds_done=3).train.time_budget == 5  # unchanged: goes on
    with pytest.raises(ResumeError, match="already has 1m of training; --time-budget 30s would leave none"):
        resume_config(_stored(time_budget=120), {"train": {"time_budget": "30s"}}, 0, seconds_done=60)


def test_a_finished_run_has_nothing_left_until_the_budget_it_stopped_on_is_raised() -> None:
    run = "a" * 32
    by_epochs, by_steps, by_time = (
        Finished("epochs", 3, 45),
        Finished("max_steps", 1, 40),
        Finished("time_budget", 2, 9, 5.0),
    )
    assert "give --epochs above 3" in (nothing_left(run, by_epochs, 3, None, None) or "")
    assert nothing_left(run, by_epochs, 4, None, None) is None
    assert "give --max-steps above 40" in (nothing_left(run, by_steps, 10, 40, None) or "")
    assert nothing_left(run, by_steps, 10, 41, None) is None
    spent = nothing_left(run, by_time, 1000, None, 5.0) or ""
    assert "its time budget (5s), so nothing is left to train: give a longer --time-budget (above 5s)" in spent
    assert nothing_left(run, by_time, 1000, None, 6.0) is None and nothing_left(run, by_time, 1000, None, None) is None
    assert nothing_left(run, Finished("early_stopping", 7), 1000, None, None) is None  # stops again, after training


def test_the_checkpoint_message_says_whether_one_was_ever_logged(tmp_path: Path) -> None:
    local = tmp_path / "last.pt"
    for tags in (
        {"deeprnn.checkpoint": "checkpoints/last.pt"},
        {"deeprnn.stop_reason": "epochs"},
        {"deeprnn.stopped": "continue with: deeprnn run --resume x"},
        {"deeprnn.resumed_at_epoch": "2"},
    ):
        assert "its files are gone: neither" in no_checkpoint("r", tags, local)
    for tags in ({}, {"deeprnn.stopped": "stopped before its first checkpoint: nothing to resume"}):
        assert "it stopped before its first checkpoint" in no_checkpoint("r", tags, local)


def test_runtime_settings_may_change() -> None:
    assert {"train.device", "train.checkpoint_every"} <= RESUMABLE
    config = resume_config(_stored(), {"train": {"device": "auto", "checkpoint_every": 5}}, epochs_done=1)
    assert config.train.device == "auto" and config.train.checkpoint_every == 5


def test_the_corpus_url_may_be_given_again_with_its_credentials_but_not_changed() -> None:
    stored = _stored()  # checkpoints keep the URL without credentials
    with_password = URL.replace("http://", "http://reader:pw@")
    assert resume_config(stored, {"data": {"url": with_password}}, epochs_done=1).data.url == with_password
    with pytest.raises(ResumeError, match="data.url"):
        resume_config(stored, {"data": {"url": URL.replace("8000", "8001")}}, epochs_done=1)


def test_bad_override_values_are_still_validated() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        resume_config(_stored(), {"model": {"num_layers": 0}}, epochs_done=1)


@pytest.mark.parametrize("bad", ["", "../runs", "a/b", "..", "abc def", "x" * 65, "run.id"])
def test_run_ids_that_could_leave_the_runs_folder_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="is not an MLflow run id"):
        run_folder(tmp_path, bad)


def test_run_folder_is_inside_the_runs_folder(tmp_path: Path) -> None:
    run_id = "0123456789abcdef0123456789abcdef"
    assert check_run_id(run_id) == run_id
    assert run_folder(tmp_path / "runs", run_id) == (tmp_path / "runs" / run_id).resolve()


def test_checkpoints_keep_no_url_credentials(tiny_vocab: Vocab) -> None:
    config = preset_config("smoke", {"data": {"url": "https://alice:s3cret@example.com/book.txt"}})
    payload = checkpoint.make_payload(config, tiny_vocab, RNNLM.from_config(len(tiny_vocab), config.model), epoch=0)
    assert payload["config"]["data"]["url"] == "https://example.com/book.txt"
    assert config.data.url.startswith("https://alice:s3cret@")  # the run itself keeps using them


def _trainer(tiny_vocab: Vocab, tiny_ids: torch.Tensor, epochs: int) -> tuple[RunConfig, RNNLM, Trainer]:
    config = preset_config("smoke", {"model": {"num_hiddens": 16}, "train": {"epochs": epochs, "device": "cpu"}})
    torch.manual_seed(config.train.seed)
    model = RNNLM.from_config(len(tiny_vocab), config.model)
    return config, model, Trainer(model, tiny_ids, config.train, CPU, heldout_ids=tiny_ids[:200])


def test_interrupted_and_resumed_training_equals_uninterrupted_bit_for_bit(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor, tmp_path: Path
) -> None:
    _, straight_model, straight = _trainer(tiny_vocab, tiny_ids, epochs=4)
    straight.fit()

    config, model, first = _trainer(tiny_vocab, tiny_ids, epochs=4)
    saved: list[Path] = []

    def stop_after_two(epoch: int) -> None:
        path = tmp_path / "last.pt"
        checkpoint.save(
            path, checkpoint.make_payload(config, tiny_vocab, model, epoch=epoch, trainer_state=first.state_dict())
        )
        saved.append(path)
        if epoch == 2:
            raise KeyboardInterrupt  # stands for the process dying right after this checkpoint

    with pytest.raises(KeyboardInterrupt):
        first.fit(on_checkpoint=stop_after_two, checkpoint_every=1)
    torch.manual_seed(12345)  # the global RNG is wherever it is; the checkpoint brings its own state back

    config, resumed_model, resumed = _trainer(tiny_vocab, tiny_ids, epochs=4)
    assert restore_training(checkpoint.load(saved[-1]), config, resumed_model, resumed) == 2
    result = resumed.fit()
    assert [h.epoch for h in result.history] == [3, 4]
    for name, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


def test_restore_refuses_a_checkpoint_of_other_settings_or_without_training_state(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor
) -> None:
    config, model, trainer = _trainer(tiny_vocab, tiny_ids, epochs=2)
    other = config.model_copy(update={"train": config.train.model_copy(update={"lr": 0.1})})
    payload = checkpoint.make_payload(other, tiny_vocab, model, epoch=1, trainer_state=trainer.state_dict())
    with pytest.raises(ResumeError, match=r"other settings \(train.lr\)"):
        restore_training(payload, config, model, trainer)
    final = checkpoint.make_payload(config, tiny_vocab, model, epoch=2)
    with pytest.raises(ResumeError, match="no training state"):
        restore_training(final, config, model, trainer)


def test_divergence_names_the_epoch_and_no_checkpoint_is_written_from_it(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor
) -> None:
    # SGD with weight decay far too strong for its learning rate: the weights flip sign and grow 9x a step.
    config = preset_config(
        "smoke",
        {"model": {"num_hiddens": 16}, "train": {"epochs": 30, "lr": 100.0, "weight_decay": 0.1, "device": "cpu"}},
    )
    torch.manual_seed(0)
    model = RNNLM.from_config(len(tiny_vocab), config.model)
    trainer = Trainer(model, tiny_ids, config.train, CPU)
    checkpointed: list[int] = []

    def on_checkpoint(epoch: int) -> None:
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"non-finite weights saved at {epoch}"
        checkpointed.append(epoch)

    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch \d+: ") as info:
        trainer.fit(on_checkpoint=on_checkpoint, checkpoint_every=1)
    assert info.value.epoch >= 2 and checkpointed == list(range(1, info.value.epoch))


def test_non_finite_weights_behind_a_finite_loss_are_never_checkpointed(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor
) -> None:
    # An epoch's loss is measured before its last update, so the weights can break while the loss looks fine.
    # Break one weight right after epoch 2's loss was read (the last update's effect, made certain).
    config, model, trainer = _trainer(tiny_vocab, tiny_ids, epochs=4)
    checkpointed: list[int] = []

    def on_epoch(stats) -> None:  # type: ignore[no-untyped-def]
        if stats.epoch == 2:
            with torch.no_grad():
                model.linear.weight[0, 0] = float("inf")

    with pytest.raises(TrainingDivergedError, match="epoch 2: the weights became NaN or infinite"):
        trainer.fit(on_epoch=on_epoch, on_checkpoint=checkpointed.append, checkpoint_every=1)
    assert checkpointed == [1]


def _mid_epoch_config(partition: str, epochs: int = 3, **train: object) -> RunConfig:
    # Dropout and Adam make the run depend on torch's generator and the optimizer state; eval_every_steps
    # puts evaluations in between: none of it may change the trajectory.
    return preset_config(
        "smoke",
        {
            "model": {"num_hiddens": 16, "dropout": 0.3},
            "train": {
                "epochs": epochs,
                "device": "cpu",
                "partition": partition,
                "optimizer": "adam",
                "lr": 0.01,
                "checkpoint_every_steps": 5,
                "eval_every_steps": 3,
                **train,
            },
        },
    )


def _mid_epoch_trainer(config: RunConfig, vocab: Vocab, ids: torch.Tensor) -> tuple[RNNLM, Trainer]:
    torch.manual_seed(config.train.seed)
    model = RNNLM.from_config(len(vocab), config.model)
    return model, Trainer(model, ids[:-300], config.train, CPU, heldout_ids=ids[-300:])


@pytest.mark.parametrize("partition", ["sequential", "random"])
def test_resumed_inside_an_epoch_equals_uninterrupted_bit_for_bit(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor, tmp_path: Path, partition: str
) -> None:
    config = _mid_epoch_config(partition)
    straight_model, straight = _mid_epoch_trainer(config, tiny_vocab, tiny_ids)
    straight_result = straight.fit()
    per_epoch = straight_result.history[0].step  # steps in epoch 1
    stop_at = next(s for s in range(per_epoch + 1, 2 * per_epoch) if s % 5 == 0)  # a checkpoint inside epoch 2

    model, first = _mid_epoch_trainer(config, tiny_vocab, tiny_ids)
    path = tmp_path / "last.pt"

    def die_at_stop(epoch: int) -> None:
        checkpoint.save(
            path, checkpoint.make_payload(config, tiny_vocab, model, epoch=epoch, trainer_state=first.state_dict())
        )
        if first.step == stop_at:
            raise KeyboardInterrupt  # the process dies right after this checkpoint

    with pytest.raises(KeyboardInterrupt):
        first.fit(on_checkpoint=die_at_stop)
    data = checkpoint.load(path)
    position = data["trainer_state"]["position"]
    assert data["epoch"] == 1 and data["trainer_state"]["step"] == stop_at
    assert position["epoch"] == 2 and position["batch"] == stop_at - per_epoch  # really inside epoch 2
    torch.manual_seed(12345)  # the global RNG is wherever it is; the checkpoint brings its own state back

    resumed_model, resumed = _mid_epoch_trainer(config, tiny_vocab, tiny_ids)
    assert restore_training(data, config, resumed_model, resumed) == 1
    result = resumed.fit()
    assert [h.epoch for h in result.history] == [2, 3] and result.steps_done == straight_result.steps_done
    for name, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name
    # Epoch 2's perplexity covers the whole epoch (the part before the checkpoint came with it), exactly.
    assert [h.train_perplexity for h in result.history] == [h.train_perplexity for h in straight_result.history[1:]]
    assert resumed.rng.getstate() == straight.rng.getstate()


def test_a_step_budget_can_be_raised_on_resume_and_continues_inside_the_epoch(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor
) -> None:
    whole = _mid_epoch_config("sequential", epochs=2)
    straight_model, straight = _mid_epoch_trainer(whole, tiny_vocab, tiny_ids)
    straight.fit()
    budget = straight.step - 4  # stops 4 steps before the end of epoch 2
    cut = _mid_epoch_config("sequential", epochs=2, max_steps=budget)
    model, first = _mid_epoch_trainer(cut, tiny_vocab, tiny_ids)
    saved: list[dict] = []
    first.fit(
        on_checkpoint=lambda e: saved.append(
            checkpoint.make_payload(cut, tiny_vocab, model, epoch=e, trainer_state=first.state_dict())
        )
    )
    assert first.step == budget and saved[-1]["trainer_state"]["position"] is not None

    # --max-steps may change on resume, never below the steps already done.
    assert "train.max_steps" in RESUMABLE
    lower = _mid_epoch_config("sequential", epochs=2, max_steps=budget - 1)
    with pytest.raises(ResumeError, match=f"already has {budget} steps done; --max-steps {budget - 1} would undo"):
        restore_training(saved[-1], lower, *_mid_epoch_trainer(lower, tiny_vocab, tiny_ids))
    resumed_model, resumed = _mid_epoch_trainer(whole, tiny_vocab, tiny_ids)
    restore_training(saved[-1], whole, resumed_model, resumed)
    result = resumed.fit()
    assert [(h.epoch, h.partial) for h in result.history] == [(2, False)] and resumed.step == straight.step
    for name, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


def test_trainer_states_from_before_step_counting_still_resume(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor, tmp_path: Path
) -> None:
    # Checkpoints written before steps were counted have neither "step" nor "position": an epoch boundary.
    _, straight_model, straight = _trainer(tiny_vocab, tiny_ids, epochs=3)
    straight.fit()
    two, model, first = _trainer(tiny_vocab, tiny_ids, epochs=2)
    first.fit()
    old_state = first.state_dict()
    del old_state["step"], old_state["position"]
    path = checkpoint.save(
        tmp_path / "old.pt", checkpoint.make_payload(two, tiny_vocab, model, epoch=2, trainer_state=old_state)
    )
    config, resumed_model, resumed = _trainer(tiny_vocab, tiny_ids, epochs=3)
    assert restore_training(checkpoint.load(path), config, resumed_model, resumed) == 2
    assert resumed.step == 0  # unknown before: counted from the resume on
    assert [h.epoch for h in resumed.fit().history] == [3]
    for name, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name
