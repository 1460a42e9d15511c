"""Learning through the kernel, measured in one run (`make bench` / `make learn`).

1. Q-learning on FrozenLake-v1 4x4 (slippery), stepping through the kernel's
   env driver: success over the last 100 training episodes (goal >= 0.7),
   a 1,000-episode greedy evaluation, and the optimal policy's success
   (value iteration on the known model) as the ceiling.
2. REINFORCE (linear softmax policy) on CartPole-v1 through the kernel:
   mean return of the last 50 of 500 episodes; stated threshold >= 75
   (a random policy gets about 22).
3. Imitation: the LLM agent (tool strategy) on 12 held-out arithmetic tasks
   with k=3 demonstrations versus zero-shot, and the direct strategy too.
4. Meta-learning: episodes until the strategy learner first reaches 3
   successes in a row on a new arithmetic task set, cold versus warm-started
   from the family's statistics.
5. Wall time per FrozenLake episode through the kernel versus gymnasium directly.

    python bench/bench_learn.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

import llmagentos  # noqa: E402
from llmagentos import learn, tasks  # noqa: E402
from llmagentos.envs import KernelEnv  # noqa: E402


def optimal_frozenlake_success(episodes: int = 2000) -> float:
    env = gym.make("FrozenLake-v1")
    P = env.unwrapped.P
    V = np.zeros(16)
    for _ in range(2000):
        Q = np.array([[sum(p * (r + 0.999 * V[s2] * (not d)) for p, s2, r, d in P[s][a])
                       for a in range(4)] for s in range(16)])
        V = Q.max(1)
    pol = Q.argmax(1)
    wins = 0.0
    for i in range(episodes):
        s, _ = env.reset(seed=50_000 + i)
        done = False
        while not done:
            s, r, term, trunc, _ = env.step(int(pol[s]))
            wins += r
            done = term or trunc
    return wins / episodes


def q_learning(c: llmagentos.Client) -> dict:
    env = KernelEnv("FrozenLake-v1", client=c)
    q = learn.QLearner(16, 4, alpha=0.05, gamma=0.99, epsilon_decay=0.999, epsilon_min=0.0,
                       seed=0)
    t0 = time.perf_counter()
    returns = q.train(env, 8000, seed=0)
    train_s = time.perf_counter() - t0
    greedy = q.evaluate(env, 1000, seed=20_000)
    env.close()
    return {"episodes": 8000, "last100": float(np.mean(returns[-100:])),
            "greedy1000": float(np.mean(greedy)), "train_s": train_s}


def reinforce(c: llmagentos.Client) -> dict:
    env = KernelEnv("CartPole-v1", client=c)
    pg = learn.Reinforce(5, 2, lr=0.01, seed=0)
    t0 = time.perf_counter()
    returns = pg.train(env, 500, seed=0)
    env.close()
    return {"first50": float(np.mean(returns[:50])), "last50": float(np.mean(returns[-50:])),
            "train_s": time.perf_counter() - t0}


def imitation(c: llmagentos.Client) -> dict:
    for t in tasks.arithmetic(30, seed=100):  # the expert's demonstrations (training set)
        learn.record_demo(c, t, answer=t.answer, args={"expression": t.goal[8:-1]})
    held_out = tasks.arithmetic(12, seed=1)
    out = {}
    for strategy in ("tool", "direct"):
        for k in (0, 3):
            a = llmagentos.Agent(model_name="gemma3-270m", name=f"imit-{strategy}-{k}",
                                 strategy=strategy, demos=k, client=c)
            out[f"{strategy}_k{k}"] = sum(a.run(t).success for t in held_out) / len(held_out)
            a.close()
    return out


def episodes_to_threshold(c: llmagentos.Client, warm: bool, seed: int, cap: int = 12) -> int:
    learner = learn.StrategyLearner("q", seed=seed, epsilon=0.3)
    probe = tasks.arithmetic(1)[0]
    if warm:
        learn.warm_start(learner, c, probe)
    a = llmagentos.Agent(model_name="gemma3-270m", name=f"meta-{'warm' if warm else 'cold'}",
                         learner=learner, demos=3, client=c)
    streak = 0
    try:
        for i, t in enumerate(tasks.arithmetic(cap, seed=300 + seed)):
            streak = streak + 1 if a.run(t).success else 0
            if streak == 3:
                return i + 1
        return cap + 1  # not reached within the cap
    finally:
        a.close()


def meta(c: llmagentos.Client) -> dict:
    # Earlier tasks of the family (run by other agents) fill the family's statistics:
    # the imitation runs above recorded both strategies' outcomes.
    cold = [episodes_to_threshold(c, False, s) for s in range(3)]
    warm = [episodes_to_threshold(c, True, s) for s in range(3)]
    return {"cold": cold, "warm": warm, "stats": c.traj.stats("arithmetic")["choices"]}


def episode_wall_time(c: llmagentos.Client, n: int = 200) -> dict:
    policy = np.random.default_rng(0)
    out = {}
    for name, env in (("kernel", KernelEnv("FrozenLake-v1", client=c)),
                      ("direct", gym.make("FrozenLake-v1"))):
        times, steps = [], 0
        for i in range(n):
            t0 = time.perf_counter()
            env.reset(seed=i)
            done = False
            while not done:
                _, _, term, trunc, _ = env.step(int(policy.integers(4)))
                steps += 1
                done = term or trunc
            times.append(time.perf_counter() - t0)
        env.close()
        out[name] = {"ms_per_episode": statistics.median(times) * 1000,
                     "us_per_step": sum(times) / steps * 1e6}
    out["ratio"] = out["kernel"]["ms_per_episode"] / out["direct"]["ms_per_episode"]
    return out


def run() -> dict:
    out = {"optimal": optimal_frozenlake_success()}
    with BenchKernel("--model", "none") as k:
        c = k.client()
        out["q"] = q_learning(c)
        out["reinforce"] = reinforce(c)
        out["wall"] = episode_wall_time(c)
    with BenchKernel("--slots", "4", "--n-ctx", "1024") as k:
        c = k.client()
        out["imitation"] = imitation(c)
        out["meta"] = meta(c)
    return out


def report(r: dict) -> None:
    q, pg, im, me, w = r["q"], r["reinforce"], r["imitation"], r["meta"], r["wall"]
    print("== learning through the kernel ==")
    print(f"  Q-learning, FrozenLake-v1 4x4 slippery, {q['episodes']} episodes "
          f"({q['train_s']:.0f}s): last-100 success {q['last100']:.2f} (goal >= 0.70); "
          f"greedy over 1000 episodes {q['greedy1000']:.3f}; optimal policy "
          f"{r['optimal']:.3f} (the ceiling)")
    print(f"  REINFORCE, CartPole-v1, 500 episodes ({pg['train_s']:.0f}s): mean return "
          f"first 50 {pg['first50']:.0f} -> last 50 {pg['last50']:.0f} (threshold >= 75)")
    print(f"  imitation, 12 held-out arithmetic tasks: tool strategy zero-shot "
          f"{im['tool_k0']:.2f} -> 3 demos {im['tool_k3']:.2f}; direct zero-shot "
          f"{im['direct_k0']:.2f} -> 3 demos {im['direct_k3']:.2f}")
    print(f"  meta-learning, episodes to 3 successes in a row (cap 12, 13 = not reached): "
          f"cold {me['cold']} vs warm-started {me['warm']}")
    print(f"  wall time per FrozenLake episode: kernel {w['kernel']['ms_per_episode']:.2f} ms "
          f"vs direct {w['direct']['ms_per_episode']:.3f} ms (x{w['ratio']:.0f}); per step "
          f"{w['kernel']['us_per_step']:.0f} us vs {w['direct']['us_per_step']:.1f} us")


if __name__ == "__main__":
    report(run())
