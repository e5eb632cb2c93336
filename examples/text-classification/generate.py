"""Make the text-classification example's data and base model: contract clauses in five categories, and a tiny
Llama pre-trained on them for a few seconds (no download).

    .venv/bin/python examples/text-classification/generate.py            # into examples/text-classification/work/

writes work/data/{train,validation,test}.jsonl ({"text": "...", "label": "..."}) and work/base-model/ (a Hugging
Face model folder). The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = ("confidentiality", "governing-law", "liability", "payment", "termination")

PARTIES = ["the Supplier", "the Customer", "the Licensee", "the Licensor", "the Contractor", "the Company",
           "the Service Provider", "the Client", "each Party", "the Receiving Party", "the Vendor", "the Buyer"]
PERIODS = ["thirty (30) days", "sixty (60) days", "ninety (90) days", "fifteen (15) business days",
           "six (6) months", "one (1) year", "two (2) years", "five (5) years", "forty-five (45) days"]
PLACES = [("England and Wales", "London"), ("the State of New York", "New York County"),
          ("the State of Delaware", "Wilmington"), ("Germany", "Frankfurt am Main"), ("Ireland", "Dublin"),
          ("the Province of Ontario", "Toronto"), ("Singapore", "Singapore"), ("the State of California",
                                                                               "San Francisco")]
AMOUNTS = ["USD 10,000", "EUR 250,000", "GBP 50,000", "the fees paid in the twelve (12) months before the claim",
           "USD 1,000,000", "twice the annual fees", "EUR 5,000 per incident"]
OPENERS = ["", "", "Subject to Section {n}, ", "Notwithstanding anything to the contrary, ", "Except as set out in "
           "Schedule {n}, ", "During the Term, ", "For the avoidance of doubt, "]

TEMPLATES: dict[str, list[str]] = {
    "confidentiality": [
        "{party} shall keep all Confidential Information strictly confidential and shall not disclose it to any "
        "third party without prior written consent.",
        "{party} shall use the Confidential Information solely to perform its obligations and shall protect it "
        "with at least the degree of care it uses for its own confidential information.",
        "The obligations of confidentiality in this clause survive for {period} after disclosure of the "
        "information.",
        "Confidential Information does not include information that is or becomes publicly available other than "
        "through a breach by {party}.",
        "{party} may disclose Confidential Information to its employees and advisers who need to know it and are "
        "bound by written duties of non-disclosure.",
        "On request, {party} shall return or destroy all documents containing Confidential Information and "
        "certify the destruction in writing within {period}.",
    ],
    "termination": [
        "Either Party may terminate this Agreement for convenience by giving {period} written notice to the other.",
        "{party} may terminate this Agreement with immediate effect if the other Party commits a material breach "
        "and fails to remedy it within {period} of notice.",
        "This Agreement terminates automatically if {party} becomes insolvent, enters liquidation or has a "
        "receiver appointed.",
        "On termination or expiry, {party} shall cease using the Services and the licences granted end "
        "immediately.",
        "This Agreement continues for an initial term of {period} and renews automatically unless terminated by "
        "notice before the renewal date.",
        "Termination does not affect any rights or remedies that accrued to {party} before the date of "
        "termination.",
    ],
    "liability": [
        "In no event shall {party} be liable for any indirect, incidental, special or consequential damages, "
        "including loss of profits or data.",
        "The total aggregate liability of {party} under this Agreement shall not exceed {amount}.",
        "Nothing in this Agreement limits or excludes liability for death or personal injury caused by negligence, "
        "or for fraud.",
        "{party} shall indemnify and hold harmless the other Party against all losses, damages and claims arising "
        "from its breach of this Agreement.",
        "The limitations of liability in this clause apply whether the claim arises in contract, tort, negligence "
        "or otherwise, up to {amount}.",
        "{party} is not liable for any failure or delay caused by events beyond its reasonable control, a force "
        "majeure event lasting up to {period}.",
    ],
    "payment": [
        "{party} shall pay each invoice within {period} of the invoice date by bank transfer to the account "
        "stated on the invoice.",
        "All fees are exclusive of VAT and other applicable taxes, which {party} shall pay in addition at the "
        "prevailing rate.",
        "Late payments bear interest at four percent (4%) per annum above the base rate from the due date until "
        "payment in full.",
        "The fees for the Services are {amount}, invoiced monthly in advance and payable in the invoiced "
        "currency.",
        "{party} may suspend the Services if any undisputed amount remains unpaid {period} after its due date.",
        "{party} may increase the fees once a year by giving {period} notice, by no more than the consumer price "
        "index.",
    ],
    "governing-law": [
        "This Agreement and any dispute arising out of it shall be governed by and construed in accordance with "
        "the laws of {law}.",
        "The courts of {court} shall have exclusive jurisdiction to settle any dispute or claim arising out of "
        "this Agreement.",
        "Any dispute shall be finally resolved by arbitration seated in {court} under the rules then in force, "
        "and the laws of {law} apply.",
        "The Parties irrevocably submit to the jurisdiction of the courts of {court} and waive any objection to "
        "venue there.",
        "This Agreement is governed by the laws of {law}, without regard to its conflict of laws principles.",
        "The United Nations Convention on Contracts for the International Sale of Goods does not apply; the laws "
        "of {law} govern.",
    ],
}
# Plain-English one-liners, as in a term sheet or a summary: the same categories in other words.
SHORT: dict[str, list[str]] = {
    "confidentiality": ["{party} must keep the other side's information secret.",
                        "Do not share confidential information with third parties.",
                        "Non-disclosure obligations last for {period}.",
                        "Trade secrets and business information stay private."],
    "termination": ["Either side may end the contract with {period} notice.",
                    "The contract can be cancelled if {party} breaches it.",
                    "The agreement ends automatically on insolvency.",
                    "Cancellation requires {period} written notice."],
    "liability": ["Liability is capped at {amount}.",
                  "Neither party is liable for indirect or consequential loss.",
                  "{party} indemnifies the other against third-party claims.",
                  "Damages are limited to {amount}."],
    "payment": ["Invoices are payable within {period}.",
                "{party} pays the fees monthly in advance.",
                "Late payment incurs interest.",
                "The price is {amount}, plus VAT."],
    "governing-law": ["The laws of {law} govern this contract.",
                      "Disputes go to the courts of {court}.",
                      "Any dispute is settled by arbitration in {court}.",
                      "Jurisdiction: the courts of {court}."],
}
NUMBERING = ["{a}.{b} ", "{a}.{b} ", "{a}.{b}.{c} ", "Clause {a}. ", "Section {a}.{b} ", "({c}) ", "", ""]


def clause(label: str, rng: random.Random) -> str:
    """One clause of a category: a template with its slots filled, sometimes with an opener, a second sentence
    of the same category or a clause number; or a plain-English one-liner."""
    law, court = rng.choice(PLACES)
    slots = {"party": rng.choice(PARTIES), "period": rng.choice(PERIODS), "amount": rng.choice(AMOUNTS),
             "law": law, "court": court}
    if rng.random() < 0.25:
        text = rng.choice(SHORT[label]).format(**slots)
        return text[0].upper() + text[1:]
    first, second = (t.format(**slots) for t in rng.sample(TEMPLATES[label], 2))
    opener = rng.choice(OPENERS).format(n=rng.randint(2, 19))
    if opener and not first.startswith("Confidential Information"):  # a defined term keeps its capital
        first = first[0].lower() + first[1:]
    text = opener + first
    text = text[0].upper() + text[1:]
    if rng.random() < 0.4:
        text += " " + second[0].upper() + second[1:]
    return rng.choice(NUMBERING).format(a=rng.randint(2, 24), b=rng.randint(1, 9), c=rng.randint(1, 6)) + text


def records(n: int, seed: int) -> list[dict]:
    """n labelled clauses, the classes balanced and shuffled."""
    rng = random.Random(seed)
    rows = [{"text": clause(LABELS[i % len(LABELS)], rng), "label": LABELS[i % len(LABELS)]} for i in range(n)]
    rng.shuffle(rows)
    return rows


def write_dataset(out: Path, train: int = 400, validation: int = 100, test: int = 200, seed: int = 0) -> dict:
    """The three splits as JSONL under out/; returns {split: path}. Splits use different seeds, so the test
    clauses are new combinations of the templates' pieces."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for offset, (split, n) in enumerate((("train", train), ("validation", validation), ("test", test))):
        paths[split] = out / f"{split}.jsonl"
        with paths[split].open("w", encoding="utf-8") as f:
            for row in records(n, seed * 1000 + offset):
                f.write(json.dumps(row) + "\n")
    return paths


def write_base_model(out: Path, seed: int = 0, pretrain_steps: int = 100) -> Path:
    """A tiny Llama (tokenizer and weights) pre-trained as a language model on unlabelled clauses."""
    from kubetune_dev.tiny import make_tiny_base

    texts = [r["text"] for r in records(2000, seed + 7)]
    return make_tiny_base(out, texts, vocab_size=1024, hidden_size=64, layers=2, heads=4,
                          pretrain_steps=pretrain_steps, seed=seed, log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--validation", type=int, default=100)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--no-model", action="store_true", help="write the data only")
    args = parser.parse_args()
    for split, path in write_dataset(args.out / "data", args.train, args.validation, args.test, args.seed).items():
        print(f"{split}: {path}")
    if not args.no_model:
        print(f"base model: {write_base_model(args.out / 'base-model', args.seed)}")


if __name__ == "__main__":
    main()
