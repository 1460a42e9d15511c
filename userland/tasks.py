"""Tasks and rewards, and the built-in task families.

A `Task` is a goal, an optional environment (a Gymnasium id served by the
kernel, or a `gymnasium.Env` instance stepped in the agent's own process), a
reward function, a success test and a step limit. Families group tasks so
that what is learned on one (demonstrations, which strategy works) carries
to the next.

Built-in families, each with an automatic reward:
- ``arithmetic``: "What is 17 + 25?"; exact integer answer.
- ``capitals``: "What is the capital of France?"; exact answer, case-insensitive.
- ``files``: "Write the word 'banana' into /answer.txt"; a checker reads the
  agent's file sandbox.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

Reward = Callable[..., float]


STRATEGIES = ("direct", "tool")


@dataclass
class Task:
    """One episode's work for an `Agent`.

    goal: the question or instruction the agent sees.
    env: a Gymnasium id (served by the kernel) or a `gymnasium.Env`; None for
        a question.
    reward / success: how the episode is scored; by default an exact match
        with `answer` scores 1.
    max_steps: the episode's step limit (env tasks).
    family: groups tasks, so what is learned on one carries to the next.
    answer: the expected answer, for the default reward.
    policy: a program `observation -> action` that acts instead of the model.
    strategy: how the model answers a question: "direct" (constrained to
        `grammar`) or "tool" (it writes `tool`'s arguments, constrained to
        the tool's JSON schema, and the tool's result is the answer). None:
        "tool" when the task names a tool, else "direct" (a learner, when the
        agent has one, chooses instead).
    tool: the tool a "tool" answer calls, e.g. "calc.eval".
    """

    goal: str = ""
    env: Any = None  # a Gymnasium id, a gymnasium.Env, or None (a question-answer task)
    reward: Reward | None = None  # (answer, task, agent) -> float; env tasks: (obs, action, r)
    success: Callable[..., bool] | None = None  # (total_reward, task, agent) -> bool
    max_steps: int = 20
    family: str | None = None
    answer: str | None = None  # the expected answer, for exact-match rewards
    policy: Callable | None = None  # observation -> action: a program instead of the LLM
    grammar: str | None = None  # GBNF the direct answer is constrained to
    tool: str | None = None  # the tool a "tool" strategy calls
    seed: int | None = None
    meta: dict = field(default_factory=dict)
    strategy: str | None = None  # "direct" | "tool" | None (see above)

    def __post_init__(self) -> None:
        if isinstance(self.policy, str):  # Task(policy="tool") means the strategy
            self.strategy, self.policy = self.policy, None
        if self.policy is not None and not callable(self.policy):
            raise ValueError("Task.policy is a callable observation -> action; for the "
                             f"model's way of answering use strategy= one of {STRATEGIES}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"Task.strategy must be one of {STRATEGIES} or None, "
                             f"not {self.strategy!r}")
        if self.strategy == "tool" and not self.tool:
            raise ValueError('strategy="tool" needs the tool to call: Task(..., tool="calc.eval")')

    def score(self, answer: Any, agent: Any = None) -> float:
        if self.reward is not None:
            return float(self.reward(answer, self, agent))
        if self.answer is None:
            return 0.0
        return float(normalize(answer) == normalize(self.answer))

    def succeeded(self, total_reward: float, agent: Any = None) -> bool:
        if self.success is not None:
            return bool(self.success(total_reward, self, agent))
        return total_reward > 0


def normalize(text: Any) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().strip(".").lower()


INT_GRAMMAR = 'root ::= "-"? [0-9] [0-9]? [0-9]? [0-9]? [0-9]? [0-9]?'
WORD_GRAMMAR = 'root ::= " "? [A-Z] [a-z]{1,15}'


def arithmetic(n: int = 10, seed: int = 0, ops: str = "+-*") -> list[Task]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(ops)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        if op == "*":
            b = rng.randint(2, 12)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        out.append(Task(goal=f"What is {a} {op} {b}?", answer=str(value), family="arithmetic",
                        grammar=INT_GRAMMAR, tool="calc.eval", max_steps=1))
    return out


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Russia", "Moscow"),
            ("England", "London"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
            ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Canada", "Ottawa")]


def capitals(n: int = 10, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    pairs = rng.sample(CAPITALS, min(n, len(CAPITALS)))
    return [Task(goal=f"What is the capital of {country}?", answer=city, family="capitals",
                 grammar=WORD_GRAMMAR, max_steps=1) for country, city in pairs]


WORDS = ["banana", "river", "candle", "orbit", "maple", "violet", "harbor", "tiger"]


def _file_checker(path: str, word: str) -> Reward:
    def reward(answer: Any, task: Task, agent: Any) -> float:
        try:
            text = agent.client.fs.read_file(path).decode("utf-8", "replace")
        except Exception:  # no such file, no permission: the task was not done
            return 0.0
        return float(normalize(text) == normalize(word))
    return reward


def files(n: int = 5, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        out.append(Task(goal=f"Write the word '{word}' into the file /answer.txt",
                        answer=word, family="files", reward=_file_checker("/answer.txt", word),
                        tool="files.write", meta={"path": "/answer.txt"}, max_steps=1))
    return out
