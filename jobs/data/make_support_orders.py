"""Make the demo task: find the order number in a customer-support e-mail, answer as ORD-NNNNNN.

E-mails mix the order number (written many ways) with decoys: tickets, tracking and invoice
numbers, customer ids, phone numbers, prices and dates. Fixed seed, no downloads:

    python jobs/data/make_support_orders.py            # writes train/ and heldout/ next to this file
    python jobs/data/make_support_orders.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20261123
N_TRAIN, N_HELDOUT = 2000, 200
HERE = Path(__file__).parent / "support_orders"
SYSTEM = (
    "You are a support-desk assistant. Read the customer's e-mail and reply with the order number "
    "only, written as ORD- followed by its six digits."
)

NAMES = ["Maria", "James", "Aiko", "Lars", "Priya", "Tomasz", "Fatima", "Diego", "Chen", "Olivia", "Kwame",
         "Sofia", "Noah", "Elena", "Ravi", "Hannah", "Mateo", "Yuki", "Ahmed", "Grace"]
PRODUCTS = ["wireless headphones", "standing desk", "coffee grinder", "running shoes", "phone case", "winter jacket",
            "desk lamp", "blender", "yoga mat", "backpack", "mechanical keyboard", "air purifier", "office chair",
            "electric kettle", "smart watch", "bed sheets", "camping tent", "water bottle"]
ISSUES = [
    "arrived damaged", "has not arrived yet", "is the wrong size", "stopped working after two days",
    "was charged twice", "is missing a part", "came in the wrong colour", "needs to be returned",
    "was delivered to the wrong address", "shows as delivered but I never got it",
]
ASKS = ["Can you help?", "Please advise.", "What are my options?", "I would like a refund.",
        "Could you send a replacement?", "Please look into this.", "How do I return it?", ""]
GREETINGS = ["Hi,", "Hello,", "Dear support team,", "Hi there,", "Good morning,", "Hello support,", ""]
SIGNOFFS = ["Thanks,", "Best regards,", "Kind regards,", "Cheers,", "Many thanks,", "Regards,"]


def order_forms(rng: random.Random, digits: str) -> str:
    forms = [
        f"order #{digits}", f"order number {digits}", f"Order No. {digits}", f"order {digits[:3]}-{digits[3:]}",
        f"ORD-{digits}", f"order ID {digits}", f"ord{digits}", f"purchase #{digits}", f"Order #: {digits}",
        f"order {digits[:3]} {digits[3:]}", f"order ref {digits}", f"ORD {digits}",
    ]
    return rng.choice(forms)


def decoys(rng: random.Random) -> list[str]:
    pool = [
        f"My ticket number is TCK-{rng.randint(10000, 99999)}.",
        f"The tracking number says 1Z{rng.randint(100, 999)}AA{rng.randint(10**9, 10**10 - 1)}.",
        f"Invoice INV-{rng.randint(2019, 2026)}-{rng.randint(1000, 9999)} is attached.",
        f"My customer ID is {rng.randint(10000, 99999)}.",
        f"You can call me on +1 {rng.randint(200, 989)}-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}.",
        f"I paid ${rng.randint(10, 900)}.{rng.randint(0, 99):02d} for it.",
        f"It was delivered on {rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(2023, 2026)}.",
        f"The postcode is {rng.randint(10000, 99999)}.",
        f"Case reference {rng.randint(100000, 999999)}-C was closed without an answer.",
        f"The gift card code was GC{rng.randint(100000, 999999)}.",
    ]
    return rng.sample(pool, k=rng.randint(1, 3))


def email(rng: random.Random) -> tuple[str, str]:
    digits = f"{rng.randint(100000, 999999)}"
    product, issue = rng.choice(PRODUCTS), rng.choice(ISSUES)
    mention = order_forms(rng, digits)
    core = rng.choice([
        f"The {product} from my {mention} {issue}.",
        f"I am writing about {mention}: the {product} {issue}.",
        f"My {product} {issue}. It was {mention}.",
        f"Regarding {mention}, the {product} {issue}.",
        f"The {product} I bought ({mention}) {issue}.",
    ])
    parts = [core] + decoys(rng)
    rng.shuffle(parts)
    if parts[0] != core and rng.random() < 0.5:  # the order mention often comes first
        parts.remove(core)
        parts.insert(0, core)
    body = " ".join(parts + [rng.choice(ASKS)]).strip()
    greeting, name = rng.choice(GREETINGS), rng.choice(NAMES)
    text = "\n\n".join(p for p in [greeting, body, f"{rng.choice(SIGNOFFS)}\n{name}"] if p)
    return text, f"ORD-{digits}"


def instance(text: str, answer: str) -> dict:
    return {"system": SYSTEM, "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    seen: set[str] = set()
    items = []
    while len(items) < N_TRAIN + N_HELDOUT:
        text, answer = email(rng)
        if answer in seen:  # no order number appears in both splits
            continue
        seen.add(answer)
        items.append(instance(text, answer))
    files = {"train/train.json": items[:N_TRAIN], "heldout/heldout.json": items[N_TRAIN:]}
    return {name: json.dumps({"type": "conversation", "instances": rows}, indent=1, ensure_ascii=False) + "\n"
            for name, rows in files.items()}


def write_or_check(files: dict[str, str], here: Path, description: str) -> int:
    """A generator's command line: write ``files`` under ``here``, or with --check exit 1 if the
    committed files differ."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args()
    stale = []
    for name, text in files.items():
        path = here / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("stale: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return write_or_check(build(), HERE, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
