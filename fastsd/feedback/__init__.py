"""The step's feedback stage: what the self-teacher reads (a reference, a critic's critique), or the
reward's group advantage (grpo); the prompts and chat templates of both sides; the critics.

    conditions.py     `feedback` (entry point): each rollout's teacher prompt or advantage, by condition
    prompts.py        student and teacher prompts: templates and the tokenizer's chat template
    critic.py         the critic interface and the built-in task's exact critic
    http_critic.py    a frozen LLM critic behind an OpenAI-compatible server
    critic_transport.py  its requests: concurrent, retried (Retry-After), bounded in time and size
    critic_reply.py   its reply checked against the student's steps and made a critique
    critic_cache.py   its validated replies cached on disk by request
    critic_prompt.py  what the HTTP critic is asked, and the critique the teacher reads (format=free)
"""

from .conditions import feedback
from .critic import ArithCritic, Critic, Critique

__all__ = ["ArithCritic", "Critic", "Critique", "feedback"]
