"""Generation metrics (evaluation.generation): prompts and references cut from the test examples, greedy answers of
a real tiny model, the scores against sacrebleu and rouge-score, and the same result however many processes.

Run as a script (by torchrun, see the slow test) it is the worker of a two-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kubetune_api import DataFormat, GenerationSpec, Hyperparameters, MethodSpec
from kubetune_trainer.data import IGNORE, Example, tokenize_record
from kubetune_trainer.tasks import generation
from kubetune_trainer.tasks.generation import NO_PROMPTS, Prompt

from tests.datafixtures import CHAT, COMPLETION, CORPUS, INSTRUCTION, TEXT, tiny_tokenizer

FMT = DataFormat
ROOT = Path(__file__).resolve().parents[2]
# Completion records of different lengths (left padding matters), 9 of them: two batches of BATCH_SIZE 8, and
# shares of 5 and 4 over two processes.
RECORDS = [{"prompt": " ".join(line.split()[:k]), "completion": " " + " ".join(line.split()[k:])}
           for line in CORPUS for k in (2, 4)][:9]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama under a LoRA adapter, as the trainer loads it, and its tokenizer."""
    from kubetune_dev.tiny import make_tiny_base

    folder = make_tiny_base(tmp_path_factory.mktemp("tiny"), CORPUS * 4, vocab_size=512, hidden_size=32, layers=2,
                            heads=2, pretrain_steps=0)
    return (folder, *load(folder))


def load(folder: Path):
    from kubetune_trainer.modeling import load_model, load_tokenizer

    return load_model(folder, MethodSpec(type="lora"), "no", Hyperparameters(seed=0)), load_tokenizer(folder)


def test_prompt_and_reference_are_cut_at_the_first_trained_token(tok):
    examples = [tokenize_record(r, f, tok, 512) for r, f in
                [(COMPLETION, FMT.completion), (INSTRUCTION, FMT.instruction), (CHAT, FMT.chat)]]
    completion, instruction, chat = generation.prompts(examples, tok, 10)
    assert tok.decode(completion.input_ids) == "<s>The capital of France is"
    assert completion.reference == "Paris."  # " Paris." + eos: no eos, stripped
    assert tok.decode(instruction.input_ids) == (
        "<s>### Instruction:\nTranslate to French.\n\n### Input:\ngood morning\n\n### Response:\n")
    assert instruction.reference == "bonjour"
    # a multi-turn chat: the prompt is the conversation up to the first assistant turn, which is the reference
    assert tok.decode(chat.input_ids) == tok.apply_chat_template(CHAT["messages"][:2], tokenize=False,
                                                                 add_generation_prompt=True)
    assert chat.reference == "Paris."
    for prompt, example in zip((completion, instruction, chat), examples, strict=True):
        n = len(prompt.input_ids)
        assert example.input_ids[:n] == prompt.input_ids and example.labels[n] != IGNORE
        assert set(example.labels[:n]) == {IGNORE}


def test_text_records_have_no_prompt(tok):
    import copy

    text, completion = tokenize_record(TEXT, FMT.text, tok, 512), tokenize_record(COMPLETION, FMT.completion, tok, 512)
    assert generation.prompts([text, text], tok, 10) == []
    no_bos = copy.deepcopy(tok)  # a tokenizer that puts nothing before a text (like Qwen's)
    no_bos._tokenizer.post_processor = None
    text, completion = (tokenize_record(TEXT, FMT.text, no_bos, 512),
                        tokenize_record(COMPLETION, FMT.completion, no_bos, 512))
    assert text.labels[0] == IGNORE and text.labels[1] != IGNORE
    assert [no_bos.decode(p.input_ids) for p in generation.prompts([text, completion], no_bos, 10)] == [
        "The capital of France is"]
    assert generation.generation_metrics(None, tok, [], GenerationSpec(), None, lambda: None, False) == {
        "note": NO_PROMPTS}


def test_max_samples_counts_the_records_with_a_prompt(tok):
    records = [(TEXT, FMT.text), (COMPLETION, FMT.completion), (TEXT, FMT.text), (INSTRUCTION, FMT.instruction),
               (CHAT, FMT.chat)]
    examples = [tokenize_record(r, f, tok, 512) for r, f in records]
    assert [p.reference for p in generation.prompts(examples, tok, 2)] == ["Paris.", "bonjour"]
    assert generation.prompts([Example([1, 2], [IGNORE, IGNORE])], tok, 2) == []  # nothing trained


def test_scores_are_the_libraries_scores():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "Paris  is\tthe capital.", "a dog", "naïve café au lait"]
    references = ["the cat sat on a mat", "Paris is the capital.", "the dog barks", "naïve café au lait"]
    scores = generation.score(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    assert scores == pytest.approx({
        "exact_match": 0.5,  # whitespace is collapsed before comparing
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge_l": sum(rouge) / 4,
        "generated": 4,
    })
    assert 0 < scores["bleu"] < 100 and 0 < scores["rouge_l"] < 1


class Parrot(torch.nn.Module):
    """A model whose generate writes each prompt's reference, then an end of turn and more text (to be cut off)."""

    def __init__(self, tokenizer, prompts: list[Prompt]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = None
        end, more = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer(" and more")["input_ids"]
        self.answers = {tuple(p.input_ids): tokenizer(p.reference, add_special_tokens=False)["input_ids"] + [end] + more
                        for p in prompts}
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(), **kwargs})
        width = kwargs["max_new_tokens"]
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            assert mask == sorted(mask)  # left padded: the prompt ends where generation starts
            answer = self.answers[tuple(t for t, m in zip(ids, mask, strict=True) if m)]
            rows.append(ids + (answer + [kwargs["pad_token_id"]] * width)[:width])
        return torch.tensor(rows)


def test_a_model_that_writes_the_references_scores_full_marks(tok):
    from accelerate import Accelerator

    chat = {"messages": [{"role": "user", "content": "What does a Job do?"},
                         {"role": "assistant", "content": "A Job runs pods to completion on the nodes."}]}
    # BLEU counts up to 4-grams: references of 4 words or more, or it is 0 for any answer
    records = [(chat, FMT.chat)] * 3 + [(r, FMT.completion) for r in RECORDS]
    prompts = generation.prompts([tokenize_record(r, f, tok, 512) for r, f in records], tok, 100)
    parrot = Parrot(tok, prompts)
    beats = []
    result = generation.generation_metrics(parrot, tok, prompts, GenerationSpec(max_new_tokens=16),
                                           Accelerator(cpu=True), lambda: beats.append(1), False)
    assert {k: result[k] for k in ("exact_match", "bleu", "rouge_l", "generated")} == pytest.approx(
        {"exact_match": 1.0, "bleu": 100.0, "rouge_l": 1.0, "generated": 12})
    assert result["samples"] == [{"prompt": tok.decode(p.input_ids), "reference": p.reference,
                                  "prediction": p.reference} for p in prompts[:3]]
    assert len(beats) == len(parrot.calls) == 2  # 12 prompts, batches of 8
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for call in parrot.calls:
        assert not call["training"] and not call["grad"]
        assert (call["do_sample"], call["max_new_tokens"], set(call["eos_token_id"])) == (False, 16, stops)
    assert parrot.training  # the mode it came in


def test_a_real_model_generates_and_is_scored(tiny, monkeypatch):
    import sacrebleu
    from accelerate import Accelerator
    from rouge_score import rouge_scorer

    _, model, tokenizer = tiny
    prompts = generation.prompts([tokenize_record(r, FMT.completion, tokenizer, 128) for r in RECORDS], tokenizer, 9)
    spec = GenerationSpec(max_new_tokens=6)
    result = generation.generation_metrics(model, tokenizer, prompts, spec, Accelerator(cpu=True), lambda: None,
                                           False)
    pairs = generation.answer_share(model, tokenizer, prompts, 6, 0, 1)
    assert [i for i, _ in pairs] == list(range(9))
    assert result == generation.report(pairs, prompts, tokenizer)
    predictions, references = [a for _, a in pairs], [p.reference for p in prompts]
    assert any(predictions)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert result["rouge_l"] == pytest.approx(
        sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)) / 9)
    # left-padded batches answer like one prompt at a time
    monkeypatch.setattr(generation, "BATCH_SIZE", 1)
    assert generation.answer_share(model, tokenizer, prompts, 6, 0, 1) == pairs


def test_shares_gathered_from_two_processes_give_the_result_of_one(tiny):
    _, model, tokenizer = tiny
    assert generation.share(9, 0, 2) == [0, 2, 4, 6, 8]
    assert generation.share(9, 1, 2) == [1, 3, 5, 7]
    assert generation.share(9, 1, 2, equal=True) == [1, 3, 5, 7, None]
    assert generation.share(2, 2, 3, equal=True) == [None]
    assert generation.answer_share(model, tokenizer, [Prompt([1, 2], "x")], 6, 1, 2) == []  # nothing to do
    prompts = generation.prompts([tokenize_record(r, FMT.completion, tokenizer, 128) for r in RECORDS], tokenizer, 9)
    one = generation.report(generation.answer_share(model, tokenizer, prompts, 6, 0, 1), prompts, tokenizer)
    gathered = [pair for rank in (0, 1) for pair in generation.answer_share(model, tokenizer, prompts, 6, rank, 2)]
    assert generation.report(gathered, prompts, tokenizer) == one


def test_left_pad():
    ids, mask = generation.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.slow
def test_ddp_and_fsdp_over_two_processes_give_the_result_of_one(tiny, tmp_path):
    """The real collectives (gloo): DDP unwrapped for generate, and FSDP2, where every process makes the same
    forward passes (the odd prompt count leaves one process a filler) and generate runs through the PEFT wrapper."""
    from accelerate import Accelerator

    folder, model, tokenizer = tiny
    prompts = generation.prompts([tokenize_record(r, FMT.completion, tokenizer, 128) for r in RECORDS], tokenizer, 9)
    one = generation.generation_metrics(model, tokenizer, prompts, GenerationSpec(max_new_tokens=6),
                                        Accelerator(cpu=True), lambda: None, False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(folder), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        for rank in (0, 1):
            assert json.loads((tmp_path / f"{mode}-{rank}.json").read_text()) == one, (mode, rank)


def _worker(folder: Path, out: Path) -> None:
    from accelerate import Accelerator
    from kubetune_trainer import sharding

    accelerator = Accelerator(cpu=True)
    beats = []
    for mode in ("ddp", "fsdp"):
        model, tokenizer = load(folder)
        model = sharding.shard(model, accelerator.device) if mode == "fsdp" else accelerator.prepare(model)
        records = [tokenize_record(r, FMT.completion, tokenizer, 128) for r in RECORDS]
        result = generation.generation_metrics(model, tokenizer, generation.prompts(records, tokenizer, 9),
                                               GenerationSpec(max_new_tokens=6), accelerator,
                                               lambda: beats.append(1), mode == "fsdp")
        (out / f"{mode}-{accelerator.process_index}.json").write_text(json.dumps(result))
        if mode == "fsdp":  # training still works after generating (FSDP's root was the PEFT wrapper)
            ids = torch.tensor([records[0].input_ids])
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
