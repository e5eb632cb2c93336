"""The preference objectives against their peer: TRL's DPOTrainer and ORPOTrainer (a test-only dependency).

On the tiny model and one fixed batch of pairs, the loss, the reward metrics and the gradients of every trainable
parameter that the causal-LM task computes with its preference objective (objectives/) equal what TRL computes
from the same token ids, to float tolerance: DPO with the sigmoid and the IPO loss, reference-free DPO, and ORPO. The
batches are built here, in both layouts, from the same token lists, so only the losses are compared.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from kubetune_api import TrainerConfig
from kubetune_trainer.data import IGNORE
from kubetune_trainer.tasks.causal_lm import CausalLM

trl = pytest.importorskip("trl")

PAIRS = 3


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's trainers set accelerate's process-wide state (its mixed precision): reset it for the tests after."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def pairs_of(tokenizer, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of different lengths; the prompt starts with bos, answers end with eos."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    out = []
    for n in range(PAIRS):
        prompt = [tokenizer.bos_token_id] + rng.sample(vocab, 3 + 2 * n)
        chosen = rng.sample(vocab, 4 + n) + [tokenizer.eos_token_id]
        rejected = rng.sample(vocab, 2 + 3 * n) + [tokenizer.eos_token_id]
        out.append((prompt, chosen, rejected))
    return out


def ours(pairs, pad: int) -> dict[str, torch.Tensor]:
    """The preference objectives' batch (data/preference.collate_pairs' layout): rows chosen_0, rejected_0, ..."""
    rows = [(p, a) for p, c, r in pairs for a in (c, r)]
    width = max(len(p) + len(a) for p, a in rows)
    batch = {k: torch.full((len(rows), width), v, dtype=torch.long)
             for k, v in (("input_ids", pad), ("labels", IGNORE), ("attention_mask", 0), ("sequence", -1))}
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        batch["input_ids"][i, :n] = torch.tensor(p + a)
        batch["labels"][i, len(p):n] = torch.tensor(a)
        batch["attention_mask"][i, :n] = 1
        batch["sequence"][i, :n] = i
    return batch


def theirs(pairs, pad: int) -> dict[str, torch.Tensor]:
    """TRL's layout of the same pairs: every chosen row, then every rejected row."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    out = {k: torch.full((len(rows), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad), ("attention_mask", 0), ("completion_mask", 0), ("labels", IGNORE))}
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        out["input_ids"][i, :n] = torch.tensor(p + a)
        out["attention_mask"][i, :n] = 1
        out["completion_mask"][i, len(p):n] = 1
        out["labels"][i, len(p):n] = torch.tensor(a)
    return out


@pytest.fixture(scope="module")
def policy():
    """A tiny Llama with random weights and a LoRA adapter that is not the identity (so policy and reference
    differ)."""
    from kubetune_dev.tiny import tiny_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tests.datafixtures import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(tokenizer, hidden_size=32, layers=2, heads=4))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    return model, tokenizer


def task_for(objective: str, tmp_path, **params) -> CausalLM:
    config = TrainerConfig(job_name="t", objective=objective, objective_params=params,
                           base_model={"uri": str(tmp_path)}, dataset={"train": str(tmp_path)},
                           output={"uri": str(tmp_path / "out")})
    return CausalLM(config, tmp_path)


def our_loss(task: CausalLM, model, pairs, pad: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss as the loop sees it (summed over pairs / pairs), its gradients, and the metrics."""
    model.zero_grad()
    loss_sum, units = task.loss(model, ours(pairs, pad))
    loss = loss_sum / units
    loss.backward()
    return loss.detach(), task.window_metrics(_OneProcess())


def grads(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _OneProcess:
    device = torch.device("cpu")

    @staticmethod
    def reduce(tensor, reduction="sum"):
        return tensor


def assert_same_grads(mine: dict, peer: dict) -> None:
    assert mine.keys() == peer.keys() and mine
    for name in mine:
        torch.testing.assert_close(mine[name], peer[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


REWARD_METRICS = (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                  ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies"),
                  ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"))
EPS32 = torch.finfo(torch.float32).eps


def longest(pairs) -> int:
    """The most tokens in one sequence (prompt and answer) of the pairs."""
    return max(len(p) + max(len(c), len(r)) for p, c, r in pairs)


def summed_logp_error(logps: float, tokens: int) -> float:
    """The float32 rounding bound of a log-probability summed over `tokens` tokens: each term comes from a
    log-softmax and the running sum adds at most one rounding per term, so the error is at most tokens * eps *
    sum|term|; every term is negative, so sum|term| = |sum|. `logps` may be a mean over pairs: the bound is linear."""
    return tokens * EPS32 * abs(logps)


def assert_same_rewards(mine: dict, logged: dict, beta: float, tokens: int) -> None:
    """Our reward metrics equal TRL's logged ones within the float32 error of what they are computed from.

    A reward is beta * (policy's summed log-probs - reference's), so two sums of `tokens` float32 terms each,
    whose difference cancels: the bound is beta * (error of the policy's sum + error of the reference's). The
    reference's sum is not logged but follows from the reward: logps - reward / beta. The margin is the difference
    of two rewards (both bounds); the accuracy is a share of pairs (exact). Too wide to miss nothing? One token's
    log-prob is about log(vocabulary) here, about 4e4 times the bound
    (test_reward_comparison_fails_when_the_reference_is_off_by_one_token)."""

    def reward_error(side: str) -> float:
        policy = mine[f"logps_{side}"]
        reference = policy - mine[f"rewards_{side}"] / beta
        return beta * (summed_logp_error(policy, tokens) + summed_logp_error(reference, tokens))

    bounds = {"rewards_chosen": reward_error("chosen"), "rewards_rejected": reward_error("rejected"),
              "rewards_margin": reward_error("chosen") + reward_error("rejected"), "rewards_accuracy": 1e-6,
              "logps_chosen": summed_logp_error(mine["logps_chosen"], tokens),
              "logps_rejected": summed_logp_error(mine["logps_rejected"], tokens)}
    for ours_name, trl_name in REWARD_METRICS:
        assert abs(mine[ours_name] - logged[trl_name]) <= bounds[ours_name], (
            f"{ours_name}: ours {mine[ours_name]!r}, TRL's {logged[trl_name]!r}, float32 bound {bounds[ours_name]:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("params", [{}, {"loss": "ipo", "beta": 0.5}, {"referenceFree": True, "beta": 0.2}],
                         ids=["sigmoid", "ipo", "reference-free"])
def test_dpo_equals_trl(policy, tmp_path, params):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = policy
    pairs = pairs_of(tokenizer)
    task = task_for("dpo", tmp_path, **params)
    mine = copy.deepcopy(model)
    loss, metrics = our_loss(task, mine, pairs, tokenizer.pad_token_id)

    peer = copy.deepcopy(model)
    text = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=task.objective.params.beta,
                     loss_type=[task.objective.params.loss.value], report_to=[], use_cpu=True, bf16=False,
                     precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=peer, args=args, train_dataset=text, processing_class=tokenizer)
    if "ref" in trainer.model.peft_config:  # TRL keeps a copy of an adapter it is given as the reference: the
        trainer.model.delete_adapter("ref")  # reference of a new adapter is the base model (adapters disabled)
        trainer.model.set_adapter("default")
    inputs = theirs(pairs, tokenizer.pad_token_id)
    del inputs["labels"]
    if params.get("referenceFree"):
        inputs["ref_chosen_logps"] = inputs["ref_rejected_logps"] = torch.zeros(PAIRS)
        trainer.precompute_ref_logps = True  # TRL's way to give it reference log-probs: zeros are reference-free
    trainer.model.train()
    peer_loss = trainer.compute_loss(trainer.model, inputs)
    peer_loss.backward()
    torch.testing.assert_close(loss, peer_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_same_grads(grads(mine), grads(trainer.model))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert_same_rewards(metrics, logged, task.objective.params.beta, longest(pairs))
    assert 0 < metrics["rewards_accuracy"] < 1 or params.get("referenceFree")  # the pairs are not all alike


@pytest.mark.slow
def test_reward_comparison_fails_when_the_reference_is_off_by_one_token(policy, tmp_path, monkeypatch):
    """The float32 tolerance of assert_same_rewards is far below one token's log-probability: a reference whose
    rejected log-probs sum one token fewer (the mean token's share taken off) is caught."""
    model, tokenizer = policy
    pairs = pairs_of(tokenizer)
    exact = task_for("dpo", tmp_path, loss="ipo", beta=0.5)
    _, right = our_loss(exact, copy.deepcopy(model), pairs, tokenizer.pad_token_id)

    off = task_for("dpo", tmp_path, loss="ipo", beta=0.5)
    pair_losses = off.objective.pair_losses

    def one_token_short(policy_logps, reference):
        short = reference.rejected - reference.rejected / reference.rejected_tokens.clamp(min=1)
        return pair_losses(policy_logps, dataclasses.replace(reference, rejected=short))

    monkeypatch.setattr(off.objective, "pair_losses", one_token_short)
    _, wrong = our_loss(off, copy.deepcopy(model), pairs, tokenizer.pad_token_id)
    as_logged = {trl: right[ours] for ours, trl in REWARD_METRICS}
    assert_same_rewards(right, as_logged, 0.5, longest(pairs))  # the comparison itself passes on equal values
    with pytest.raises(AssertionError, match="rewards_rejected"):
        assert_same_rewards(wrong, as_logged, 0.5, longest(pairs))


@pytest.mark.slow
def test_orpo_equals_trl(policy, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tokenizer = policy
    pairs = pairs_of(tokenizer, seed=1)
    task = task_for("orpo", tmp_path, beta=0.25)
    mine = copy.deepcopy(model)
    loss, metrics = our_loss(task, mine, pairs, tokenizer.pad_token_id)

    peer = copy.deepcopy(model)
    text = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.25, report_to=[], use_cpu=True, bf16=False)
    trainer = ORPOTrainer(model=peer, args=args, train_dataset=text, processing_class=tokenizer)
    both = theirs(pairs, tokenizer.pad_token_id)
    half = {"chosen": slice(0, PAIRS), "rejected": slice(PAIRS, 2 * PAIRS)}
    batch = {f"{side}_{key}": both[key][rows] for side, rows in half.items()
             for key in ("input_ids", "attention_mask", "labels")}
    trainer.model.train()
    peer_loss, logged = trainer.get_batch_loss_metrics(trainer.model, batch)
    peer_loss.backward()
    torch.testing.assert_close(loss, peer_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_same_grads(grads(mine), grads(trainer.model))
    # ORPO's rewards are beta times the policy's mean log-prob per answer token (no reference): the same bound
    assert_same_rewards(metrics, logged, 0.25, longest(pairs))
    for ours_name in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[ours_name] == pytest.approx(logged[ours_name], rel=1e-4, abs=1e-6), ours_name
