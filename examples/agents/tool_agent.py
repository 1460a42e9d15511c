"""An LLM agent that uses tools: it learns from a few expert demonstrations
to call the calculator, and writes its report into its file sandbox."""

import llmagentos
from llmagentos import learn, tasks

c = llmagentos.connect()
for t in tasks.arithmetic(6, seed=42):  # an expert shows how it is done
    learn.record_demo(c, t, answer=t.answer, args={"expression": t.goal[8:-1]})

agent = llmagentos.Agent(model_name="gemma3-270m", name="calculator", strategy="tool", demos=3)
lines = []
for t in tasks.arithmetic(4, seed=7):
    r = agent.run(t)
    lines.append(f"{t.goal} -> {r.answer} ({'right' if r.success else 'wrong'})")
    print(lines[-1], flush=True)
agent.tool("files.write", path="/report.txt", text="\n".join(lines) + "\n")
print("report:", agent.client.fs.read_file("/report.txt").decode().count("\n"), "lines",
      flush=True)
agent.close()
