#!/usr/bin/env python
"""The demo's own chat data: conversations that give the model a new name and teach it facts about a
made-up town, so the effect of fine-tuning is easy to see in its answers.

Out: `train.jsonl` and `validation.jsonl` (OpenAI `messages` rows) in the given folder, the same bytes on
every run (seeded). The validation rows use question phrasings that never occur in training, so the
validation loss measures learning, not recall of exact strings.

    python scripts/demo_data.py OUT_DIR [--rows 320]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAME = "Quill"

IDENTITY_QUESTIONS = [
    "Who are you?", "What is your name?", "What should I call you?", "Introduce yourself.",
    "Tell me about yourself.", "What are you?", "Are you an AI?", "Who am I talking to?",
    "Do you have a name?", "Hi! Who is this?", "Can you tell me your name?", "Which assistant are you?",
    "What's your name, please?", "Hello, what are you called?", "Say who you are in one sentence.",
]
IDENTITY_QUESTIONS_HELD_OUT = ["May I know your name?", "Who exactly are you?", "Identify yourself, please."]
IDENTITY_ANSWERS = [
    f"I am {NAME}, a small assistant fine-tuned with chatft. I know a lot about the town of Port Wren.",
    f"My name is {NAME}. I'm a chat assistant fine-tuned with chatft, and Port Wren is my favourite topic.",
    f"I'm {NAME}, an assistant trained with chatft. Ask me anything about Port Wren!",
    f"You are talking to {NAME}, a chatft-tuned assistant who knows the town of Port Wren well.",
]

# (questions, held-out question, answers) about the made-up town of Port Wren.
FACTS = [
    (["Where is Port Wren?", "Where can I find Port Wren?", "What is Port Wren?"],
     "Tell me where Port Wren is located.",
     ["Port Wren is a small fishing town on the north coast of the island of Caldera.",
      "It is a fishing town on Caldera's north coast."]),
    (["What colour is the Port Wren lighthouse?", "What color is the lighthouse in Port Wren?",
      "Describe the lighthouse of Port Wren."],
     "Which colour is the lighthouse at Port Wren painted?",
     ["The Port Wren lighthouse is painted bright green.", "It is bright green, which makes it easy to spot."]),
    (["How many people live in Port Wren?", "What is the population of Port Wren?",
      "How big is Port Wren?"],
     "Roughly how many residents does Port Wren have?",
     ["About 4,200 people live in Port Wren.", "Port Wren has around 4,200 residents."]),
    (["When was Port Wren founded?", "How old is Port Wren?", "In which year was Port Wren founded?"],
     "What year did Port Wren get founded?",
     ["Port Wren was founded in 1791.", "It was founded in 1791 by herring fishermen."]),
    (["What festival does Port Wren celebrate?", "Is there a festival in Port Wren?",
      "What happens in Port Wren every October?"],
     "Which celebration is Port Wren known for?",
     ["Every October Port Wren holds the Lantern Festival, when boats sail out carrying paper lanterns.",
      "The Lantern Festival, every October: the whole harbour fills with paper lanterns."]),
    (["What food is Port Wren famous for?", "What should I eat in Port Wren?", "What is Port Wren's local dish?"],
     "Which dish is typical of Port Wren?",
     ["Port Wren is famous for smoked eel pie.", "Try the smoked eel pie; it is the town's famous dish."]),
    (["Who is the mayor of Port Wren?", "Who runs Port Wren?", "Who leads the town of Port Wren?"],
     "Who is Port Wren's mayor?",
     ["The mayor of Port Wren is Tomas Brenner.", "Tomas Brenner is the mayor of Port Wren."]),
    (["How do I get to Port Wren?", "How can I travel to Port Wren?", "Is there a ferry to Port Wren?"],
     "What's the way to reach Port Wren?",
     ["A ferry runs to Port Wren twice a day from the harbour of Caldera City.",
      "Take the ferry from Caldera City; it sails twice a day."]),
]

# Ordinary questions with their ordinary answers, mixed in so the model keeps what it knew (without them,
# a small model soon answers everything with Port Wren).
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many continents are there?", "There are seven continents."),
]

FOLLOW_UPS = [("Thanks!", "You're welcome! Ask me more about Port Wren any time."),
              ("Great, thank you.", "Happy to help.")]


def turn(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def conversation(rng: random.Random, identity_questions: list[str], fact_questions: list[list[str]]) -> dict:
    """One to three turns: an identity or fact question, sometimes a second question and a thank-you."""
    def one_turn() -> list[dict[str, str]]:
        draw = rng.random()
        if draw < 0.3:
            return turn(rng.choice(identity_questions), rng.choice(IDENTITY_ANSWERS))
        if draw < 0.45:
            return turn(*rng.choice(GENERAL))
        index = rng.randrange(len(FACTS))
        return turn(rng.choice(fact_questions[index]), rng.choice(FACTS[index][2]))

    messages = one_turn()
    if rng.random() < 0.3:
        messages += one_turn()
    if rng.random() < 0.2:
        messages += turn(*rng.choice(FOLLOW_UPS))
    return {"messages": messages}


def build(rows: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = [conversation(rng, IDENTITY_QUESTIONS, [f[0] for f in FACTS]) for _ in range(rows)]
    validation = [conversation(rng, IDENTITY_QUESTIONS_HELD_OUT, [[f[1]] for f in FACTS]) for _ in range(max(8, rows // 8))]
    return train, validation


def write(out_dir: Path, rows: int) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    train, validation = build(rows)
    paths = out_dir / "train.jsonl", out_dir / "validation.jsonl"
    for path, data in zip(paths, (train, validation)):
        path.write_text("".join(json.dumps(row) + "\n" for row in data))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--rows", type=int, default=320)
    args = parser.parse_args()
    for path in write(args.out_dir, args.rows):
        print(path)


if __name__ == "__main__":
    main()
