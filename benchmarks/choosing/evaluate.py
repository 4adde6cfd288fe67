"""Held-out sampled reward, per prompt: ``samples`` completions of every held-out prompt at temperature 1.

What it computes is what ``sparse_rl.demo.sampled_accuracy`` computes (sampling from the full softmax, reward = the
task's check on the decoded completion), organised so that several samples per prompt cost little more than one:

- every prompt of a task starts with the same few-shot text: its keys/values are computed once per batch and
  repeated for the batch's rows;
- prompts are grouped by the length of their remaining tokens, so no row is padded and plain causal attention
  applies;
- each prompt's remaining tokens run once; the cache is then repeated ``samples`` times for decoding.

Sampling uses its own ``torch.Generator`` seeded by ``seed``: the training RNG is untouched, and every model is
evaluated with the same random numbers (common random numbers make differences between runs less noisy).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def _common_prefix(sequences: list[list[int]]) -> int:
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):  # keep >= 1 token per prompt
        n += 1
    return n


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], samples: int, max_new_tokens: int, seed: int,
                       batch_prompts: int = 64, greedy: bool = False) -> list[list[str]]:
    """``samples`` completions of each prompt (temperature 1; ``greedy=True`` takes the argmax instead, for tests).
    Completions stop at the end-of-sequence token."""
    if samples < 1 or max_new_tokens < 1:
        raise ValueError(f"samples and max_new_tokens must be >= 1, got {samples} and {max_new_tokens}")
    ids = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    shared = _common_prefix(ids)
    prefix = torch.tensor([ids[0][:shared]], dtype=torch.long)
    by_length = defaultdict(list)
    for i, seq in enumerate(ids):
        by_length[len(seq) - shared].append(i)
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    training = model.training
    model.eval()
    results: list[list[str] | None] = [None] * len(prompts)
    try:
        for length in sorted(by_length):
            members = by_length[length]
            for start in range(0, len(members), batch_prompts):
                chunk = members[start:start + batch_prompts]
                tails = torch.tensor([ids[i][shared:] for i in chunk], dtype=torch.long)
                texts = _sample_chunk(model, prefix, tails, samples, max_new_tokens, generator, greedy, eos,
                                      tokenizer)
                for j, i in enumerate(chunk):
                    results[i] = texts[j * samples:(j + 1) * samples]
    finally:
        model.train(training)
    return results


def _sample_chunk(model, prefix, tails, samples, max_new_tokens, generator, greedy, eos, tokenizer) -> list[str]:
    rows = tails.shape[0]
    cache = None
    if prefix.shape[1]:
        cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(rows)
    out = model(input_ids=tails, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
    if samples > 1:
        cache.batch_repeat_interleave(samples)
        logits = logits.repeat_interleave(samples, dim=0)
    tokens = []
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        tokens.append(token)
        if step + 1 < max_new_tokens:
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
    texts = []
    for row in torch.cat(tokens, dim=1).tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def held_out_correct(model, tokenizer, rows: list[dict], samples: int, max_new_tokens: int, seed: int,
                     batch_prompts: int = 64) -> list[int]:
    """Per held-out row, how many of its ``samples`` completions have the right first integer (the reward)."""
    from sparse_rl.demo import first_integer_matches

    completions = sample_completions(model, tokenizer, [r["prompt"] for r in rows], samples, max_new_tokens, seed,
                                     batch_prompts)
    return [sum(first_integer_matches(c, r["answer"]) for c in texts) for texts, r in zip(completions, rows)]
