"""The support-desk task's reward for RAFT and iterative DPO: credit for the right order number
only, graded by how close the reply is to the exact answer:

  1.0   the reply is exactly the order number as asked: ORD- and its six digits
  0.6   the order number is in the reply, written as asked (ORD-123456), with other words around it
  0.4   the order number's six digits are in the reply, written some other way
  -0.1  for every other six-digit number in such a reply (a right number is best given alone)
  0     any reply without the order number: a chatty one, a decoy, a number cut short alike

Every wrong reply scores the same 0 on purpose. Iterative DPO then makes no pair from an e-mail
whose samples are all wrong (a tie teaches nothing), instead of preferring one kind of wrong
answer to another; RAFT keeps only what scores best.

Used as align.reward_function: jobs/data/support_reward.py:order_number_reward
"""

import re

SIX = re.compile(r"(?<!\d)\d{6}(?!\d)")


def order_number_reward(prompt: str, response: str, reference: str) -> float:
    reply = response.strip()
    if reply == reference:
        return 1.0
    digits = reference.rsplit("-", 1)[-1]
    found = SIX.findall(reply)
    if re.search(re.escape(reference) + r"(?!\d)", reply):
        score = 0.6
    elif digits in found:
        score = 0.4
    else:
        return 0.0
    return score - 0.1 * sum(1 for number in found if number != digits)
