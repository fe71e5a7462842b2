"""The demo task's reward, on hand-checked cases: each rule, the gate, their combination, and attempts to game it."""

import json
from dataclasses import asdict

import pytest

from qrpo_trl.demo.task import Rules, build_task, constraint_reward, gate, make_prompt, reward


ALL_STYLES = Rules("light", 12, no_commas=True, lowercase=True, bullets=3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("light bends in the air above us", 1.0),
        ("Light bends in the air above us", 1.0),  # case-insensitive
        ("sunlight bends in the air above us", 0.0),  # a whole word, not a substring
        ("the 'light' bends in the air", 1.0),  # quoted
    ],
)
def test_keyword(text, expected):
    assert Rules("light", 20).scores(text)["keyword"] == expected


@pytest.mark.parametrize(
    "num_words, expected",
    [(12, 1.0), (5, 1.0), (13, 12 / 13), (24, 0.5), (30, 0.4)],
)
def test_max_words(num_words, expected):
    text = " ".join(f"w{i}" for i in range(num_words))
    assert Rules("x", 12).scores(text)["max_words"] == pytest.approx(expected)


def test_words_are_letters_and_digits_runs():
    # "it's" is one word; "-" and "," are not words; "well-known" is two
    assert Rules("x", 4).scores("- it's well-known, 42")["max_words"] == 1.0
    assert Rules("x", 3).scores("- it's well-known, 42")["max_words"] == 0.75


@pytest.mark.parametrize("text, expected", [("a b c", 1.0), ("a, b c", 0.5), ("a, b, c", 1 / 3), ("a,,,b", 0.25)])
def test_no_commas(text, expected):
    assert Rules("x", 20, no_commas=True).scores(text)["no_commas"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected", [("all lower case here", 1.0), ("One capital", 0.5), ("Two Capitals", 1 / 3), ("123 - ok", 1.0)]
)
def test_lowercase(text, expected):
    assert Rules("x", 20, lowercase=True).scores(text)["lowercase"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- one\n- two\n- three", 1.0),
        ("* one\n* two\n* three", 1.0),
        ("  - one\n  - two\n  - three", 1.0),  # indented items count
        ("- one\n- two", 2 / 3),
        ("- a\n- b\n- c\n- d", 2 / 3),
        ("- a\n- b\n- c\n- d\n- e\n- f\n- g", 0.0),  # clipped at 0
        ("one - two - three", 0.0),  # dashes inside a line are not items
        ("-\n-\n-", 0.0),  # an item needs text
        ("no list at all", 0.0),
    ],
)
def test_bullets(text, expected):
    assert Rules("x", 20, bullets=3).scores(text)["bullets"] == pytest.approx(expected)


def test_only_the_prompts_rules_are_scored():
    assert set(Rules("x", 20).scores("a b c")) == {"keyword", "max_words"}
    assert set(ALL_STYLES.scores("a b c")) == {"keyword", "max_words", "no_commas", "lowercase", "bullets"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", 0.0),
        ("   ", 0.0),
        ("one two three four five", 1.0),
        ("one two", 0.4),  # 2 of 5 words
        ("light light light light light", 0.2 / 0.6),  # 1 distinct of 5 words: 1 / (0.6 * 5)
        ("the sun is hot and the sun is bright", 1.0),  # 6 distinct of 9 >= 60%
        ("a a a a b b b b c c", 0.5),  # 3 distinct of 10: 3 / 6
        ("Light LIGHT light lIgHt light", 0.2 / 0.6),  # repetition is case-insensitive
    ],
)
def test_gate(text, expected):
    assert gate(text) == pytest.approx(expected)


def test_reward_is_the_mean_of_the_rules_times_the_gate():
    rules = Rules("light", 12, no_commas=True)
    perfect = "light scatters off tiny air molecules"
    assert reward(perfect, rules) == 1.0
    # keyword missing (0), 6 words (1), one comma (1/2): mean 0.5
    assert reward("blue scatters, off tiny air molecules", rules) == pytest.approx(0.5)
    # 24 words (1/2), keyword there (1), no comma (1): mean 5/6
    long = "light " + " ".join(f"w{i}" for i in range(23))
    assert reward(long, rules) == pytest.approx(5 / 6)
    # a 2-word answer meeting every rule is scaled by its gate, 2/5
    assert reward("light scatters", rules) == pytest.approx(0.4)


def test_a_perfect_answer_to_every_rule():
    text = "- light scatters\n- air molecules bend it\n- blue waves win"
    assert ALL_STYLES.scores(text) == dict.fromkeys(["keyword", "max_words", "no_commas", "lowercase", "bullets"], 1.0)
    assert reward(text, ALL_STYLES) == 1.0


@pytest.mark.parametrize(
    "attempt",
    [
        "",  # meets the word limit, the comma and case rules, but says nothing
        "light",  # the keyword alone
        "light light light light light light light light",  # the keyword repeated
        "- light\n- light\n- light",  # a list of keywords
        "- light light\n- light light\n- light light",
    ],
)
def test_degenerate_answers_score_low(attempt):
    honest = "- light scatters in air\n- short waves bend more\n- the sky looks blue"
    assert reward(honest, ALL_STYLES) == 1.0
    assert reward(attempt, ALL_STYLES) <= 0.4


def test_reward_function_follows_trl_convention():
    rules = [json.loads(json.dumps(asdict(Rules("light", 12)))), asdict(Rules("air", 12, lowercase=True))]
    completions = [[{"role": "assistant", "content": "light scatters off tiny air molecules"}], "Air is Everywhere"]
    rewards = constraint_reward(prompts=["p1", "p2"], completions=completions, rules=rules, topic=["a", "b"])
    # second: keyword 1, 3 words <= 12 (1), two capitals (1/3): mean 7/9, gate 3/5
    assert rewards == pytest.approx([1.0, 7 / 9 * 0.6])


def test_prompts_state_their_rules():
    prompt = make_prompt("the sky looks blue", ALL_STYLES)
    assert prompt == (
        "Explain why the sky looks blue. Rules: use the word 'light'; use at most 12 words; do not use any commas; "
        "write only in lowercase letters; answer as a bulleted list of exactly 3 items starting with '-'."
    )


def test_task_split_by_topic():
    train, heldout = build_task(num_heldout_topics=16, rules_per_topic=2)
    assert (len(train), len(heldout)) == (64, 32)
    train_topics, heldout_topics = {row["topic"] for row in train}, {row["topic"] for row in heldout}
    assert len(train_topics) == 32 and len(heldout_topics) == 16 and not train_topics & heldout_topics
    prompts = [row["prompt"][0]["content"] for row in train + heldout]
    assert len(set(prompts)) == len(prompts)
    for row in train + heldout:
        rules = Rules(**row["rules"])
        assert row["prompt"][0]["content"] == make_prompt(row["topic"], rules)
        assert 1 <= rules.no_commas + rules.lowercase + bool(rules.bullets) <= 2
    assert build_task(16, 2) == (train, heldout)  # deterministic
