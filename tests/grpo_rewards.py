"""A reward function for the GRPO tests, in TRL's calling convention, that judges the completion's token ids
(so a random-init model gets rewards that vary within a group). Imported by path (GRPO_REWARDS=FILE:id_reward),
also in torchrun workers."""


def id_reward(prompts, completions, completion_ids, **fields):
    return [float(sum(ids) % 5) for ids in completion_ids]


def residue_reward(prompts, completions, completion_ids, target, **fields):
    """1 when the completion's first token id is congruent to the record's `target` mod 4, else 0: a reward that
    depends on the prompt, about 1 in 4 for a model that has not learnt the task."""
    return [float(bool(ids) and ids[0] % 4 == t) for ids, t in zip(completion_ids, target, strict=True)]
