"""Learning from rewards and from experience, on top of the kernel's stores.

- `QLearner`: tabular Q-learning (MDP with discrete states and actions).
- `Reinforce`: REINFORCE policy gradient with a linear softmax policy (numpy).
  Both train directly on environments through the syscalls (`KernelEnv`),
  and both serve as `Agent(learner=...)` over the LLM agent's discrete
  choices (which strategy: answer directly, or use the tool), where each
  task family is a state and an episode is one step.
- Imitation: `record_demo` stores an expert demonstration in the trajectory
  store; `Agent(demos=k)` retrieves the k most similar as few-shot exemplars.
- Meta-learning: `warm_start(learner, client, family)` initialises a learner
  for a new task of a family from the family's statistics (per-choice
  success rates the kernel aggregates over every earlier episode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tasks import Task


# --- tabular Q-learning -----------------------------------------------------------
@dataclass
class QLearner:
    n_states: int
    n_actions: int
    alpha: float = 0.1
    gamma: float = 0.99
    epsilon: float = 1.0
    epsilon_min: float = 0.01
    epsilon_decay: float = 0.999
    seed: int = 0
    q: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.q = np.zeros((self.n_states, self.n_actions))
        self.rng = np.random.default_rng(self.seed)

    def act(self, state: int, greedy: bool = False) -> int:
        if not greedy and self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.n_actions))
        row = self.q[state]
        best = np.flatnonzero(row == row.max())  # break ties at random
        return int(self.rng.choice(best))

    def update(self, s: int, a: int, r: float, s2: int, done: bool) -> None:
        target = r if done else r + self.gamma * self.q[s2].max()
        self.q[s, a] += self.alpha * (target - self.q[s, a])

    def end_episode(self) -> None:
        self.epsilon = max(self.epsilon_min, self.epsilon * self.epsilon_decay)

    def train(self, env: Any, episodes: int, seed: int | None = None) -> list[float]:
        """Episodes on a Gymnasium env (a KernelEnv through the kernel, or any
        env); returns the return of each episode."""
        returns = []
        for i in range(episodes):
            s, _ = env.reset(seed=None if seed is None else seed + i)
            s, total, done = int(s), 0.0, False
            while not done:
                a = self.act(s)
                s2, r, term, trunc, _ = env.step(a)
                s2 = int(s2)
                self.update(s, a, float(r), s2, term)
                s, total, done = s2, total + float(r), term or trunc
            self.end_episode()
            returns.append(total)
        return returns

    def evaluate(self, env: Any, episodes: int, seed: int = 10_000) -> list[float]:
        returns = []
        for i in range(episodes):
            s, _ = env.reset(seed=seed + i)
            total, done = 0.0, False
            while not done:
                s, r, term, trunc, _ = env.step(self.act(int(s), greedy=True))
                total, done = total + float(r), term or trunc
            returns.append(total)
        return returns

    # as an Agent learner over strategies: one state per task family
    def select(self, task: Task) -> str:
        return STRATEGY_NAMES[self.act(_family_state(task, self.n_states))]

    def update_choice(self, task: Task, choice: str, reward: float) -> None:
        s = _family_state(task, self.n_states)
        self.update(s, STRATEGY_NAMES.index(choice), reward, s, True)
        self.end_episode()


# --- REINFORCE -----------------------------------------------------------------
@dataclass
class Reinforce:
    obs_dim: int
    n_actions: int
    lr: float = 0.01
    gamma: float = 0.99
    seed: int = 0
    baseline_decay: float = 0.9
    w: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.w = np.zeros((self.obs_dim, self.n_actions))
        self.baseline = 0.0

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.w
        z = z - z.max()
        e = np.exp(z)
        return e / e.sum()

    def act(self, x: np.ndarray, greedy: bool = False) -> int:
        p = self.probs(x)
        return int(p.argmax()) if greedy else int(self.rng.choice(self.n_actions, p=p))

    def learn_episode(self, xs: list[np.ndarray], actions: list[int],
                      rewards: list[float]) -> None:
        g, returns = 0.0, []
        for r in reversed(rewards):
            g = r + self.gamma * g
            returns.append(g)
        returns = np.array(returns[::-1])
        adv = (returns - returns.mean()) / (returns.std() + 1e-8) if len(returns) > 1 \
            else returns - self.baseline
        for x, a, A in zip(xs, actions, adv):
            p = self.probs(x)
            grad = -np.outer(x, p)
            grad[:, a] += x
            self.w += self.lr * A * grad

    def train(self, env: Any, episodes: int, seed: int | None = None) -> list[float]:
        out = []
        for i in range(episodes):
            obs, _ = env.reset(seed=None if seed is None else seed + i)
            xs, acts, rews, done = [], [], [], False
            while not done:
                x = _features(obs, self.obs_dim)
                a = self.act(x)
                obs, r, term, trunc, _ = env.step(a)
                xs.append(x)
                acts.append(a)
                rews.append(float(r))
                done = term or trunc
            self.learn_episode(xs, acts, rews)
            out.append(sum(rews))
        return out

    # as an Agent learner over strategies (a contextual bandit: family one-hot)
    def select(self, task: Task) -> str:
        return STRATEGY_NAMES[self.act(_one_hot(task, self.obs_dim))]

    def update_choice(self, task: Task, choice: str, reward: float) -> None:
        x = _one_hot(task, self.obs_dim)
        A = reward - self.baseline
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * reward
        p = self.probs(x)
        grad = -np.outer(x, p)
        grad[:, STRATEGY_NAMES.index(choice)] += x
        self.w += self.lr * A * grad


STRATEGY_NAMES = ["direct", "tool"]
FAMILY_SLOTS: dict[str, int] = {}


def _family_state(task: Task, n: int) -> int:
    fam = task.family or "default"
    if fam not in FAMILY_SLOTS:
        FAMILY_SLOTS[fam] = len(FAMILY_SLOTS) % n
    return FAMILY_SLOTS[fam]


def _one_hot(task: Task, dim: int) -> np.ndarray:
    x = np.zeros(dim)
    x[_family_state(task, dim)] = 1.0
    return x


def _features(obs: Any, dim: int) -> np.ndarray:
    """Observation -> feature vector with a bias term (last element)."""
    x = np.asarray(obs, dtype=float).ravel()
    x = np.concatenate([x, [1.0]])
    if x.shape[0] != dim:
        raise ValueError(f"observation has {x.shape[0] - 1} features; policy expects {dim - 1}")
    return x


class StrategyLearner:
    """What `Agent(learner=...)` expects: select(task) -> choice,
    update(task, choice, reward). Wraps a QLearner or Reinforce."""

    def __init__(self, method: str = "q", families: int = 8, seed: int = 0, **kw: Any):
        if method == "q":
            kw.setdefault("epsilon", 0.3)
            kw.setdefault("epsilon_decay", 0.97)
            kw.setdefault("alpha", 0.3)
            self.impl: Any = QLearner(families, len(STRATEGY_NAMES), seed=seed, **kw)
            # A cold start is the agent's default strategy ("direct"), left only
            # by exploration or by a warm start from the family's statistics.
            self.impl.q[:, 0] = 1e-3
        elif method == "reinforce":
            kw.setdefault("lr", 0.5)
            self.impl = Reinforce(families, len(STRATEGY_NAMES), seed=seed, **kw)
        else:
            raise ValueError("method is 'q' or 'reinforce'")
        self.method = method

    def select(self, task: Task) -> str:
        return self.impl.select(task)

    def update(self, task: Task, choice: str, reward: float) -> None:
        self.impl.update_choice(task, choice, reward)

    def preference(self, task: Task) -> dict[str, float]:
        if self.method == "q":
            return dict(zip(STRATEGY_NAMES, self.impl.q[_family_state(task, self.impl.n_states)]))
        return dict(zip(STRATEGY_NAMES, self.impl.probs(_one_hot(task, self.impl.obs_dim))))


# --- imitation ----------------------------------------------------------------------
def record_demo(client: Any, task: Task, *, answer: Any = None, args: dict | None = None) -> int:
    """Store an expert demonstration: the task and what the expert did (a
    direct answer, or the tool arguments). Agents with demos=k retrieve the
    most similar ones as exemplars."""
    act: dict = {}
    if answer is not None:
        act["answer"] = answer
    if args is not None:
        act["args"] = args
    ep = client.traj.begin(task.goal, task.family, "demo", {"expert": True})
    client.traj.step(ep, task.goal, act, 1.0, None)
    client.traj.end(ep, True, None)
    return ep


# --- meta-learning --------------------------------------------------------------------
def warm_start(learner: StrategyLearner, client: Any, task: Task, strength: float = 1.0) -> dict:
    """Initialise the learner's preferences for the task's family from what
    worked on earlier tasks of that family (the kernel's per-choice stats).
    Returns the stats used."""
    stats = client.traj.stats(task.family or "default")
    rates = {c: v["success_rate"] for c, v in stats["choices"].items() if c in STRATEGY_NAMES}
    if not rates:
        return stats
    impl = learner.impl
    if learner.method == "q":
        s = _family_state(task, impl.n_states)
        for c, rate in rates.items():
            impl.q[s, STRATEGY_NAMES.index(c)] = strength * rate
        impl.epsilon = min(impl.epsilon, 0.05)  # the prior is good: explore little
    else:
        x = _one_hot(task, impl.obs_dim)
        s = int(np.argmax(x))
        for c, rate in rates.items():
            impl.w[s, STRATEGY_NAMES.index(c)] = 4.0 * strength * rate
    return stats
