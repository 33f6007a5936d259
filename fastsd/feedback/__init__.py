"""The step's feedback stage: what the self-teacher reads (a reference, a critic's critique, a correct
sibling, a data column, or a user condition's context), or the reward's group advantage (grpo); the
prompts and chat templates of both sides; the critics.

    condition.py      the condition interface (`Condition`) and `register`
    registry.py       the conditions by name: the built-ins, user conditions by import path
    conditions.py     `feedback` (entry point) and the built-in conditions grpo, reference, critique, context
    peer.py           condition=peer: a correct sibling rollout as the teacher's demonstration
    prompts.py        student and teacher prompts: templates and the tokenizer's chat template
    critic.py         the critic interface and the built-in task's exact critic
    http_critic.py    a frozen LLM critic behind an OpenAI-compatible server
    critic_transport.py  its requests: concurrent, retried (Retry-After), bounded in time and size
    critic_reply.py   its reply checked against the student's steps and made a critique
    critic_cache.py   its validated replies cached on disk by request
    critic_prompt.py  what the HTTP critic is asked, and the critique the teacher reads (format=free)
"""

from .condition import Condition, register
from .conditions import feedback
from .critic import ArithCritic, Critic, Critique

__all__ = ["ArithCritic", "Condition", "Critic", "Critique", "feedback", "register"]
