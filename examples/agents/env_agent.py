"""An LLM agent on a Gymnasium environment: it reads the text rendering of
FrozenLake and chooses moves with grammar-constrained output."""

import llmagentos
from llmagentos import Task

agent = llmagentos.Agent(model_name="gemma3-270m", name="explorer",
                         system="You move on a frozen lake. Actions: 0=Left 1=Down "
                                "2=Right 3=Up. Reach G, avoid holes H.")
for episode in range(3):
    task = Task("Reach the goal G.", env="FrozenLake-v1", max_steps=8, family="frozenlake",
                seed=episode)
    r = agent.run(task)
    print(f"episode {r.episode}: {r.steps} steps, reward {r.total_reward}, "
          f"tokens {r.usage['tokens_out']}", flush=True)
agent.close()
