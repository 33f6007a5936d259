"""Training batches: student and teacher sequences around the same response tokens.

For rollout i with response tokens y_1..y_n (EOS included when generated):
    student ids  = student_prompt_i + y          teacher ids = teacher_prompt_i + y
Token y_j is predicted from the position just before it, so the loss reads the hidden states
at positions len(prompt) - 1 + j - 1 for j = 1..n in each sequence. Sequences are right-padded
(positions then count from 0 without position ids); `s_index` / `t_index` index the flattened
[B * L] hidden states, in the same order as `targets`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    s_ids: torch.Tensor  # [B, Ls] student prompt + response, right-padded
    s_attn: torch.Tensor  # [B, Ls] 1 on real tokens
    t_ids: torch.Tensor | None  # [B, Lt] teacher prompt + response (None: no teacher)
    t_attn: torch.Tensor | None
    s_index: torch.Tensor  # [R] flat positions in [B * Ls] predicting each response token
    t_index: torch.Tensor | None  # [R] the same tokens' positions in [B * Lt]
    targets: torch.Tensor  # [R] the response tokens
    row: torch.Tensor  # [R] which rollout each response token belongs to

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def pad(seqs: list[list[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] padded to the longest sequence (on the right, or the left for `generate`)
    and the attention mask (1 on real tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        attn[i, cols] = 1
    return ids, attn


def _positions(prompts: list[list[int]], lengths: list[int], width: int) -> torch.Tensor:
    return torch.cat([
        torch.arange(len(p) - 1, len(p) - 1 + n, dtype=torch.long) + i * width
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ])


def build_batch(student_prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                teacher_prompts: list[list[int]] | None = None) -> Batch:
    """Token-id lists in, padded tensors and response-position indices out.

    Every prompt must be non-empty (position len(prompt) - 1 predicts the first response token).
    Rollouts with an empty response contribute no positions.
    """
    if any(len(p) == 0 for p in student_prompts) or (teacher_prompts and any(len(p) == 0 for p in teacher_prompts)):
        raise ValueError("prompts: every prompt needs at least one token")
    lengths = [len(r) for r in responses]
    s_ids, s_attn = pad([p + r for p, r in zip(student_prompts, responses)], pad_id)
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(responses)), torch.tensor(lengths, dtype=torch.long))
    s_index = _positions(student_prompts, lengths, s_ids.shape[1])
    t_ids = t_attn = t_index = None
    if teacher_prompts is not None:
        t_ids, t_attn = pad([p + r for p, r in zip(teacher_prompts, responses)], pad_id)
        t_index = _positions(teacher_prompts, lengths, t_ids.shape[1])
    return Batch(s_ids, s_attn, t_ids, t_attn, s_index, t_index, targets, row)
