"""The golden GRPO run's reward: the share of vowels among the letters of a completion. It is a
pure function of the text and differs between completions of a random model, so every group has
non-zero advantages and the GRPO loss is live from the first step."""


def vowel_share(prediction: str, example=None) -> float:
    letters = [c for c in prediction.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
