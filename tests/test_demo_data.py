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
