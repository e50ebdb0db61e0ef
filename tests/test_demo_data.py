"""The shipped task data is what its generator makes, and the held-out split is never trained on."""

import json
import sys


def test_generator_reproduces_the_committed_files(repo_python):
    proc = repo_python("jobs/data/make_support_orders.py", "--check")
    assert proc.returncode == 0, proc.stderr


def test_heldout_answers_never_appear_in_train():
    def answers(path):
        return {i["messages"][-1]["content"] for i in json.load(open(path))["instances"]}

    train = answers("jobs/data/support_orders/train/train.json")
    heldout = answers("jobs/data/support_orders/heldout/heldout.json")
    assert len(train) == 2000 and len(heldout) == 200 and not train & heldout


def test_preference_pairs_are_made_from_the_same_emails_and_never_agree(repo_python):
    proc = repo_python("jobs/data/make_support_preferences.py", "--check")
    assert proc.returncode == 0, proc.stderr
    for split in ("train/train", "heldout/heldout"):
        orders = json.load(open(f"jobs/data/support_orders/{split}.json"))["instances"]
        pairs = json.load(open(f"jobs/data/support_preferences/{split}.json"))["instances"]
        assert [p["chosen"] for p in pairs] == orders  # chosen: the right answer, as the SFT task has it
        rejected = [p["rejected"]["messages"][-1]["content"] for p in pairs]
        assert all(r != o["messages"][-1]["content"] for r, o in zip(rejected, orders))
        assert all(p["rejected"]["messages"][:-1] == p["chosen"]["messages"][:-1] for p in pairs)  # same prompt
        decoys = sum(r.startswith("ORD-") for r in rejected)
        assert 0.35 < decoys / len(pairs) < 0.65  # both kinds of mistake, about half each
