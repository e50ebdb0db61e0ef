"""Make the online-alignment task: the support-desk e-mails of make_support_orders.py, each after
one worked example (an example e-mail and its right answer, as an earlier user / assistant turn).

The base model never answers the plain task exactly, so sampling from it gives RAFT and iterative
DPO nothing right to keep; after one example it does, some of the time (about 1 in 8 samples),
which is what reward-ranked training needs to start from. Same e-mails and split as the
support-orders task (train 2,000, held out 200); every instance's example is a different e-mail,
never one of the task's own. Fixed seed:

    python jobs/data/make_support_oneshot.py            # writes support_oneshot/
    python jobs/data/make_support_oneshot.py --check    # exit 1 if the committed files differ
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from make_support_orders import email, write_or_check  # this folder is on sys.path when run as a script

SEED = 20261202
ORDERS = Path(__file__).parent / "support_orders"
HERE = Path(__file__).parent / "support_oneshot"
SPLITS = ("train/train.json", "heldout/heldout.json")


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    splits = {name: json.loads((ORDERS / name).read_text(encoding="utf-8"))["instances"] for name in SPLITS}
    taken = {inst["messages"][-1]["content"] for rows in splits.values() for inst in rows}
    files = {}
    for name, rows in splits.items():
        out = []
        for inst in rows:
            while True:
                text, answer = email(rng)
                if answer not in taken:
                    break
            example = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            out.append({"system": inst["system"], "messages": example + inst["messages"]})
        files[name] = json.dumps({"type": "conversation", "instances": out}, indent=1, ensure_ascii=False) + "\n"
    return files


def main() -> int:
    return write_or_check(build(), HERE, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
