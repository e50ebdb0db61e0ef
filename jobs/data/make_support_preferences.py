"""Make the preference task: the support-desk e-mails of make_support_orders.py as chosen / rejected pairs.

Chosen is always the right answer, ORD- and the order's six digits. Rejected is one of two
mistakes, each checkable exactly (it never equals the answer):

- a chatty non-answer, the kind the base model writes (greets the customer, echoes the e-mail,
  apologises, asks for the number it was given); these teach the answer's form;
- a decoy: another number from the same e-mail written as an order number (ticket, customer id,
  postcode, case reference, ...), or the order's digits with one changed when the e-mail has no
  other number; these teach which number is the order's.

Same e-mails, same split as the support-orders task (train 2,000 pairs, held out 200), so the
held-out accuracy of a DPO-tuned model is the support-orders held-out accuracy. Fixed seed:

    python jobs/data/make_support_preferences.py            # writes support_preferences/
    python jobs/data/make_support_preferences.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from make_support_orders import write_or_check  # this folder is on sys.path when run as a script

SEED = 20261201
ORDERS = Path(__file__).parent / "support_orders"
HERE = Path(__file__).parent / "support_preferences"
SPLITS = {"train/train.json": "train/train.json", "heldout/heldout.json": "heldout/heldout.json"}
CHATTY_SHARE = 0.5


def chatty(rng: random.Random, email: str, digits: str) -> str:
    """A reply like the untuned model's: anything but the bare order number."""
    lines = [line.strip() for line in email.split("\n") if line.strip()]
    name = lines[-1] if len(lines) > 1 else "there"
    first = re.split(r"(?<=[.!?])\s", lines[1] if len(lines) > 2 else lines[0])[0]
    return rng.choice([
        f"Hello {name},\n\nI hope this message finds you well.",
        f"Dear {name},\n\nThank you for reaching out to us. I am sorry to hear about the trouble with your order.",
        f"Hello!\n\n{first}",
        "I'm sorry for the inconvenience. Could you please send me your order number so I can look into it?",
        f"{name},\n\nThank you for your e-mail. We will get back to you shortly.",
        f"Your order number is {digits}.",
        f"The order number in this e-mail is {digits[:3]} {digits[3:]}, and I will pass it on to the team.",
        "You are a support-desk assistant. Please reply to the customer's e-mail.",
    ])


def decoy(rng: random.Random, email: str, digits: str) -> str:
    """Another number of the e-mail as an order number, or the order's digits with one changed."""
    others = [d for d in re.findall(r"\d{4,}", email) if d != digits and d not in digits]
    if others:
        return f"ORD-{rng.choice(others)}"
    at = rng.randrange(6)
    changed = str((int(digits[at]) + rng.randint(1, 9)) % 10)
    return f"ORD-{digits[:at]}{changed}{digits[at + 1:]}"


def pairs(instances: list[dict], rng: random.Random) -> list[dict]:
    out = []
    for inst in instances:
        email, answer = inst["messages"][0]["content"], inst["messages"][1]["content"]
        digits = answer.removeprefix("ORD-")
        wrong = chatty(rng, email, digits) if rng.random() < CHATTY_SHARE else decoy(rng, email, digits)
        assert wrong != answer
        rejected = {**inst, "messages": [inst["messages"][0], {"role": "assistant", "content": wrong}]}
        out.append({"chosen": inst, "rejected": rejected})
    return out


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    files = {}
    for target, source in SPLITS.items():
        instances = json.loads((ORDERS / source).read_text(encoding="utf-8"))["instances"]
        rows = pairs(instances, rng)
        files[target] = json.dumps({"type": "paired_conversation", "instances": rows}, indent=1, ensure_ascii=False) + "\n"
    return files


def main() -> int:
    return write_or_check(build(), HERE, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
