"""
The demo's built-in task: short explanations under verifiable rules, with a reward anyone can read.

Each prompt asks why something happens, under a few rules: use a given keyword, stay under a word limit, and one or two
style rules (no commas, only lowercase letters, a bulleted list of N items). Each rule scores 1 when it is met and
partial credit otherwise (a 30-word answer to a 20-word limit scores 20/30; each comma or uppercase letter halves,
thirds... the score). The reward is the mean over the prompt's rules, times a gate against degenerate answers: at least
5 words (an empty answer meets a word limit and "no commas") and mostly distinct words (repeating the keyword does not
make an answer). The reward is in [0, 1].
"""

import dataclasses
import random
import re
from dataclasses import dataclass


# A word: letters and digits, with inner apostrophes ("it's"); quotes around a word are not part of it
WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z0-9]+)*")
# A list item: a line starting with a dash, a star or a bullet, then text on the same line
BULLET = re.compile(r"^[ \t]*[-*•][ \t]+\S", re.MULTILINE)
MIN_WORDS = 5
# Distinct words over all words below which an answer counts as repetitive, scaled down proportionally
MIN_DISTINCT_FRACTION = 0.6

TOPICS = [
    ("the sky looks blue", "light"),
    ("plants need sunlight", "energy"),
    ("we should drink water", "body"),
    ("the moon has phases", "orbit"),
    ("exercise is healthy", "heart"),
    ("bees matter", "flowers"),
    ("ice floats on water", "dense"),
    ("people sleep", "brain"),
    ("the seasons change", "tilt"),
    ("rainbows form", "rain"),
    ("bread rises", "yeast"),
    ("volcanoes erupt", "magma"),
    ("leaves change color in autumn", "chlorophyll"),
    ("the ocean is salty", "salt"),
    ("birds migrate", "winter"),
    ("we recycle paper", "trees"),
    ("stars twinkle", "atmosphere"),
    ("metal feels cold", "heat"),
    ("cats purr", "content"),
    ("thunder follows lightning", "sound"),
    ("onions make people cry", "eyes"),
    ("the desert is dry", "rain"),
    ("bicycles stay upright", "balance"),
    ("coffee keeps people awake", "caffeine"),
    ("wounds heal", "cells"),
    ("magnets attract iron", "field"),
    ("music helps people relax", "mood"),
    ("libraries are useful", "books"),
    ("snow is white", "light"),
    ("the wind blows", "pressure"),
    ("fish breathe underwater", "gills"),
    ("a compass points north", "magnetic"),
    ("teeth need brushing", "bacteria"),
    ("clouds float", "droplets"),
    ("trees grow tall", "sunlight"),
    ("bananas turn brown", "ripe"),
    ("the heart beats", "blood"),
    ("airplanes fly", "wings"),
    ("shadows change length", "sun"),
    ("salt melts ice", "freezing"),
    ("children learn languages quickly", "brain"),
    ("honey does not spoil", "sugar"),
    ("the tide rises", "moon"),
    ("glass is transparent", "light"),
    ("frogs live near water", "skin"),
    ("soap cleans hands", "germs"),
    ("mountains are cold at the top", "air"),
    ("owls hunt at night", "eyes"),
]


@dataclass(frozen=True)
class Rules:
    """The rules of one prompt. `bullets` is the number of list items asked for (0: no list asked)."""

    keyword: str
    max_words: int
    no_commas: bool = False
    lowercase: bool = False
    bullets: int = 0

    def instructions(self) -> list[str]:
        instructions = [f"use the word '{self.keyword}'", f"use at most {self.max_words} words"]
        if self.no_commas:
            instructions.append("do not use any commas")
        if self.lowercase:
            instructions.append("write only in lowercase letters")
        if self.bullets:
            instructions.append(f"answer as a bulleted list of exactly {self.bullets} items starting with '-'")
        return instructions

    def scores(self, text: str) -> dict[str, float]:
        """Partial credit in [0, 1] for each rule of the prompt."""
        words = WORD.findall(text)
        scores = {
            "keyword": float(self.keyword.lower() in (word.lower() for word in words)),
            "max_words": 1.0 if len(words) <= self.max_words else self.max_words / len(words),
        }
        if self.no_commas:
            scores["no_commas"] = 1.0 / (1 + text.count(","))
        if self.lowercase:
            scores["lowercase"] = 1.0 / (1 + sum(character.isupper() for character in text))
        if self.bullets:
            scores["bullets"] = max(0.0, 1.0 - abs(len(BULLET.findall(text)) - self.bullets) / self.bullets)
        return scores


def gate(text: str) -> float:
    """1 for an answer of at least `MIN_WORDS` mostly distinct words; less if shorter or repetitive; 0 if empty."""
    words = [word.lower() for word in WORD.findall(text)]
    if not words:
        return 0.0
    enough = min(1.0, len(words) / MIN_WORDS)
    distinct = min(1.0, len(set(words)) / (MIN_DISTINCT_FRACTION * len(words)))
    return enough * distinct


def reward(text: str, rules: Rules) -> float:
    """Mean partial credit over the prompt's rules, times the gate against degenerate answers."""
    scores = rules.scores(text)
    return gate(text) * sum(scores.values()) / len(scores)


def random_rules(rng: random.Random, keyword: str) -> Rules:
    """The keyword, a word limit and one or two style rules."""
    styles = rng.sample(["no_commas", "lowercase", "bullets"], k=rng.choice([1, 2]))
    return Rules(
        keyword=keyword,
        max_words=rng.choice([12, 15, 20]),
        no_commas="no_commas" in styles,
        lowercase="lowercase" in styles,
        bullets=3 if "bullets" in styles else 0,
    )


def make_prompt(topic: str, rules: Rules) -> str:
    return f"Explain why {topic}. Rules: {'; '.join(rules.instructions())}."


def build_task(num_heldout_topics: int = 16, rules_per_topic: int = 1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """
    Train and held-out rows: `prompt` (a conversation of one user message), `topic` and `rules` (the fields of
    [`Rules`]), with `rules_per_topic` random rule sets per topic. Split by topic: held-out prompts ask about topics
    never trained on.
    """
    rng = random.Random(seed)
    topics = TOPICS[:]
    rng.shuffle(topics)
    splits = ([], [])
    for index, (topic, keyword) in enumerate(topics):
        rule_sets = []
        while len(rule_sets) < rules_per_topic:  # distinct rule sets, so no prompt repeats
            rules = random_rules(rng, keyword)
            if rules not in rule_sets:
                rule_sets.append(rules)
        for rules in rule_sets:
            splits[index >= num_heldout_topics].append(
                {
                    "prompt": [{"role": "user", "content": make_prompt(topic, rules)}],
                    "topic": topic,
                    "rules": dataclasses.asdict(rules),
                }
            )
    heldout, train = splits
    return train, heldout


def completion_text(completion) -> str:
    """The text of a completion, standard (a string) or conversational (a list with one assistant message)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def constraint_reward(completions, rules, **kwargs) -> list[float]:
    """The task's reward function in TRL GRPO's convention: the `rules` column comes from the dataset."""
    return [reward(completion_text(c), Rules(**r)) for c, r in zip(completions, rules, strict=True)]
