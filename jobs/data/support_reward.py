"""The support-desk task's reward for RAFT and iterative DPO: partial credit on the way to the exact
answer, so a model that never answers exactly yet still has better and worse samples to learn from.

  1.0   the reply is exactly the order number as asked: ORD- and its six digits
  0.6   the order number is in the reply, written as asked (ORD-123456), with other words around it
  0.4   the order number's six digits are in the reply, written some other way
  -0.3  for every other six-digit number in the reply (a gift card, a phone number: a wrong answer)

Used as align.reward_function: jobs/data/support_reward.py:order_number_reward
"""

import re

SIX = re.compile(r"(?<!\d)\d{6}(?!\d)")


def order_number_reward(prompt: str, response: str, reference: str) -> float:
    reply = response.strip()
    if reply == reference:
        return 1.0
    digits = reference.rsplit("-", 1)[-1]
    score = 0.0
    if re.search(re.escape(reference) + r"(?!\d)", reply):
        score = 0.6
    elif digits in SIX.findall(reply):
        score = 0.4
    score -= 0.3 * sum(1 for found in SIX.findall(reply) if found != digits)
    return score
