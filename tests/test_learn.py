"""Each learner on a real Gymnasium environment, stepped through the kernel."""

import numpy as np
import pytest

from llmagentos import learn
from llmagentos.envs import KernelEnv
from llmagentos.tasks import Task


@pytest.fixture
def client(shared_kernel):
    with shared_kernel.client() as c:
        yield c


def test_q_learning_solves_frozenlake_through_the_kernel(client):
    env = KernelEnv("FrozenLake-v1", client=client, is_slippery=False)
    q = learn.QLearner(16, 4, alpha=0.5, gamma=0.95, epsilon_decay=0.98, seed=0)
    returns = q.train(env, 300, seed=0)
    assert np.mean(returns[:50]) < 0.5 < np.mean(returns[-50:])
    assert np.mean(q.evaluate(env, 20)) == 1.0  # the greedy policy reaches the goal
    env.close()


def test_reinforce_improves_on_cartpole_through_the_kernel(client):
    env = KernelEnv("CartPole-v1", client=client)
    pg = learn.Reinforce(5, 2, lr=0.01, seed=0)
    returns = pg.train(env, 250, seed=0)
    first, last = np.mean(returns[:50]), np.mean(returns[-50:])
    assert last > 1.5 * first, (first, last)
    env.close()


def test_q_learning_is_reproducible(client):
    runs = []
    for _ in range(2):
        env = KernelEnv("FrozenLake-v1", client=client)
        q = learn.QLearner(16, 4, seed=3)
        runs.append(q.train(env, 50, seed=7))
        env.close()
    assert runs[0] == runs[1]


def test_strategy_learners_prefer_what_pays():
    task = Task("What is 1 + 1?", family="unit")
    for method in ("q", "reinforce"):
        sl = learn.StrategyLearner(method, seed=0)
        for _ in range(60):
            choice = sl.select(task)
            sl.update(task, choice, 1.0 if choice == "tool" else 0.0)
        pref = sl.preference(task)
        assert pref["tool"] > pref["direct"], (method, pref)
