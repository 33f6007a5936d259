"""TRL trainers on the built-in tiny Llama (random weights, saved at test time), and batches for
their loss hooks: what tests/integrations/test_trl.py and bench/trl_loss.py compare on."""

from __future__ import annotations

import warnings

import torch
from transformers import LlamaForCausalLM

from fastsd.model.load import build_tokenizer, tiny_config

warnings.filterwarnings("ignore", message=".*experimental.*")
# GKD's collator applies a chat template; the built-in tokenizer has none: the turns' text, in order
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def save_tiny(path, seed: int, **overrides) -> str:
    """A tiny Llama with random weights from `seed`, saved with the built-in tokenizer; its path."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(overrides.pop("vocab_size", len(tok)), **overrides))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def sd_trainer(kind: str, model_path: str, out_dir: str, **config):
    """TRL's SDPOTrainer or SDFTTrainer on `model_path` (the teacher too, loaded again from it)."""
    from datasets import Dataset

    common = dict(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=2, bf16=False,
                  num_generations=2, max_completion_length=4, **config)
    if kind == "sdpo":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        return SDPOTrainer(model=model_path, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                           args=SDPOConfig(**common), train_dataset=Dataset.from_dict({"prompt": ["1+1=", "2+2="]}),
                           processing_class=build_tokenizer())
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    data = Dataset.from_dict({"prompt": ["1+1=", "2+2="], "privileged_context": ["2", "4"]})
    return SDFTTrainer(model=model_path, args=SDFTConfig(**common), train_dataset=data,
                       processing_class=build_tokenizer())


def gkd_trainer(model_path: str, teacher_path: str, out_dir: str, **config):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    data = Dataset.from_dict({"messages": [[{"role": "user", "content": "1+1="},
                                            {"role": "assistant", "content": "2"}]] * 2})
    args = GKDConfig(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=2, bf16=False,
                     **config)
    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return GKDTrainer(model=model_path, teacher_model=teacher_path, args=args, train_dataset=data,
                      processing_class=tok)


def sd_batch(vocab: int, g: torch.Generator, *, b=3, prompt=5, teacher_prompt=9, completion=6, ragged=True):
    """A self-distillation batch as TRL's `_prepare_inputs` leaves it: left-padded prompts, right-
    padded completions (one row fully padded past its first token), the teacher's longer prompt
    ahead of the same completion, and one row out of SDPO's self-distillation mask (b >= 3).
    ragged=False: every token valid (the benchmark's batch)."""
    ids = lambda *shape: torch.randint(3, vocab, shape, generator=g)
    prompt_mask = torch.ones(b, prompt, dtype=torch.long)
    completion_mask = torch.ones(b, completion, dtype=torch.long)
    teacher_mask = torch.ones(b, teacher_prompt + completion, dtype=torch.long)
    sd_mask = torch.ones(b)
    if ragged:
        prompt_mask[0, :2] = 0
        completion_mask[1, 3:] = 0
        completion_mask[2, 1:] = 0
        teacher_mask[:, teacher_prompt:] = completion_mask
        teacher_mask[1, :3] = 0
        sd_mask[2] = 0.0
    completion_ids = ids(b, completion) * completion_mask
    return dict(prompt_ids=ids(b, prompt) * prompt_mask, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, teacher_input_ids=torch.cat([ids(b, teacher_prompt), completion_ids], 1),
                teacher_attention_mask=teacher_mask, self_distillation_mask=sd_mask, advantages=torch.zeros(b))


def gkd_batch(vocab: int, g: torch.Generator, *, b=3, length=12, prompt=5, ragged=True):
    """input_ids, attention_mask (right padding in one row if ragged) and labels (-100 on the
    prompt and the padding)."""
    input_ids = torch.randint(3, vocab, (b, length), generator=g)
    attention_mask = torch.ones(b, length, dtype=torch.long)
    if ragged:
        attention_mask[1, 8:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_grads(trainer, inputs, **kwargs):
    """compute_loss on a copy of `inputs` in training mode, backward, and the gradients by name."""
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(inputs), **kwargs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads
