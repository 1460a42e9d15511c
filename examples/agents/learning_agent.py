"""A learning agent: tabular Q-learning on FrozenLake, stepping the
environment through the kernel's env driver; every episode is recorded."""

import llmagentos
from llmagentos.envs import KernelEnv
from llmagentos.learn import QLearner

c = llmagentos.connect()
env = KernelEnv("FrozenLake-v1", client=c, is_slippery=False)
q = QLearner(16, 4, alpha=0.5, gamma=0.95, epsilon_decay=0.99, seed=0)
for block in range(4):
    returns = q.train(env, 100, seed=block * 100)
    for i, ret in enumerate(returns[-20:]):  # a sample of the block for the learning curve
        ep = c.traj.begin(f"FrozenLake 4x4 episode {block * 100 + i}", "frozenlake-q")
        c.traj.step(ep, None, None, ret)
        c.traj.end(ep, ret > 0, {"choice": "q-learning"})
    print(f"episodes {block * 100 + 1}-{block * 100 + 100}: "
          f"success {sum(returns) / len(returns):.2f}, epsilon {q.epsilon:.2f}", flush=True)
print("greedy success:", sum(q.evaluate(env, 20)) / 20, flush=True)
env.close()
