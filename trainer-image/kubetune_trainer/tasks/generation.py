"""causal-lm with evaluation.generation: generate an answer for each test prompt and score it against the reference.

The test split's (unpacked) examples already say what is prompt and what is answer: the prompt is every token
before the first trained label, the reference the first run of trained tokens (the completion or instruction
output; in a multi-turn chat the first assistant turn, the later turns are left out). Text records have no
prompt and are skipped.

Each process generates greedily for its share of the prompts (prompts[rank::processes]); the (prediction,
reference) pairs are gathered and scored in every process with sacrebleu and rouge-score: exact match (after
collapsing whitespace), corpus BLEU (0-100) and the mean ROUGE-L F-measure.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data.tokenize import IGNORE, Example, bos_prefix
from .base import Beat

if TYPE_CHECKING:
    import torch

BATCH_SIZE = 8  # prompts per generate call
SAMPLES = 3  # (prompt, reference, prediction) triples kept for the manifest
# End-of-turn markers of common chat templates (ChatML, Llama 3, Gemma, Phi-3): generation stops at them too.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
NO_PROMPTS = ("no test record has a prompt to generate from (text records are trained on every token, so there is "
              "nothing to condition on): use the chat, sharegpt, instruction or completion format for generation "
              "metrics")


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]  # what the model is given: everything before the first trained token
    reference: str  # the first trained span, decoded without special tokens (eos, end of turn), stripped


def prompts(examples: Sequence[Example], tokenizer, max_samples: int) -> list[Prompt]:
    """The first `max_samples` examples that have a prompt, as (prompt ids, reference text).

    An example has no prompt when only the tokenizer's leading special tokens (bos) come before its first trained
    token, or, for a tokenizer without any, when only the first token does (it is never trained, so a text record
    looks like that): text records, whose every token is trained."""
    prefix = bos_prefix(tokenizer)
    out: list[Prompt] = []
    for example in examples:
        if len(out) >= max_samples:
            break
        labels = example.labels
        start = next((i for i, label in enumerate(labels) if label != IGNORE), None)
        if start is None:
            continue
        prompt = list(example.input_ids[:start])
        content = prompt[len(prefix):] if prefix and prompt[: len(prefix)] == prefix else prompt
        if not content or (not prefix and start == 1):
            continue
        end = start
        while end < len(labels) and labels[end] != IGNORE:
            end += 1
        reference = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=True).strip()
        out.append(Prompt(prompt, reference))
    return out


def generation_metrics(model, tokenizer, prompts: Sequence[Prompt], spec, accelerator, beat: Beat,
                       sharded: bool) -> dict[str, Any]:
    """Generate for every prompt (each process its share) and score the answers; a collective, every process
    gets the same dict: exact_match (share, 0-1), bleu (0-100), rouge_l (0-1), generated (how many) and samples
    (the first SAMPLES prompts with their reference and prediction). {"note": ...} when there are no prompts.

    `sharded` (FSDP): every forward pass is a collective, see answer_share."""
    if not prompts:
        return {"note": NO_PROMPTS}
    rank, processes = accelerator.process_index, accelerator.num_processes
    generator = model if sharded else accelerator.unwrap_model(model)  # DDP's wrapper has no generate
    pairs = answer_share(generator, tokenizer, prompts, spec.max_new_tokens, rank, processes, accelerator, beat,
                         sharded)
    if processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)
    return report(pairs, prompts, tokenizer)


def answer_share(model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, rank: int, processes: int,
                 accelerator=None, beat: Beat | None = None, sharded: bool = False) -> list[tuple[int, str]]:
    """(prompt index, generated answer) for this process's share of the prompts, prompts[rank::processes].

    `sharded`: under FSDP every process must make the same forward passes, so every process gets as many prompts
    (a short share is topped up with a repeat of prompt 0, whose answer is dropped), hence as many generate calls,
    and `synced_gpus` keeps a process whose batch is done stepping with the others until all are (rather than
    min_new_tokens, which would forbid eos and change the answers)."""
    mine = share(len(prompts), rank, processes, equal=sharded)
    answers = generate(model, tokenizer, [prompts[i if i is not None else 0].input_ids for i in mine],
                       max_new_tokens, accelerator, beat, synced=sharded)
    return [(i, answer) for i, answer in zip(mine, answers, strict=True) if i is not None]


def report(pairs: Sequence[tuple[int, str]], prompts: Sequence[Prompt], tokenizer) -> dict[str, Any]:
    """The scores of the gathered (prompt index, answer) pairs against the prompts' references, in prompt order,
    and the first SAMPLES of them for the manifest."""
    predictions = dict(pairs)
    ordered = sorted(predictions)
    result = score([predictions[i] for i in ordered], [prompts[i].reference for i in ordered])
    result["samples"] = [
        {"prompt": tokenizer.decode(prompts[i].input_ids), "reference": prompts[i].reference,
         "prediction": predictions[i]}
        for i in ordered[:SAMPLES]
    ]
    return result


def share(n: int, rank: int, processes: int, equal: bool = False) -> list[int | None]:
    """This process's prompt indices, rank::processes; with `equal`, topped up with None so every process has
    ceil(n / processes) of them."""
    mine: list[int | None] = list(range(rank, n, processes))
    if equal:
        mine += [None] * (math.ceil(n / processes) - len(mine))
    return mine


def stop_ids(tokenizer, model=None) -> list[int]:
    """The tokens generation stops at: eos, the chat end-of-turn marker the tokenizer has, and the model's own
    generation_config eos tokens (an instruct model's end of turn)."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(i for i in ids if i is not None))


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a batch padded on the left, so every prompt ends where generation starts
    (whatever the tokenizer's padding_side)."""
    import torch  # torch: not for kubetune validate

    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long, device=device)
    return ids, mask


def generate(model, tokenizer, sequences: list[list[int]], max_new_tokens: int, accelerator=None,
             beat: Beat | None = None, synced: bool = False) -> list[str]:
    """Greedy answers to the prompts (token ids), decoded up to the first stop token, without special tokens,
    stripped; in eval mode, under the accelerator's autocast. `synced`: see answer_share."""
    import torch  # torch: not for kubetune validate

    if not sequences:  # more processes than prompts (not sharded: nobody waits for this one)
        return []
    stops = stop_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        with torch.no_grad(), _root_gathered(model, sequences[0][:1], device), autocast:
            answers = _generate_all(model, tokenizer, sequences, max_new_tokens, stops, pad_id, device, beat, synced)
    finally:
        model.train(was_training)
    return answers


def _generate_all(model, tokenizer, sequences, max_new_tokens, stops, pad_id, device, beat, synced) -> list[str]:
    answers = []
    for start in range(0, len(sequences), BATCH_SIZE):
        ids, mask = left_pad(sequences[start : start + BATCH_SIZE], pad_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                             synced_gpus=synced)
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((k for k, token in enumerate(row) if token in stops), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        if beat:
            beat()
    return answers


@contextlib.contextmanager
def _root_gathered(model, first: list[int], device):
    """FSDP2 gathers a shard group's weights in its forward hook, but generate through a PEFT wrapper (the root
    group) calls the inner model, never the root's forward: the root group's weights (embeddings, final norm,
    head) are gathered around it by hand. One forward through the root first: FSDP2 makes the first module to
    run forward its root, which must be the wrapper (generation may come before any training step)."""
    import torch  # torch: not for kubetune validate
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model(input_ids=torch.tensor([first], device=device), use_cache=False)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def normalise(text: str) -> str:
    return " ".join(text.split())


def score(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """exact_match, bleu and rouge_l of predictions against references (same order), and their number.
    rouge-score's default tokenizer keeps only ASCII letters and digits: other scripts count for nothing there."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n = len(predictions)
    if n == 0:
        return {"note": NO_PROMPTS}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return {
        "exact_match": sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)) / n,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge_l": sum(rouge) / n,
        "generated": n,
    }
