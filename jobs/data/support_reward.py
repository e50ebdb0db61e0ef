"""The support-desk task's reward for RAFT and iterative DPO: partial credit on the way to the exact
answer, so a model that rarely answers exactly still has better and worse samples to learn from,
and every step up the ladder is a step toward the answer:

  1.0   the reply is exactly the order number as asked: ORD- and its six digits
  0.6   the order number is in the reply, written as asked (ORD-123456), with other words around it
  0.4   the order number's six digits are in the reply, written some other way
  0.2   the reply has the answer's form, ORD- and six digits, but another number (a decoy)
  0     anything else (a chatty reply, a number cut short)
  -0.1  for every other six-digit number in a reply that is not exactly right

Used as align.reward_function: jobs/data/support_reward.py:order_number_reward
"""

import re

SIX = re.compile(r"(?<!\d)\d{6}(?!\d)")
FORM = re.compile(r"ORD-\d{6}")


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
    elif FORM.fullmatch(reply):
        score = 0.2
    else:
        score = 0.0
    return score - 0.1 * sum(1 for number in found if number != digits)
